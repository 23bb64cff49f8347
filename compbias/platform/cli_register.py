"""``compbias register``: bring your own predictions as a member of an auditable population.

The sub-command of :func:`compbias.platform.cli.build_parser`; the work is
:func:`compbias.platform.register.log_member`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["REGISTER_EPILOG", "add_register_parser", "run_register"]


REGISTER_EPILOG = """\
The predictions table has one row per test example: example_id, label, pred
(integer class ids), optionally prob and group columns (integer or boolean).
Every member of a study must predict the same example ids with the same
labels; a compressed member names its baseline (--baseline-version or
--baseline-run-id) in the same registered model. The run gets
predictions.parquet, its CSV twin and member.json, and the compbias.* tags;
the registered version gets the same tags, so `compbias audit` audits it.
Nothing is written when the input is refused (exit 2). See docs/contract.md
and docs/bring-your-own.md.

examples:
  compbias register base-s0.csv --study tab --role baseline --seed 0 \\
      --registered-model tab-mlp --class-names benign,malignant --positive-class malignant --groups large
  compbias register int8-s0.csv --study tab --role compressed --seed 0 \\
      --method int8 --level dynamic --baseline-version 1 --registered-model tab-mlp
"""


def _csv_list(text: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
    return items


def add_register_parser(sub) -> None:
    """Add ``compbias register`` to the sub-parsers of ``compbias``."""
    p = sub.add_parser(
        "register", help="bring your own predictions: log and register them as a member of an auditable population",
        description="Log a predictions table as a member of a compbias population and register a model version "
                    "that `compbias audit` audits.",
        epilog=REGISTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("predictions", help="the predictions table (.parquet or .csv)")
    p.add_argument("--study", required=True, help="the population's name (members of one study are audited together)")
    p.add_argument("--role", required=True, choices=("baseline", "compressed"), help="baseline or compressed")
    p.add_argument("--seed", required=True, help="training seed (a compressed member carries its baseline's seed)")
    p.add_argument("--method", default=None, help="compression method of a compressed member (e.g. magnitude, int8)")
    p.add_argument("--level", default=None, help="compression level of a compressed member (e.g. 0.9, dynamic)")
    p.add_argument("--baseline-version", default=None, help="a compressed member's baseline: its version number in --registered-model")
    p.add_argument("--baseline-run-id", default=None, help="or the baseline's run id")
    p.add_argument("--registered-model", required=True, help="registered model the version is added to (created for a first baseline)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the baseline's, else from the table)")
    p.add_argument("--class-names", type=_csv_list, default=None, help="class names in class-id order, comma-separated")
    p.add_argument("--positive-class", default=None, help="class id or name whose FPR/FNR the group rates report (binary tasks)")
    p.add_argument("--groups", type=_csv_list, default=None, help="group columns, comma-separated (default: the integer/boolean columns)")
    p.add_argument("--model-uri", default=None, help="register the version from this logged model (runs:/<run>/<path>, models:/<id>)")
    p.add_argument("--run-id", default=None, help="attach to this existing run instead of starting one")
    p.add_argument("--experiment", default=None, help="experiment of the run started here (default compbias/<study>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or MLflow's default)")


def run_register(args) -> int:
    """``compbias register``: exit 0 with the version on stdout, or 2 with one line on stderr and nothing written."""
    from compbias.contract import BASELINE_LEVEL, BASELINE_METHOD, ContractError

    def refuse(problem: str) -> int:
        print(f"compbias register: {problem}", file=sys.stderr)
        return 2

    if args.role == "baseline" and (args.method or args.level or args.baseline_version or args.baseline_run_id):
        return refuse("a baseline takes no --method, --level, --baseline-version or --baseline-run-id; "
                      "use --role compressed for a compressed model")
    try:
        from compbias.platform.register import log_member, read_predictions
        from compbias.platform.tracking import configure_tracking

        frame = read_predictions(args.predictions)  # a bad file is refused before the store is touched
        client = configure_tracking(args.tracking_uri)
        positive = args.positive_class
        result = log_member(
            frame, study=args.study, role=args.role, seed=args.seed,
            method=args.method or BASELINE_METHOD, level=args.level or BASELINE_LEVEL,
            baseline_version=args.baseline_version, baseline_run_id=args.baseline_run_id,
            registered_model_name=args.registered_model, num_classes=args.num_classes, class_names=args.class_names,
            positive_class=positive, groups=args.groups, model_uri=args.model_uri, run_id=args.run_id,
            experiment=args.experiment, client=client,
        )
    except ContractError as exc:
        return refuse(str(exc))
    except Exception as exc:
        from compbias.platform.tracking import tracking_error_message

        message = tracking_error_message(exc, args.tracking_uri)
        if message is None:
            raise
        return refuse(message)
    print(
        f"registered {result.registered_model} version {result.version} (run {result.run_id}): study "
        f"{result.member.study!r}, {result.member.role}, seed {result.member.seed}"
        + ("" if result.member.role == "baseline" else f", {result.member.method}@{result.member.level}, "
           f"baseline version {result.member.baseline_version}")
    )
    return 0

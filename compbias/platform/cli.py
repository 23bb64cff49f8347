"""The ``compbias`` command line.

::

    compbias study CONFIG [--data-root DIR] [--seeds N|0,1,2] [--executor ray|local]
    compbias train CONFIG [--data-root DIR] [--seeds ...]          # baselines only
    compbias compress CONFIG [--method M ...] [--level L ...]      # from finished baselines
    compbias audit ...                                              # see compbias.platform.audit.cli
    compbias register PREDICTIONS --study S --role R --seed N --registered-model NAME ...  # bring your own predictions
    compbias --version

``CONFIG`` is a study file, or the name of one: ``NAME`` or ``NAME.yaml`` in
the current directory, else a study file shipped with compbias (``digits``
means ``configs/digits.yaml``, which an installed package carries as
``compbias/configs/digits.yaml``). Every default lives in the study file's
schema (``compbias.platform.config``); the options here only override.

Exit codes: 0 success, 1 some models failed, 2 bad usage or a bad study file
(or a Ray cluster at ``RAY_ADDRESS`` that does not answer), 3 the Ray cluster
went away mid-study (its head, or this machine's node): the models logged so
far are complete, the study's parent run is ended FAILED, and running the same
command again resumes the study.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "resolve_config_path", "drop_empty_options"]


def resolve_config_path(value: str) -> Path:
    """A study file: a path, or a name looked up in the current directory, then among the shipped ones.

    Parameters
    ----------
    value : str
        ``my-study.yaml``, ``/abs/path.yaml``, ``my-study`` (``./my-study.yaml``),
        ``digits`` or ``configs/digits.yaml`` (a study file shipped with
        compbias, in a checkout or an installed package alike).

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        Naming the places looked at and the available config names.
    """
    from compbias._locations import configs_dir

    shipped = configs_dir()
    p = Path(value).expanduser()
    candidates = [p, p.with_name(p.name + ".yaml")] if p.name else []
    if not p.is_absolute():
        candidates += [shipped / p, shipped / f"{value}.yaml"]
        if len(p.parts) == 2 and p.parts[0] == "configs":  # the repository's spelling, from anywhere
            candidates += [shipped / p.name, shipped / f"{p.name}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise FileNotFoundError(
        f"no study file {value!r} (looked in {Path.cwd()} and {shipped}); "
        f"give a path to a YAML file or one of: {', '.join(names) or '(none found)'}"
    )


def _seeds(text: str):
    text = text.strip()
    if not text:
        return None  # an empty value (e.g. an MLproject default) means "as in the study file"
    try:
        if "," in text or text.startswith("["):
            return [int(x) for x in text.strip("[]").split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a comma-separated list (0,1,2), got {text!r}") from None


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study file (YAML) or the name of one in configs/ (e.g. digits)")
    p.add_argument("--data-root", default=None, help="dataset root; overrides dataset.root of the study file")
    p.add_argument("--seeds", type=_seeds, default=None, help="population: a count n (seeds 0..n-1) or a list 0,1,2")
    p.add_argument("--executor", choices=("ray", "local"), default="ray", help="run tasks on Ray (default) or one after another here")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or MLflow's default)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``compbias``.

    Returns
    -------
    argparse.ArgumentParser
    """
    from compbias import __version__

    parser = argparse.ArgumentParser(
        prog="compbias", description="Measure the bias that compressing neural networks induces.",
        epilog="exit codes of study/train/compress: 0 success; 1 some models failed; 2 bad usage, a bad study file or "
               "no Ray at RAY_ADDRESS; 3 the Ray cluster went away mid-study (finished models are safe: re-run the same "
               "command to resume)")
    parser.add_argument("--version", action="version", version=f"compbias {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{study,train,compress,audit,register}")
    p = sub.add_parser("study", help="train the population, compress every model, log everything (resumes)")
    _add_study_args(p)
    p = sub.add_parser("train", help="train (or resume) the baseline population only")
    _add_study_args(p)
    p = sub.add_parser("compress", help="compress finished baselines with the study's methods")
    _add_study_args(p)
    p.add_argument("--method", action="append", default=None, help="only this method (repeatable), e.g. magnitude or structured+kd")
    p.add_argument("--level", action="append", default=None, help="only this level (repeatable), e.g. 0.9 or int8_static")
    p = sub.add_parser("audit", help="audit registered model versions of a study (compbias.platform.audit)", add_help=False)
    p.add_argument("audit_args", nargs=argparse.REMAINDER)
    _add_register_parser(sub)
    return parser


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


def _add_register_parser(sub) -> None:
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


def _run_register(args) -> int:
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


def _load(args):
    from compbias.platform.config import load_study

    path = resolve_config_path(args.config)
    spec = load_study(path)
    seeds = args.seeds
    if args.data_root or seeds is not None:
        spec = spec.with_overrides(data_root=args.data_root, seeds=seeds)
    if spec.dataset.kind != "digits":
        if not spec.dataset.root:
            raise ValueError(f"dataset kind {spec.dataset.kind!r} needs a root: set dataset.root in {path} or pass --data-root DIR")
        root = Path(spec.dataset.root).expanduser()
        if not root.is_absolute():
            root = (path.parent / root) if args.data_root is None else (Path.cwd() / root)
        if not root.exists():
            raise ValueError(f"dataset root {root} does not exist (from {'--data-root' if args.data_root else 'dataset.root'}; cwd {Path.cwd()})")
        spec = spec.with_overrides(data_root=str(root.resolve()))
    return path, spec


def _run_study_command(args) -> int:
    from compbias.platform.config import StudyConfigError
    from compbias.platform.study import RayClusterLostError, StudyConflictError, run_study

    try:
        path, spec = _load(args)
        if args.executor == "ray" and not os.environ.get("RAY_ADDRESS"):
            from compbias.platform.orchestration import ray_bind_mode

            ray_bind_mode()  # refuse a bad COMPBIAS_RAY_BIND before anything is logged
    except (StudyConfigError, FileNotFoundError, ValueError) as exc:
        print(f"compbias {args.command}: {exc}", file=sys.stderr)
        return 2
    kwargs = {}
    if args.command == "train":
        kwargs["roles"] = ("baseline",)
    elif args.command == "compress":
        kwargs["roles"] = ("compressed",)
        kwargs["methods"] = [m for m in args.method or [] if m] or None
        kwargs["levels"] = [lv for lv in args.level or [] if lv] or None
    try:
        outcome = run_study(
            spec,
            study_text=path.read_text(),
            executor=args.executor,
            tracking_uri=args.tracking_uri,
            step=args.command,
            **kwargs,
        )
    except RayClusterLostError as exc:  # the cluster died mid-study: the message says what and that a re-run resumes
        print(f"compbias {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (StudyConflictError, ValueError) as exc:
        print(f"compbias {args.command}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"compbias {args.command}: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a finished model's files are gone from the artifact store
        print(
            f"compbias {args.command}: {exc}; the artifacts of a model logged earlier are missing (deleted or moved?): "
            "restore them, or delete that model version and its run in MLflow so that the study makes it again",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:  # the artifact location: unwritable, not a directory, disk full
        print(
            f"compbias {args.command}: cannot write the study's artifacts: {exc}; make the artifact location "
            "(COMPBIAS_ARTIFACT_ROOT, or the experiment's artifact location) a writable directory with free space, "
            "then run the same command again",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:
        from compbias.platform.tracking import tracking_error_message

        message = tracking_error_message(exc, args.tracking_uri)
        if message is None:
            raise
        print(f"compbias {args.command}: {message}", file=sys.stderr)
        return 2
    print()
    print(outcome.summary_table())
    print()
    share = outcome.tracking_seconds / outcome.wall_seconds if outcome.wall_seconds else 0.0
    print(
        f"study {outcome.study}: {len(outcome.trained)} trained, {len(outcome.resumed)} resumed, "
        f"{len(outcome.failed)} failed in {outcome.wall_seconds:.1f}s (tracking {share:.1%}); "
        f"experiment {spec.experiment_name!r}, parent run {outcome.parent_run_id}, "
        f"registered model {spec.registered_model_name!r}"
    )
    for key, err in outcome.failed.items():
        print(f"  failed: seed={key[0]} {key[1]}@{key[2]}: {err}", file=sys.stderr)
    return 0 if outcome.ok else 1


def _run_audit(args) -> int:
    try:
        audit_cli = importlib.import_module("compbias.platform.audit.cli")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("compbias.platform.audit"):
            print("compbias audit: the audit service (compbias.platform.audit.cli) is not installed in this version", file=sys.stderr)
            return 2
        raise
    if not (hasattr(audit_cli, "add_arguments") and hasattr(audit_cli, "run")):
        print("compbias audit: compbias.platform.audit.cli lacks add_arguments(parser)/run(args)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="compbias audit", description="Audit registered model versions of a study.")
    audit_cli.add_arguments(parser)
    return int(audit_cli.run(parser.parse_args(drop_empty_options(args.audit_args))) or 0)


def drop_empty_options(argv: Sequence[str]) -> list[str]:
    """Remove ``--option ''`` pairs and ``--option=`` items: an empty value means "not given".

    This is how the MLproject entry points pass optional parameters (their
    default is the empty string).

    Parameters
    ----------
    argv : sequence of str

    Returns
    -------
    list of str
    """
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a.endswith("=") and "=" not in a[:-1]:
            i += 1
            continue
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and argv[i + 1] == "":
            i += 2
            continue
        out.append(a)
        i += 1
    return out


#: What the CLI sets in its own environment (only where the user has not): numba's cache and threading
#: layer, and MLflow's "View run ... at <url>" lines off stdout (they would break ``compbias audit --json``).
#: Called in-process (``main([...])``), the CLI puts them back when it returns.
CLI_ENV = ("NUMBA_CACHE_DIR", "NUMBA_THREADING_LAYER", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compbias`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit code.
    """
    saved = {k: os.environ.get(k) for k in CLI_ENV}
    try:
        return _main(argv)
    finally:
        if argv is not None:  # in-process: leave the caller's environment as it was
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _main(argv: Sequence[str] | None) -> int:
    from compbias._locations import cache_dir

    # the checkout's .cache/numba, or the user's cache directory when installed (never site-packages)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir("numba")))
    # torch and numba's OpenMP layer slow each other down in one process
    # (see compbias.platform.orchestration.WORKER_ENV); the local executor runs here
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    # MLflow prints "View run ... at <url>" to stdout when a run ends on a tracking server, which would break
    # `compbias audit --json` (stdout is the JSON document); compbias prints its own summary
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "audit":
        return _run_audit(argparse.Namespace(command="audit", audit_args=argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "register":
        return _run_register(args)
    code = _run_study_command(args)
    if as_command:
        from compbias.platform.orchestration import EXIT_RAY_LOST

        if code == EXIT_RAY_LOST:
            _exit_after_ray_loss(code)
    return code


def _exit_after_ray_loss(code: int, *, timeout: float = 15.0) -> None:
    """End the process with ``code`` once the Ray cluster is lost, whatever Ray does at interpreter exit.

    Ray's driver ends the process with status 1 when it disconnects from a
    dead raylet (``ray.shutdown``, or its exit hook: seen in 1 of 13 head
    kills, and every time ``ray.shutdown`` was called here). The MLflow state
    is final by now, so: kill the Ray processes this driver started, without
    disconnecting from them (bounded by ``timeout``, in a thread), flush, and
    leave with the documented code. A driver that joined a cluster started
    none, and kills nothing.
    """
    import threading

    def _shutdown():
        try:
            from ray._private import worker  # the node this driver started, if any (what ray.shutdown kills)

            node = getattr(worker, "_global_node", None)
            if node is not None:
                node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        except Exception:  # pragma: no cover - the cluster is gone; nothing more to stop
            pass

    t = threading.Thread(target=_shutdown, daemon=True)
    t.start()
    t.join(timeout)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

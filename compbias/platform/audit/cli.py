"""``compbias audit``: command-line options and entry point.

``compbias``'s parser (:func:`compbias.platform.cli.build_parser`) makes
``audit`` a sub-command with :func:`add_arguments` and runs it with
:func:`run`; :func:`main` is the same command on its own
(``python -m compbias.platform.audit.cli``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from compbias.platform.audit.settings import (
    DEFAULT_TTL_SECONDS,
    DEFAULT_WORKERS,
    AuditOptions,
    AuditSettings,
    default_cache_dir,
    parse_interval,
)
from compbias.platform.audit.summary import latest_audit, print_summary

#: Time between two passes of ``--watch``.
DEFAULT_INTERVAL = "10m"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the audit's options to an argument parser, in groups.

    Every setting the study file's ``audit:`` section has defaults to None
    here ("as in the study file"); the help texts name the effective
    defaults (:class:`~compbias.platform.audit.settings.AuditSettings`).
    Importing this module loads neither MLflow nor pandas.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    sel = parser.add_argument_group("selection (none: every registered version not yet audited by this metrics version)")
    sel.add_argument("--model", "--registered-model", dest="registered_model", help="audit the versions of this registered model")
    sel.add_argument("--study", help="audit the versions tagged with this study (compbias.study)")
    sel.add_argument("--version", dest="versions", action="append", default=[], metavar="NAME/VERSION",
                     help="audit this model version (repeatable), e.g. compbias-digits/3")
    sel.add_argument("--force", action="store_true", help="with --model/--study: audit again versions already audited")
    ev = parser.add_argument_group("bring your own models (docs/bring-your-own.md)")
    ev.add_argument("--evaluate", type=Path, metavar="SPEC.yaml",
                    help="first evaluate the selected versions that carry the lineage tags but have no predictions on the "
                         "dataset this evaluation spec names, and log their predictions (with --watch: on every pass)")
    ev.add_argument("--allow-pickle", action="store_true",
                    help="with --evaluate: also load pickled models and pyfuncs; loading them executes code stored with "
                         "the model, so only for registries whose writers you trust")
    thr = parser.add_argument_group("thresholds (override the study file's audit.thresholds)")
    thr.add_argument("--max-cev", type=float, help="fail versions whose CEV exceeds this")
    thr.add_argument("--max-sde", type=float, help="fail versions whose SDE exceeds this")
    thr.add_argument("--max-worst-group-fpr-change", type=float, help="fail versions whose worst group FPR change (%%) exceeds this")
    thr.add_argument("--max-acc-drop", type=float, help="fail versions losing more accuracy than this (percentage points)")
    d = AuditSettings()  # the defaults, as the study file's schema (and AuditSettings) define them
    opt = parser.add_argument_group("computation")
    opt.add_argument("--alias", help=f"alias given to the newest passing version (default: the study file's, {d.alias})")
    opt.add_argument("--cie-fraction", type=float, action="append", dest="cie_fractions", metavar="Q",
                     help="CIE set size as a fraction, e.g. 0.01 (repeatable; default: the study file's, "
                          f"{','.join(f'{q:g}' for q in d.cie_fractions)})")
    opt.add_argument("--bootstrap", type=int, help=f"bootstrap resamples for confidence intervals (0: none; default: the study file's, {d.bootstrap})")
    opt.add_argument("--confidence", type=float, default=None, help=f"confidence level of the intervals (default {d.confidence:g})")
    opt.add_argument("--intervals", choices=("two_level", "examples"),
                     help="what the bootstrap resamples: models (seeds, each with its own baseline) and test examples, "
                          f"or test examples only with the models fixed (default: the study file's, {d.intervals})")
    opt.add_argument("--probe-size", type=int, help=f"probe examples for SVCCA/CKA (default: the study file's, {d.probe_size})")
    opt.add_argument("--no-similarity", action="store_true", help="skip SVCCA/CKA (no model weights are loaded)")
    opt.add_argument("--no-figures", action="store_true", help="skip figures (tables and report only)")
    opt.add_argument("--no-gallery", action="store_true", help="skip the CIE image gallery (it loads the study's dataset)")
    opt.add_argument("--seed", type=int, default=None, help=f"seed of the bootstrap and the probe set (default {d.seed})")
    opt.add_argument("--smoothing", type=float, default=None,
                     help="additive smoothing of the rates, so a zero baseline rate still gives a defined change "
                          f"(default {d.smoothing:g}: such classes are dropped from CEV/SDE)")
    out = parser.add_argument_group("output and service")
    out.add_argument("--experiment", help="experiment of the audit run (default: the study's experiment)")
    out.add_argument("--output-dir", type=Path, help="also copy the report, tables and figures here")
    out.add_argument("--cache-dir", type=Path, default=None, help=f"artifact cache (default {default_cache_dir()})")
    out.add_argument("--no-cache", action="store_true", help="do not cache downloaded artifacts")
    out.add_argument("--workers", type=int, default=None, help=f"parallel artifact downloads (default {DEFAULT_WORKERS})")
    out.add_argument("--claim-ttl", default=None,
                     help=f"after this long without a heartbeat a claim is taken over (default {_duration(DEFAULT_TTL_SECONDS)})")
    out.add_argument("--watch", action="store_true", help="audit new versions on a schedule until stopped")
    out.add_argument("--interval", default=DEFAULT_INTERVAL,
                     help=f"time between passes with --watch, e.g. 30s, 10m, 1h (default {DEFAULT_INTERVAL})")
    out.add_argument("--max-passes", type=int, help=argparse.SUPPRESS)
    out.add_argument("--json", action="store_true", help="print the results as JSON")


def options_from_args(args: argparse.Namespace) -> AuditOptions:
    """Build :class:`AuditOptions` from parsed arguments (options not given are left to the study file).

    Raises
    ------
    ValueError
        On an invalid value (named in the message).
    """
    from compbias.platform.audit.selection import parse_version_spec

    thresholds = {
        "cev": args.max_cev,
        "sde": args.max_sde,
        "worst_group_fpr_change": args.max_worst_group_fpr_change,
        "acc_drop": args.max_acc_drop,
    }
    if args.cie_fractions and any(not (0 < q <= 1) for q in args.cie_fractions):
        raise ValueError(f"--cie-fraction must be in (0, 1], got {args.cie_fractions}")
    if args.bootstrap is not None and args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.confidence is not None and not (0 < args.confidence < 1):
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.smoothing is not None and args.smoothing < 0:
        raise ValueError(f"--smoothing must be >= 0, got {args.smoothing}")
    if args.probe_size is not None and args.probe_size < 1:
        raise ValueError(f"--probe-size must be >= 1, got {args.probe_size}")
    for spec in args.versions:
        parse_version_spec(spec)
    service = {"workers": args.workers, "claim_ttl": parse_interval(args.claim_ttl) if args.claim_ttl else None}
    return AuditOptions(
        {
            "thresholds": {k: v for k, v in thresholds.items() if v is not None},
            "alias": args.alias,
            "cie_fractions": tuple(args.cie_fractions) if args.cie_fractions else None,
            "bootstrap": args.bootstrap,
            "probe_size": args.probe_size,
            "confidence": args.confidence,
            "seed": args.seed,
            "smoothing": args.smoothing,
            "intervals": args.intervals,
        },
        similarity=not args.no_similarity,
        experiment=args.experiment,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        output_dir=args.output_dir,
        figures=not args.no_figures,
        gallery=not args.no_gallery,
        **{k: v for k, v in service.items() if v is not None},
    )


def run(args: argparse.Namespace) -> int:
    """Run ``compbias audit``; a tracking server refusing access is one line, not a trace.

    Parameters
    ----------
    args : argparse.Namespace
        From a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        As :func:`_run`, or 2 when the tracking server refused the credentials.
    """
    from compbias.platform.tracking import tracking_error_message

    try:
        return _run(args)
    except Exception as exc:
        message = tracking_error_message(exc)
        if message is None:
            raise
        print(f"compbias audit: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """Run ``compbias audit`` with parsed arguments.

    Parameters
    ----------
    args : argparse.Namespace
        From a parser prepared by :func:`add_arguments`.

    Returns
    -------
    int
        0 on success (including "nothing to audit"), 2 on invalid input, 1
        when an audit failed to run.
    """
    from compbias.platform.audit.selection import Selection
    from compbias.platform.audit.service import run_audit
    from compbias.platform.audit.watch import watch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = options_from_args(args)
        interval = parse_interval(args.interval)
    except ValueError as exc:
        print(f"compbias audit: {exc}", file=sys.stderr)
        return 2
    selection = Selection(registered_model=args.registered_model, study=args.study,
                          versions=tuple(args.versions), force=args.force)
    spec = None
    if args.evaluate is not None:
        from compbias.platform.evaluate import EvaluationError, load_spec

        try:
            spec = load_spec(args.evaluate)
        except EvaluationError as exc:
            print(f"compbias audit: {exc}", file=sys.stderr)
            return 2
    elif args.allow_pickle:
        print("compbias audit: --allow-pickle applies to --evaluate SPEC.yaml only (models are loaded only to evaluate them)",
              file=sys.stderr)
        return 2

    from compbias.platform.tracking import configure_tracking

    client = configure_tracking()  # MLFLOW_TRACKING_URI; the registry in the same store
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

    def show(results):
        for r in results:
            if args.json:
                print(json.dumps({"run_id": r.run_id, "study": r.study, "registered_model": r.registered_model,
                                  "statuses": r.statuses, "reasons": r.reasons, "report": r.report_path,
                                  "alias_version": r.alias_version, "timings": r.timings}, default=str))
            else:
                print_summary(r)

    if args.watch:
        if not selection.empty:
            print("compbias audit: --watch audits every new version; drop --model/--study/--version", file=sys.stderr)
            return 2
        if spec is not None:
            return _watch_with_evaluation(client, options, spec, args, interval, show, say)
        try:
            watch(client, options, interval=interval, max_passes=args.max_passes, on_pass=show, progress=say)
        except KeyboardInterrupt:
            say("stopped")
        return 0
    if spec is not None:
        code = _evaluate_selection(client, selection, spec, args, say)
        if code:
            return code
    try:
        results = run_audit(client, selection, options, progress=say)
    except ValueError as exc:
        print(f"compbias audit: {exc}", file=sys.stderr)
        return 2
    show(results)
    if not results and not args.json:
        last = latest_audit(client, args.study)
        if last is not None:
            print("nothing new to audit; the latest audit:")
            print_summary(last)
    return 0


def _evaluate_selection(client, selection, spec, args: argparse.Namespace, say) -> int:
    """Evaluate the selected versions without predictions; 0 when all (or none) were, 2 otherwise."""
    from compbias.platform.evaluate import EvaluationError, evaluate_versions, pending_versions

    try:
        todo, _ = pending_versions(client, selection, force=args.force, registered_models=spec.registered_models)
    except ValueError as exc:
        print(f"compbias audit: {exc}", file=sys.stderr)
        return 2
    if not todo:
        return 0
    say(f"evaluating {len(todo)} version(s) without predictions with {args.evaluate}")
    try:
        report = evaluate_versions(client, todo, spec, allow_pickle=args.allow_pickle, progress=say)
    except EvaluationError as exc:
        print(f"compbias audit: {exc}", file=sys.stderr)
        return 2
    if report.errors:
        for reason in report.errors.values():
            print(f"compbias audit: {reason}", file=sys.stderr)
        print(f"compbias audit: {len(report.errors)} version(s) could not be evaluated, so nothing was audited; fix them "
              "or leave them out (--version NAME/VERSION for the others)", file=sys.stderr)
        return 2
    return 0


def _watch_with_evaluation(client, options: AuditOptions, spec, args: argparse.Namespace, interval: float, show, say) -> int:
    """``--watch --evaluate``: each pass evaluates new versions without predictions, then audits.

    A version that cannot be evaluated is tagged ``error`` with the reason
    (nothing else is written for it), so later passes do not retry it.
    """
    import time

    from compbias.platform.audit.watch import watch
    from compbias.platform.evaluate import EvaluationError, evaluate_versions, load_data, pending_versions, tag_errors

    try:
        data = load_data(spec)  # once: a spec whose data cannot load stops the watch before any pass
    except EvaluationError as exc:
        print(f"compbias audit: {exc}", file=sys.stderr)
        return 2
    passes = 0
    try:
        while args.max_passes is None or passes < args.max_passes:
            start = time.monotonic()
            try:
                todo, _ = pending_versions(client, registered_models=spec.registered_models)
                if todo:
                    report = evaluate_versions(client, todo, spec, allow_pickle=args.allow_pickle, data=data, progress=say)
                    tag_errors(client, todo, report.errors)
                    for reason in report.errors.values():
                        say(f"cannot evaluate (tagged error; fix it and run compbias audit --evaluate SPEC --version NAME/VERSION): {reason}")
            except Exception as exc:  # a failing pass must not end the watch
                logging.getLogger("compbias.audit").exception("evaluation pass failed")
                say(f"evaluation pass failed: {type(exc).__name__}: {exc}; retrying in {interval:.0f}s")
            watch(client, options, interval=interval, max_passes=1, on_pass=show, progress=say)
            passes += 1
            if args.max_passes is not None and passes >= args.max_passes:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
    except KeyboardInterrupt:
        say("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m compbias.platform.audit.cli``."""
    parser = argparse.ArgumentParser(prog="compbias audit", description="Audit registered model versions for compression-induced bias.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

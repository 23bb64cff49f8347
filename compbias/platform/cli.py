"""The ``compbias`` command line.

::

    compbias study CONFIG [--data-root DIR] [--seeds N|0,1,2] [--executor ray|local]
    compbias train CONFIG [--data-root DIR] [--seeds ...]          # baselines only
    compbias compress CONFIG [--method M ...] [--level L ...]      # from finished baselines
    compbias audit [--study S] [--model M] [--max-cev X] ...        # see compbias audit --help
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

from compbias.platform.cli_register import add_register_parser, run_register

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
    _add_audit_parser(sub)
    add_register_parser(sub)
    return parser


def _add_audit_parser(sub) -> None:
    """``compbias audit``: the audit's options, in the groups :func:`compbias.platform.audit.cli.add_arguments` makes."""
    help_ = "audit registered model versions of a study (compbias.platform.audit)"
    try:
        audit_cli = importlib.import_module("compbias.platform.audit.cli")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("compbias.platform.audit"):
            raise
        p = sub.add_parser("audit", help=help_, add_help=False, prefix_chars="\0")  # takes any arguments
        p.add_argument("audit_args", nargs=argparse.REMAINDER)
        p.set_defaults(handler=_audit_missing)
        return
    p = sub.add_parser("audit", help=help_, description="Audit registered model versions for compression-induced bias.")
    audit_cli.add_arguments(p)
    p.set_defaults(handler=audit_cli.run)


def _audit_missing(args) -> int:
    print("compbias audit: the audit service (compbias.platform.audit.cli) is not installed in this version", file=sys.stderr)
    return 2


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
    if argv[:1] == ["audit"]:  # the MLproject's audit entry passes every option, empty when not given
        argv = ["audit", *drop_empty_options(argv[1:])]
    args = build_parser().parse_args(argv)
    if args.command == "audit":
        return int(args.handler(args) or 0)
    if args.command == "register":
        return run_register(args)
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

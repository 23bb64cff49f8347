"""MLflow side of a study: experiment, runs, artifacts, registry, resume state.

Only the driver calls these functions (never a Ray worker), so a local SQLite
store has a single writer. Conventions (``docs/architecture.md``):

- experiment per study, a parent run per execution (``compbias.run_kind=study``),
  a nested child run per model (``compbias.run_kind=model``);
- child runs carry params, metrics (``acc``, ``fpr/class/<c>``,
  ``fnr/class/<c>``, ``fpr/group/<g>``, ``fnr/group/<g>``, ``sparsity``,
  ``size_bytes``), artifacts (``predictions.parquet``, ``rates/*.parquet``,
  ``study.yaml``) and the pyfunc model ``model``;
- every model is registered as a version of the study's registered model,
  with the run's ``compbias.*`` tags, only after all its artifacts are logged.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import functools
import importlib.metadata
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, ViewType
from mlflow.exceptions import MlflowException

from compbias.platform.config import StudySpec
from compbias.platform.plan import ModelTask
from compbias.platform.tasks import TaskResult, write_model_files

__all__ = [
    "TAG",
    "configure_tracking",
    "use_sqlite_wal",
    "sqlite_store_path",
    "ensure_experiment",
    "ensure_registered_model",
    "start_parent_run",
    "finish_run",
    "model_tags",
    "model_metrics",
    "log_model_run",
    "log_failed_run",
    "ResumeState",
    "FinishedModel",
    "scan_study",
    "download_model_files",
    "version_model_files",
    "metric_key",
    "Stopwatch",
    "TrackingUnavailableError",
    "check_tracking_reachable",
    "tracking_error_message",
]

log = logging.getLogger("compbias.tracking")

TAG = "compbias."
ARTIFACT_ROOT_ENV = "COMPBIAS_ARTIFACT_ROOT"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
_MODEL_REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scipy",
    "numba",
    "scikit-learn",
    "safetensors",
    "pyarrow",
    "pyyaml",
    "pydantic",
    "pillow",
    "mlflow",
)


class Stopwatch:
    """Accumulates the wall time spent inside ``with stopwatch:`` blocks.

    Attributes
    ----------
    seconds : float
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0


def tracking_error_message(exc: BaseException, tracking_uri: str | None = None) -> str | None:
    """One line a user can act on for an MLflow error that refuses access, else None.

    Parameters
    ----------
    exc : BaseException
        The error raised by an MLflow client call.
    tracking_uri : str, optional
        The store that was used (default: MLflow's current tracking URI).

    Returns
    -------
    str or None
        The message for HTTP 401 (credentials refused) and 403 (permission
        denied) answers of a tracking server; None for anything else.
    """
    from mlflow.exceptions import MlflowException

    where = tracking_uri or mlflow.get_tracking_uri()
    if isinstance(exc, TrackingUnavailableError):
        return str(exc)
    if not isinstance(exc, MlflowException):
        return None
    text = str(exc)
    if "Max retries exceeded" in text or "Failed to establish a new connection" in text:
        return (
            f"the tracking server {where} stopped answering (MLflow gave up after its retries); start it again "
            "and re-run the same command: finished models are kept and not made again"
        )
    if exc.error_code == "UNAUTHENTICATED":
        return (
            f"the tracking server {where} refused the credentials (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or the [mlflow] section of "
            "~/.mlflow/credentials) to an account of that server"
        )
    if exc.error_code == "PERMISSION_DENIED":
        return (
            f"the tracking server {where} denied this account access (HTTP 403): ask its admin "
            "for EDIT on the study's experiment and registered model, or use the account that created them"
        )
    return None


def configure_tracking(tracking_uri: str | None = None) -> MlflowClient:
    """Point MLflow at a store and return a client; the registry uses the same URI.

    A local SQLite store is put in WAL mode first (:func:`use_sqlite_wal`).

    Parameters
    ----------
    tracking_uri : str, optional
        Defaults to ``MLFLOW_TRACKING_URI`` or MLflow's own default.

    Returns
    -------
    MlflowClient
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    check_tracking_reachable(uri)
    use_sqlite_wal(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_WAL_FILES: set[str] = set()


def sqlite_store_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI, else None.

    Parameters
    ----------
    uri : str
        A tracking URI, e.g. ``sqlite:////abs/mlflow.db`` or ``sqlite:///mlflow.db``
        (relative to the current directory).

    Returns
    -------
    pathlib.Path or None
        The absolute path of the file; None for other stores and in-memory databases.
    """
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # not a URL SQLAlchemy accepts: MLflow will say so
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _sqlite_connect_pragmas(dbapi_connection, connection_record) -> None:
    """SQLAlchemy ``connect`` hook: ``synchronous=NORMAL`` on connections to a store put in WAL mode here."""
    import sqlite3

    if not _WAL_FILES or not isinstance(dbapi_connection, sqlite3.Connection):
        return
    try:
        files = {os.path.realpath(row[2]) for row in dbapi_connection.execute("PRAGMA database_list") if row[1] == "main" and row[2]}
        if files & _WAL_FILES:
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:  # pragma: no cover - the connection stays at SQLite's defaults
        log.debug("could not set synchronous=NORMAL", exc_info=True)


@functools.lru_cache(maxsize=1)
def _install_connect_hook() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _sqlite_connect_pragmas)


def use_sqlite_wal(uri: str) -> bool:
    """Put a local SQLite tracking store in WAL mode, with ``synchronous=NORMAL`` for this process.

    In its default (rollback-journal) mode SQLite syncs the database file and
    its journal to disk at every commit, and a model run takes about eight
    commits. In WAL mode (a persistent property of the file, kept by every
    later user of the store) a commit appends to the write-ahead log, readers
    do not block the writer, and with ``synchronous=NORMAL`` (set on every
    connection this process opens to the file) the log is synced at
    checkpoints rather than at each commit. A process killed at any point
    loses nothing committed; a power cut or OS crash can lose the last
    commits, never the database, and always a suffix of them, so the order
    "artifacts, then the registered version, then the run FINISHED" still
    holds for what survives (:func:`scan_study` cleans up the rest). WAL
    needs all users of the file on one machine (not a network file system),
    as SQLite stores shared by several processes already do. A file that
    cannot be switched (read-only, locked for 30 s) stays as it is.

    The database file is created when it does not exist yet; MLflow creates
    its tables on first use as before.

    Parameters
    ----------
    uri : str
        The tracking URI; anything but a ``sqlite:`` file URI is left alone.

    Returns
    -------
    bool
        True when the store is in WAL mode.
    """
    import sqlite3

    path = sqlite_store_path(uri)
    if path is None or not path.parent.is_dir():
        return False
    try:
        con = sqlite3.connect(str(path), timeout=30)
        try:
            mode = str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.warning("SQLite store %s stays in its journal mode (could not switch to WAL: %s)", path, exc)
        return False
    if mode != "wal":
        log.warning("SQLite store %s stays in journal mode %r (WAL was refused)", path, mode)
        return False
    _install_connect_hook()
    _WAL_FILES.add(os.path.realpath(path))
    return True


class TrackingUnavailableError(RuntimeError):
    """The tracking server named by the tracking URI does not answer at all."""


def check_tracking_reachable(uri: str | None = None, *, attempts: int = 3, timeout: float = 3.0, pause: float = 1.0) -> None:
    """Fail within seconds when an HTTP(S) tracking server does not answer.

    MLflow's client retries a refused connection for about four minutes
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with backoff factor 2) before it
    raises; that is right for a server restarting in the middle of a study,
    and wrong for a URI that points nowhere. So before the first call, a few
    short probes of ``<uri>/health``: any HTTP answer (even 401 or 404)
    counts; only connection failures and timeouts do not. Local stores
    (``sqlite:``, ``file:``, paths) are not probed.

    Parameters
    ----------
    uri : str, optional
        Default: MLflow's current tracking URI.
    attempts : int
        Probes before giving up.
    timeout : float
        Seconds per probe.
    pause : float
        Seconds between probes.

    Raises
    ------
    TrackingUnavailableError
        Naming the URI and what to do.
    """
    from urllib.parse import urlparse

    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    reason = ""
    for i in range(max(1, attempts)):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
            return
        except requests.exceptions.SSLError:
            return  # it answers; TLS settings are MLflow's business (MLFLOW_TRACKING_SERVER_CERT_PATH ...)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            reason = "no answer within %gs" % timeout if isinstance(exc, requests.exceptions.Timeout) else "connection refused or host unreachable"
        if i + 1 < attempts:
            time.sleep(pause)
    raise TrackingUnavailableError(
        f"the tracking server {uri} does not answer ({reason}, {attempts} tries); start it, or point "
        "MLFLOW_TRACKING_URI (or --tracking-uri) at a running server"
    )


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, created (or restored if deleted) as needed.

    A new experiment stores its artifacts under ``$COMPBIAS_ARTIFACT_ROOT/<name>``
    when that variable is set (a directory or a URI), else where the tracking
    store puts them by default (``./mlruns`` of the current directory for a
    local SQLite store; the server's root for a tracking server).

    Parameters
    ----------
    client : MlflowClient
    name : str

    Returns
    -------
    str
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = os.environ.get(ARTIFACT_ROOT_ENV)
        location = None
        if root:
            base = root if "://" in root else Path(root).expanduser().resolve().as_uri()
            location = f"{base.rstrip('/')}/{metric_key(name)}"
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def ensure_registered_model(client: MlflowClient, spec: StudySpec) -> str:
    """Create the study's registered model if needed.

    Parameters
    ----------
    client : MlflowClient
    spec : StudySpec

    Returns
    -------
    str
        The registered model's name.
    """
    name = spec.registered_model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                tags={f"{TAG}study": spec.name},
                description=f"Models of the compbias study {spec.name!r} (baselines and compressed).",
            )
        except MlflowException:
            client.get_registered_model(name)  # created concurrently
    return name


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = "null" if data is None else str(data)
    return out


def start_parent_run(
    client: MlflowClient,
    experiment_id: str,
    spec: StudySpec,
    study_text: str,
    *,
    step: str = "study",
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Start the parent run of one execution and log the study file and resolved config.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    spec : StudySpec
    study_text : str
        The study file as given (logged as ``study.yaml``).
    step : str
        ``study``, ``train`` or ``compress`` (tag ``compbias.step``).
    extra_tags : dict, optional

    Returns
    -------
    str
        The run id.
    """
    tags = {f"{TAG}run_kind": "study", f"{TAG}study": spec.name, f"{TAG}step": step}
    tags.update(extra_tags or {})
    run = client.create_run(experiment_id, run_name=f"{spec.name}-{step}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    rid = run.info.run_id
    try:
        params = [Param(k, v[:6000]) for k, v in _flatten(spec.resolved()).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i : i + 100])
        client.log_text(rid, study_text, "study.yaml")
        client.log_text(rid, spec.to_yaml(), "resolved.yaml")
    except BaseException as exc:  # e.g. an unwritable artifact location: the run must not stay RUNNING
        try:
            client.set_tag(rid, f"{TAG}error", f"{type(exc).__name__}: {exc}"[:5000])
            finish_run(client, rid, False)
        except Exception:  # pragma: no cover - the store itself is gone
            log.exception("could not mark run %s as failed", rid)
        raise
    return rid


def finish_run(client: MlflowClient, run_id: str, ok: bool) -> None:
    """End a run as FINISHED or FAILED.

    Parameters
    ----------
    client : MlflowClient
    run_id : str
    ok : bool
    """
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def metric_key(text: str) -> str:
    """Make a metric-key component out of a class or group name.

    Keeps letters, digits and ``_ - .``; everything else becomes ``_``.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
    """
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_")
    return s or "_"


def model_tags(spec: StudySpec, task: ModelTask, *, node_id: str, baseline: "FinishedModel | None" = None) -> dict[str, str]:
    """The ``compbias.*`` tags of a model run and of its registered version.

    Parameters
    ----------
    spec : StudySpec
    task : ModelTask
    node_id : str
        The Ray node that ran the task.
    baseline : FinishedModel, optional
        The baseline a compressed model came from.

    Returns
    -------
    dict of str to str
    """
    tags = {
        f"{TAG}run_kind": "model",
        f"{TAG}study": spec.name,
        f"{TAG}role": task.role,
        f"{TAG}method": task.method,
        f"{TAG}level": task.level,
        f"{TAG}seed": str(task.seed),
        f"{TAG}ray_node": node_id,
        f"{TAG}spec_hash": spec.model_fingerprint(task.compression_index),
    }
    if baseline is not None:
        tags[f"{TAG}baseline_version"] = str(baseline.version)
        tags[f"{TAG}baseline_run_id"] = baseline.run_id
    return tags


def _class_column(df: pd.DataFrame) -> str:
    for c in ("class", "class_id", "label", "cls"):
        if c in df.columns:
            return c
    raise KeyError(f"per-class table has no class column (columns: {list(df.columns)})")


def _group_column(df: pd.DataFrame) -> str:
    for c in ("group", "group_name", "name"):
        if c in df.columns:
            return c
    raise KeyError(f"per-group table has no group column (columns: {list(df.columns)})")


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


_NOT_METRICS = {"level", "seconds"}


def _int_or_text(x: Any) -> str:
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return str(int(x))
    return str(x)


def model_metrics(result: TaskResult) -> dict[str, float]:
    """The metrics of one model run.

    ``acc`` from the predictions; ``fpr/class/<c>`` and ``fnr/class/<c>`` from
    the per-class table; ``fpr/group/<g>`` and ``fnr/group/<g>`` from the
    per-group table; ``sparsity``, ``size_bytes`` and other numeric entries of
    the job's info. Undefined rates (NaN) are not logged.

    Parameters
    ----------
    result : TaskResult

    Returns
    -------
    dict of str to float
    """
    pred = result.predictions
    m: dict[str, float] = {"acc": float((pred["pred"].to_numpy() == pred["label"].to_numpy()).mean())}
    pc = result.per_class
    if len(pc):
        names = pc[_class_column(pc)].tolist()
        for rate in ("fpr", "fnr"):
            if rate in pc.columns:
                for name, value in zip(names, pc[rate].tolist()):
                    if _finite(value):
                        m[f"{rate}/class/{metric_key(_int_or_text(name))}"] = float(value)
    pg = result.per_group
    if len(pg):
        names = [metric_key(g) for g in pg[_group_column(pg)].tolist()]
        if "class" in pg.columns and pg["class"].nunique() > 1:  # multi-class: one row per (group, class)
            names = [f"{g}/class/{metric_key(_int_or_text(c))}" for g, c in zip(names, pg["class"].tolist())]
        for rate in ("fpr", "fnr"):
            if rate in pg.columns:
                for name, value in zip(names, pg[rate].tolist()):
                    if _finite(value):
                        m[f"{rate}/group/{name}"] = float(value)
        acc_col = "accuracy" if "accuracy" in pg.columns else ("acc" if "acc" in pg.columns else None)
        if acc_col:
            for g, value in zip(pg[_group_column(pg)].tolist(), pg[acc_col].tolist()):
                if _finite(value):
                    m[f"acc/group/{metric_key(g)}"] = float(value)
    for k, v in result.info.items():
        if k in _NOT_METRICS or isinstance(v, (bool, np.bool_)):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and _finite(v):
            m[metric_key(k)] = float(v)
    m["task_seconds"] = float(result.seconds)
    return m


def _series(info: dict[str, Any]) -> dict[str, list[float]]:
    out = {}
    for k, v in info.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and _finite(x) for x in v):
            out[metric_key(k)] = [float(x) for x in v]
    return out


def _model_params(spec: StudySpec, task: ModelTask) -> dict[str, str]:
    p = {
        "seed": str(task.seed),
        "method": task.method,
        "level": task.level,
        "role": task.role,
        "dataset.kind": spec.dataset.kind,
        "model.arch": spec.model.arch,
        "model.width": str(spec.model.width),
    }
    p.update({f"train.{k}": str(v) for k, v in spec.train.model_dump().items()})
    if task.compression_index is not None:
        entry = spec.compression[task.compression_index]
        p.update(
            {
                "compression.method": entry.method,
                "compression.schedule": str(entry.schedule),
                "compression.finetune_epochs": str(entry.finetune_epochs),
                "compression.mitigation": str(entry.mitigation),
            }
        )
    return p


@functools.lru_cache(maxsize=1)
def _requirements() -> list[str]:
    reqs = []
    for name in _MODEL_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs  # cached: reading package metadata costs ~0.1 s per call


_SCRATCH: dict[str, Path] = {}


def _scratch_dir() -> Path:
    """This process's directory for the pyfunc templates and the code copy, removed at exit."""
    d = _SCRATCH.get("dir")
    if d is None or not d.is_dir():
        d = Path(tempfile.mkdtemp(prefix="compbias-pyfunc-"))
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        _SCRATCH["dir"] = d
    return d


def _package_copy() -> Path:
    """A copy of the compbias sources a served model needs (the package root, jobs, metrics).

    Shipped with each model (``code_paths``) so that ``mlflow models serve``
    works where compbias is not installed; made once per process.
    """
    root = _scratch_dir() / "code" / "compbias"
    if not (root / "__init__.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", "metrics"):
            shutil.copytree(PACKAGE_DIR / sub, root / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        shutil.copy2(PACKAGE_DIR / "__init__.py", root / "__init__.py")  # last: marks the copy complete
    return root


def _signature(input_shape: tuple[int, ...]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([ColSpec("long", "pred"), ColSpec("double", "prob")]),
    )


@contextlib.contextmanager
def _pinned_requirements_trusted():
    """Skip MLflow's check of the model's requirements against this environment.

    ``mlflow.pyfunc.save_model`` maps every installed package to its modules
    (reading each distribution's file list: ~1 s here) to warn about
    requirements the environment does not satisfy. Ours are the versions
    installed in this very environment (:func:`_requirements`; a missing
    package is listed without a version), so the most it could report is
    that the driver lacks a package the served model will install. It only
    warns: the saved files are the same without it. If MLflow moves the
    function, the check simply runs.
    """
    import mlflow.utils.environment as env

    real = getattr(env, "warn_dependency_requirement_mismatches", None)
    if real is None:
        yield
        return
    env.warn_dependency_requirement_mismatches = lambda *args, **kwargs: None
    try:
        yield
    finally:
        env.warn_dependency_requirement_mismatches = real


@dataclass
class _Template:
    """A pyfunc model saved by MLflow once per input shape, cloned for every model."""

    directory: Path
    mlmodel: dict[str, Any]  # its MLmodel, parsed
    weights_path: str  # the ``weights`` artifact's directory inside the model, posix
    weights_bytes: int  # size of the template's own weights (model_size_bytes counts them)


_TEMPLATES: dict[tuple[int, ...], _Template] = {}


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _template(input_shape: tuple[int, ...], weights: Path) -> _Template:
    from mlflow.models import Model

    key = tuple(int(x) for x in input_shape)
    tpl = _TEMPLATES.get(key)
    if tpl is not None and (tpl.directory / "MLmodel").is_file():
        return tpl
    directory = Path(tempfile.mkdtemp(prefix="template-", dir=_scratch_dir())) / "model"
    with warnings.catch_warnings(), _pinned_requirements_trusted():
        # the signature is given explicitly; an input example would make
        # MLflow load the model here just to validate it
        warnings.filterwarnings("ignore", message=".*input[ _]example.*", category=UserWarning)
        mlflow.pyfunc.save_model(
            str(directory),
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights)},
            code_paths=[str(_package_copy())],
            signature=_signature(key),
            pip_requirements=_requirements(),
        )
    mlmodel = Model.load(str(directory / "MLmodel")).to_dict()
    weights_path = mlmodel["flavors"]["python_function"]["artifacts"]["weights"]["path"]
    tpl = _Template(directory, mlmodel, weights_path, _tree_bytes(directory / weights_path))
    _TEMPLATES[key] = tpl
    return tpl


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the template's files are never written to again
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _save_pyfunc(model_dir: Path, weights: Path, input_shape: tuple[int, ...], metadata: dict[str, Any]) -> None:
    """Write the pyfunc model of one set of weights into ``model_dir``.

    The first model of an input shape in a process is saved by
    ``mlflow.pyfunc.save_model`` (models from code, explicit signature and
    requirements); it becomes a template. Every model is a clone of the
    template: its files (code, environment files, ``pyfunc_model.py``) hard
    linked, the model's own weights as the ``weights`` artifact, and a fresh
    ``MLmodel`` (new ``model_uuid``, creation time, metadata, weights location
    and ``model_size_bytes``). These are the files MLflow would write, without
    re-resolving the requirements and re-copying the code for every model.
    """
    from mlflow.models import Model

    tpl = _template(input_shape, weights)
    skip = {"MLmodel", tpl.weights_path}
    for dirpath, dirnames, filenames in os.walk(tpl.directory):
        rel = Path(dirpath).relative_to(tpl.directory)
        dirnames[:] = [d for d in dirnames if (rel / d).as_posix() not in skip]
        (model_dir / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if (rel / name).as_posix() not in skip:
                _link_or_copy(Path(dirpath) / name, model_dir / rel / name)
    target = model_dir / tpl.weights_path
    target.mkdir(parents=True)
    for f in sorted(weights.iterdir()):
        _link_or_copy(f, target / f.name)
    mlmodel = Model.from_dict(copy.deepcopy(tpl.mlmodel))
    mlmodel.flavors["python_function"]["artifacts"]["weights"]["uri"] = str(weights)
    mlmodel.model_uuid = uuid.uuid4().hex
    mlmodel.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
    mlmodel.metadata = metadata
    if tpl.mlmodel.get("model_size_bytes") is not None:
        mlmodel.model_size_bytes = tpl.mlmodel["model_size_bytes"] - tpl.weights_bytes + _tree_bytes(target)
    mlmodel.save(str(model_dir / "MLmodel"))


@dataclass
class FinishedModel:
    """A model that is logged, finished and registered.

    Attributes
    ----------
    key : tuple
        ``(seed, method, level)``.
    run_id : str
    version : str
    metrics : dict
    spec_hash : str
    resumed : bool
        True when found from an earlier execution.
    """

    key: tuple[int, str, str]
    run_id: str
    version: str
    metrics: dict[str, float] = field(default_factory=dict)
    spec_hash: str = ""
    resumed: bool = False


def log_model_run(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    spec: StudySpec,
    study_text: str,
    result: TaskResult,
    *,
    baseline: FinishedModel | None = None,
) -> FinishedModel:
    """Log one finished task as a nested run and register its model version.

    The version is created only after every artifact is logged; if anything
    fails the run is marked FAILED and any version created is deleted.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    parent_run_id : str
    spec : StudySpec
    study_text : str
        The study as this model was made from it, logged as ``study.yaml``
        (the study job passes the resolved config, so that the dataset root
        given by ``--data-root`` reaches the audit's probe set).
    result : TaskResult
    baseline : FinishedModel, optional
        Required for compressed models: gives the lineage tags.

    Returns
    -------
    FinishedModel
    """
    task = result.task
    if task.role == "compressed" and baseline is None:
        raise ValueError(f"{task.label}: a compressed model needs its baseline's run and version")
    tags = model_tags(spec, task, node_id=result.node_id, baseline=baseline)
    run = client.create_run(
        experiment_id,
        run_name=task.label,
        tags={**tags, "mlflow.parentRunId": parent_run_id},
    )
    run_id = run.info.run_id
    version = None
    reg_name = spec.registered_model_name
    try:
        metrics = model_metrics(result)
        params = [Param(k, v) for k, v in _model_params(spec, task).items()]
        with tempfile.TemporaryDirectory(prefix="compbias-log-") as tmp:
            out = Path(tmp) / "run"
            (out / "rates").mkdir(parents=True)
            result.predictions.to_parquet(out / "predictions.parquet", index=False)
            result.per_class.to_parquet(out / "rates" / "per_class.parquet", index=False)
            result.per_group.to_parquet(out / "rates" / "per_group.parquet", index=False)
            (out / "study.yaml").write_text(study_text)
            weights = write_model_files(result.model_files, Path(tmp) / "weights")
            # The pyfunc model is saved locally and logged as the run's `model/`
            # directory (no LoggedModel entity: fewer store writes per model);
            # the registered version points at that directory. One upload for
            # the tables and the model.
            _save_pyfunc(out / "model", weights, result.input_shape, {"compbias": {k[len(TAG):]: v for k, v in tags.items()}})
            client.log_artifacts(run_id, str(out))
            now = int(time.time() * 1000)
            mlist = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for k, series in _series(result.info).items():
                mlist += [Metric(k, v, now, i) for i, v in enumerate(series)]
            for i in range(0, max(len(mlist), 1), 1000):
                client.log_batch(run_id, metrics=mlist[i : i + 1000], params=params if i == 0 else [])
            # registered last: a version exists only once every artifact is logged
            mv = client.create_model_version(
                reg_name, source=f"{run.info.artifact_uri.rstrip('/')}/model", run_id=run_id, tags=tags, await_creation_for=60
            )
            version = mv.version
        finish_run(client, run_id, True)
    except BaseException as exc:
        if version is not None:
            try:
                client.delete_model_version(reg_name, version)
            except MlflowException:  # pragma: no cover
                log.exception("could not delete version %s of %s", version, reg_name)
        try:
            client.set_tag(run_id, f"{TAG}error", f"{type(exc).__name__}: {exc}"[:5000])
            finish_run(client, run_id, False)
        except MlflowException:  # pragma: no cover
            log.exception("could not mark run %s as failed", run_id)
        raise
    return FinishedModel(key=task.key, run_id=run_id, version=str(version), metrics=metrics, spec_hash=tags[f"{TAG}spec_hash"])


def log_failed_run(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    spec: StudySpec,
    task: ModelTask,
    error: BaseException,
) -> str:
    """Record a task that raised as a FAILED child run carrying the error.

    Parameters
    ----------
    client : MlflowClient
    experiment_id, parent_run_id : str
    spec : StudySpec
    task : ModelTask
    error : BaseException

    Returns
    -------
    str
        The run id.
    """
    tags = model_tags(spec, task, node_id="unknown")
    tags[f"{TAG}error"] = f"{type(error).__name__}: {error}"[:5000]
    run = client.create_run(experiment_id, run_name=task.label, tags={**tags, "mlflow.parentRunId": parent_run_id})
    client.log_text(run.info.run_id, f"{type(error).__name__}: {error}\n", "error.txt")
    finish_run(client, run.info.run_id, False)
    return run.info.run_id


@dataclass
class ResumeState:
    """What an earlier execution of the study left behind.

    Attributes
    ----------
    done : dict
        ``(seed, method, level) -> FinishedModel`` for finished, registered models.
    interrupted : list of str
        Runs found RUNNING and now marked FAILED.
    incomplete : list of str
        Runs found FINISHED without a registered version, marked FAILED.
    deleted_versions : list of str
        Registered versions without a finished run, deleted.
    """

    done: dict[tuple[int, str, str], FinishedModel] = field(default_factory=dict)
    interrupted: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    deleted_versions: list[str] = field(default_factory=list)


def _search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def scan_study(client: MlflowClient, experiment_id: str, spec: StudySpec, *, current_run_ids: Iterable[str] = ()) -> ResumeState:
    """Find finished models of an earlier execution and clean up what it left half-done.

    Runs still RUNNING (an interrupted execution: one execution per study at a
    time) are marked FAILED; FINISHED model runs without a registered version
    are marked FAILED; registered versions whose run is not FINISHED are deleted.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    spec : StudySpec
    current_run_ids : iterable of str
        Runs of this very execution (e.g. the one ``mlflow run`` created), left alone.

    Returns
    -------
    ResumeState
    """
    state = ResumeState()
    current = set(current_run_ids)
    name = spec.name.replace("'", "\\'")
    runs = _search_all_runs(client, experiment_id, f"tags.`{TAG}study` = '{name}'")
    reg = spec.registered_model_name
    try:
        versions = list(client.search_model_versions(f"name = '{reg}'"))
    except MlflowException:
        versions = []
    version_by_run: dict[str, list] = {}
    for v in versions:
        version_by_run.setdefault(v.run_id, []).append(v)
    finished_ids = set()
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        rid = run.info.run_id
        if rid in current:
            continue
        kind = run.data.tags.get(f"{TAG}run_kind")
        status = run.info.status
        if status in (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.SCHEDULED)):
            client.set_tag(rid, f"{TAG}interrupted", "true")
            finish_run(client, rid, False)
            state.interrupted.append(rid)
            continue
        if kind != "model" or status != "FINISHED":
            continue
        vs = version_by_run.get(rid)
        if not vs:
            client.set_tag(rid, f"{TAG}incomplete", "no registered version")
            finish_run(client, rid, False)
            state.incomplete.append(rid)
            continue
        t = run.data.tags
        try:
            key = (int(t[f"{TAG}seed"]), t[f"{TAG}method"], t[f"{TAG}level"])
        except (KeyError, ValueError):
            continue
        v = max(vs, key=lambda mv: int(mv.version))
        finished_ids.add(rid)
        state.done[key] = FinishedModel(
            key=key,
            run_id=rid,
            version=str(v.version),
            metrics=dict(run.data.metrics),
            spec_hash=t.get(f"{TAG}spec_hash", ""),
            resumed=True,
        )
    for v in versions:
        if v.run_id not in finished_ids:
            client.delete_model_version(reg, v.version)
            state.deleted_versions.append(str(v.version))
    return state


def version_model_files(registered_model: str, version: str) -> dict[str, bytes]:
    """The saved-model files (weights and ``model_spec.json``) of one registered version.

    Parameters
    ----------
    registered_model : str
    version : str

    Returns
    -------
    dict of str to bytes

    Raises
    ------
    FileNotFoundError
        The version's artifacts hold no ``model_spec.json``.
    """
    from compbias.platform.tasks import model_files_from_dir

    uri = f"models:/{registered_model}/{version}"
    with tempfile.TemporaryDirectory(prefix="compbias-dl-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        hits = [p.parent for p in local.rglob("model_spec.json") if "code" not in p.parts]
        if not hits:
            raise FileNotFoundError(f"version {version} of {registered_model} has no saved weights (model_spec.json)")
        return model_files_from_dir(hits[0])


def download_model_files(client: MlflowClient, spec: StudySpec, model: FinishedModel) -> dict[str, bytes]:
    """The saved-model files (weights and spec) of a study's registered version (:func:`version_model_files`).

    Parameters
    ----------
    client : MlflowClient
    spec : StudySpec
    model : FinishedModel

    Returns
    -------
    dict of str to bytes
    """
    return version_model_files(spec.registered_model_name, model.version)

"""MLflow side of a study: experiment, runs, artifacts, registry, resume state.

Only the driver calls these functions (never a Ray worker), so a local SQLite
store has a single writer. Conventions (``docs/architecture.md``; tag and
artifact names, the member tags and ``member.json`` come from
:mod:`compbias.contract`, docs/contract.md):

- experiment per study, a parent run per execution (``compbias.run_kind=study``),
  a nested child run per model (``compbias.run_kind=model``);
- child runs carry params, metrics (``acc``, ``fpr/class/<c>``,
  ``fnr/class/<c>``, ``fpr/group/<g>``, ``fnr/group/<g>``, ``sparsity``,
  ``size_bytes``), artifacts (``predictions.parquet``, ``rates/*.parquet``,
  their CSV twins, ``member.json``, ``study.yaml``), the train and test splits as dataset
  inputs (contexts ``training`` / ``evaluation``) and one MLflow LoggedModel
  (a models-from-code pyfunc) as output; the metrics are linked to that model
  and the evaluation metrics to the test split;
- every model is registered as a version of the study's registered model
  (source ``models:/<model_id>``), with the run's ``compbias.*`` tags, only
  after all its artifacts are logged.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
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

from compbias import contract as C
from compbias.contract import metric_key
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
    "member_info",
    "model_metrics",
    "log_model_run",
    "logged_model_name",
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

TAG = C.PREFIX
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
                tags={C.STUDY: spec.name},
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
    tags = {C.RUN_KIND: C.RUN_KIND_STUDY, C.STUDY: spec.name, C.STEP: step}
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
            client.set_tag(rid, C.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
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


def model_tags(spec: StudySpec, task: ModelTask, *, node_id: str, baseline: "FinishedModel | None" = None) -> dict[str, str]:
    """The ``compbias.*`` tags of a model run and of its registered version.

    The member's lineage (:meth:`compbias.contract.Member.tags`, source
    ``study``) plus the study's own bookkeeping: ``compbias.ray_node`` and
    ``compbias.spec_hash``.

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
    extra = {C.RAY_NODE: node_id, C.SPEC_HASH: spec.model_fingerprint(task.compression_index)}
    if task.role == C.ROLE_COMPRESSED and baseline is None:
        # a task that failed before its baseline was logged: a run, never a member (no version is registered)
        return C.lineage_tags(study=spec.name, role=task.role, seed=task.seed, method=task.method, level=task.level,
                              source="study", extra=extra)
    member = C.Member(
        study=spec.name, role=task.role, seed=task.seed, method=task.method, level=task.level,
        baseline_version=str(baseline.version) if baseline is not None else None,
        baseline_run_id=baseline.run_id if baseline is not None else None,
        source="study", extra=extra,
    )
    return member.tags()


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
    """This process's directory for the code copy shipped with each pyfunc model, removed at exit."""
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


#: tag MLflow itself puts on a LoggedModel registered through ``mlflow.register_model``
_MODEL_VERSIONS_TAG = "mlflow.modelVersions"
#: tag MLflow puts on a dataset input: what the run did with it
_DATASET_CONTEXT_TAG = "mlflow.data.context"


def logged_model_name(task: ModelTask) -> str:
    """The name of a model's LoggedModel: the run name without the characters MLflow refuses there.

    MLflow refuses ``/ : . % " '`` in LoggedModel names, so ``magnitude@0.9-s2``
    becomes ``magnitude@0_9-s2``.

    Parameters
    ----------
    task : ModelTask

    Returns
    -------
    str
    """
    return re.sub(r"[/:.%\"']", "_", task.label) or "model"


def _save_pyfunc(model_dir: Path, weights: Path, input_shape: tuple[int, ...], mlflow_model) -> None:
    """Save one set of weights as a models-from-code pyfunc with MLflow's own ``save_model``.

    ``python_model`` is :mod:`compbias.platform.pyfunc_model` (nothing
    pickled), the weights directory is the artifact ``weights``, the
    signature and pip requirements are given (MLflow neither infers them
    nor loads the model to validate an example), and ``compbias.jobs`` and
    ``compbias.metrics`` ship as ``code/``. ``mlflow_model`` carries the
    LoggedModel's id, run and metadata into the ``MLmodel`` file.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input[ _]example.*", category=UserWarning)
        mlflow.pyfunc.save_model(
            str(model_dir),
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights)},
            code_paths=[str(_package_copy())],
            signature=_signature(tuple(int(x) for x in input_shape)),
            pip_requirements=_requirements(),
            mlflow_model=mlflow_model,
        )


def _log_pyfunc_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    name: str,
    weights: Path,
    input_shape: tuple[int, ...],
    tags: dict[str, str],
    params: dict[str, str],
    work_dir: Path,
) -> str:
    """Log one model as an MLflow LoggedModel produced by ``run_id``; returns its ``model_id``.

    The client-level steps of ``mlflow.pyfunc.log_model`` with an explicit
    client (``log_model`` takes the process's tracking URI and active run):
    ``create_logged_model`` (source run, ``compbias.*`` tags, the run's
    params), the run's output link (``log_outputs``), ``mlflow.pyfunc.save_model``,
    ``log_model_artifacts`` into the model's own artifact location, then the
    model is finalized READY. Unlike ``log_model`` it does not copy the
    run's metrics onto the model (one query per metric): the caller logs
    them once, with the ``model_id``. If a step fails the model is
    finalized FAILED and the error raised.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags, params=params, model_type="compbias")
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        local = work_dir / "model"
        metadata = {"compbias": {k[len(TAG):]: v for k, v in tags.items() if k.startswith(TAG)}}
        _save_pyfunc(
            local,
            weights,
            input_shape,
            Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id, metadata=metadata),
        )
        client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        _finalize_failed(client, model.model_id)
        raise
    return model.model_id


def _finalize_failed(client: MlflowClient, model_id: str | None) -> None:
    if not model_id:
        return
    from mlflow.entities import LoggedModelStatus

    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except MlflowException:  # pragma: no cover - the store itself is gone
        log.exception("could not mark logged model %s as failed", model_id)


def _dataset_source(spec: StudySpec):
    """Where a study's dataset comes from, as an MLflow dataset source."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    root = getattr(spec.dataset, "root", None)
    if spec.dataset.kind == "digits" or not root:
        loader = "sklearn.datasets.load_digits" if spec.dataset.kind == "digits" else f"compbias.jobs.load_dataset({spec.dataset.kind!r})"
        return CodeDatasetSource({"dataset": "sklearn digits" if spec.dataset.kind == "digits" else spec.dataset.kind, "loader": loader})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "can be interpreted in multiple ways": a local directory
        return resolve_dataset_source(str(Path(str(root)).expanduser().resolve()))


_DATASETS_LOGGED: dict[tuple, Any] = {}


def _dataset_entity(frame: pd.DataFrame, name: str, spec: StudySpec):
    """An MLflow dataset entity (name, digest, source, schema, profile) of one split's frame.

    ``mlflow.data.from_pandas`` with the label as target; its digest hashes
    the frame (MLflow's own digest: the first 10,000 rows and the shape).
    The entities of the last few splits are kept: every model of a study
    logs the same two.
    """
    key = (name, len(frame), tuple(frame.columns), pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    entity = _DATASETS_LOGGED.get(key)
    if entity is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # schema hints about integer columns
            ds = mlflow.data.from_pandas(frame, source=_dataset_source(spec), name=name, targets="label")
            entity = ds._to_mlflow_entity()
        if len(_DATASETS_LOGGED) >= 8:
            _DATASETS_LOGGED.pop(next(iter(_DATASETS_LOGGED)))
        _DATASETS_LOGGED[key] = entity
    return entity


def _split_datasets(spec: StudySpec, result: TaskResult) -> dict[str, Any]:
    """The dataset entities of a result's splits: ``training`` (when shipped) and ``evaluation``."""
    test = result.predictions.drop(columns=[c for c in ("pred", "prob") if c in result.predictions.columns])
    out = {"evaluation": _dataset_entity(test.reset_index(drop=True), f"{spec.dataset.kind}-test", spec)}
    if result.train_split is not None:
        out["training"] = _dataset_entity(result.train_split.reset_index(drop=True), f"{spec.dataset.kind}-train", spec)
    return out


def _is_evaluation_metric(key: str) -> bool:
    """Whether a metric was computed on the test split (it is linked to the evaluation dataset)."""
    return key == "acc" or key == "pred_ties" or key.startswith(("acc/", "fpr/", "fnr/"))


def member_info(result: TaskResult) -> C.MemberInfo | None:
    """The ``member.json`` of a model run: the dataset's classes, positive class id and group columns.

    Parameters
    ----------
    result : TaskResult

    Returns
    -------
    compbias.contract.MemberInfo or None
        None when the result does not know its number of classes (results
        made by hand in tests); the audit then falls back to the study file.
    """
    k = int(result.n_classes or len(result.class_names or []))
    if k < 2:
        return None
    names = list(result.class_names or [])
    groups = list(result.group_columns) or C.group_columns(result.predictions)
    return C.MemberInfo(
        num_classes=k,
        class_names=names if len(names) == k else None,
        positive_class=result.positive_class,
        groups=[g for g in groups if g in result.predictions.columns],
    )


def _write_tables(out: Path, result: TaskResult, study_text: str) -> None:
    """The run's contract artifacts and tables: parquet (what the audit reads), CSV twins MLflow's
    artifact viewer shows, ``member.json`` (:func:`member_info`) and ``study.yaml``."""
    (out / "rates").mkdir(parents=True)
    tables = {C.PREDICTIONS.removesuffix(".parquet"): result.predictions, "rates/per_class": result.per_class,
              "rates/per_group": result.per_group}
    for stem, frame in tables.items():
        frame.to_parquet(out / f"{stem}.parquet", index=False)
        frame.to_csv(out / f"{stem}.csv", index=False)
    info = member_info(result)
    if info is not None:
        (out / C.MEMBER_FILE).write_text(info.to_json())
    (out / C.STUDY_FILE).write_text(study_text)


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
    model_id : str
        The MLflow LoggedModel the version was registered from (empty for
        versions registered before compbias logged LoggedModels).
    """

    key: tuple[int, str, str]
    run_id: str
    version: str
    metrics: dict[str, float] = field(default_factory=dict)
    spec_hash: str = ""
    resumed: bool = False
    model_id: str = ""


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
    """Log one finished task as a nested run with its LoggedModel, and register the model version.

    In order: the run (tags, nested under the parent); its tables,
    ``member.json`` and ``study.yaml`` in one upload; the LoggedModel (``source_run_id`` = the
    run, a run output; models-from-code pyfunc in the model's own artifact
    location); the train and test splits as dataset inputs (and a
    compressed model's baseline LoggedModel as a model input); params and
    metrics in one batch, every metric linked to the model and the
    evaluation metrics to the test split; then the registered version,
    from ``models:/<model_id>``; then the run ends FINISHED. The version is
    created only after every artifact is logged; if anything fails the run
    is marked FAILED, the model FAILED, and any version created is deleted.

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
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

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
    model_id = None
    reg_name = spec.registered_model_name
    try:
        metrics = model_metrics(result)
        param_values = _model_params(spec, task)
        params = [Param(k, v) for k, v in param_values.items()]
        datasets = _split_datasets(spec, result)
        with tempfile.TemporaryDirectory(prefix="compbias-log-") as tmp:
            out = Path(tmp) / "run"
            _write_tables(out, result, study_text)
            client.log_artifacts(run_id, str(out))  # one upload: parquet tables, CSV twins, member.json, study.yaml
            weights = write_model_files(result.model_files, Path(tmp) / "weights")
            model_id = _log_pyfunc_model(
                client, experiment_id, run_id, logged_model_name(task), weights, result.input_shape, tags, param_values, Path(tmp)
            )
        inputs = [DatasetInput(ds, [InputTag(_DATASET_CONTEXT_TAG, context)]) for context, ds in sorted(datasets.items(), reverse=True)]
        models = [LoggedModelInput(baseline.model_id)] if baseline is not None and baseline.model_id else None
        client.log_inputs(run_id, datasets=inputs, models=models)
        now = int(time.time() * 1000)
        test, train = datasets["evaluation"], datasets.get("training")

        def metric(key: str, value: float, step: int, ds) -> Metric:
            if ds is None:
                return Metric(key, value, now, step, model_id=model_id, run_id=run_id)
            return Metric(key, value, now, step, model_id=model_id, dataset_name=ds.name, dataset_digest=ds.digest, run_id=run_id)

        mlist = [metric(k, v, 0, test if _is_evaluation_metric(k) else None) for k, v in metrics.items()]
        for k, series in _series(result.info).items():  # per-epoch training history: the training split
            mlist += [metric(k, v, i, train) for i, v in enumerate(series)]
        for i in range(0, max(len(mlist), 1), 1000):
            client.log_batch(run_id, metrics=mlist[i : i + 1000], params=params if i == 0 else [])
        # registered last: a version exists only once every artifact is logged
        with _tracking_uri_of(client):
            mv = client.create_model_version(
                reg_name, source=f"models:/{model_id}", run_id=run_id, tags=tags, await_creation_for=60, model_id=model_id
            )
        version = mv.version
        # what mlflow.register_model records on the model: its versions
        client.set_logged_model_tags(model_id, {_MODEL_VERSIONS_TAG: json.dumps([{"name": reg_name, "version": str(version)}])})
        finish_run(client, run_id, True)
    except BaseException as exc:
        if version is not None:
            try:
                client.delete_model_version(reg_name, version)
            except MlflowException:  # pragma: no cover
                log.exception("could not delete version %s of %s", version, reg_name)
        _finalize_failed(client, model_id)
        try:
            client.set_tag(run_id, C.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
            finish_run(client, run_id, False)
        except MlflowException:  # pragma: no cover
            log.exception("could not mark run %s as failed", run_id)
        raise
    return FinishedModel(
        key=task.key, run_id=run_id, version=str(version), metrics=metrics, spec_hash=tags[C.SPEC_HASH], model_id=model_id
    )


@contextlib.contextmanager
def _tracking_uri_of(client: MlflowClient):
    """MLflow's process-wide tracking URI set to the client's while the block runs.

    A SQL registry store resolves a ``models:/<model_id>`` source with a
    fresh ``MlflowClient()`` (the process's tracking URI, an MLflow TODO),
    not with the client that asked; for a client of another store the
    lookup would miss. :func:`configure_tracking` already sets the URI, so
    this changes nothing there.
    """
    uri = client.tracking_uri
    current = mlflow.get_tracking_uri()
    if not uri or uri == current:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(current)


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
    tags[C.ERROR] = f"{type(error).__name__}: {error}"[:5000]
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
    runs = _search_all_runs(client, experiment_id, f"tags.`{C.STUDY}` = '{name}'")
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
        kind = run.data.tags.get(C.RUN_KIND)
        status = run.info.status
        if status in (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.SCHEDULED)):
            client.set_tag(rid, C.INTERRUPTED, "true")
            finish_run(client, rid, False)
            state.interrupted.append(rid)
            continue
        if kind != "model" or status != "FINISHED":
            continue
        vs = version_by_run.get(rid)
        if not vs:
            client.set_tag(rid, C.INCOMPLETE, "no registered version")
            finish_run(client, rid, False)
            state.incomplete.append(rid)
            continue
        t = run.data.tags
        try:
            key = (int(t[C.SEED]), t[C.METHOD], t[C.LEVEL])
        except (KeyError, ValueError):
            continue
        v = max(vs, key=lambda mv: int(mv.version))
        finished_ids.add(rid)
        state.done[key] = FinishedModel(
            key=key,
            run_id=rid,
            version=str(v.version),
            metrics=dict(run.data.metrics),
            spec_hash=t.get(C.SPEC_HASH, ""),
            resumed=True,
            model_id=_version_model_id(v),
        )
    for v in versions:
        if v.run_id not in finished_ids:
            client.delete_model_version(reg, v.version)
            state.deleted_versions.append(str(v.version))
    # the LoggedModels of runs just marked FAILED: FAILED too (a killed driver leaves them PENDING)
    for run in runs:
        if run.info.run_id in state.interrupted or run.info.run_id in state.incomplete:
            outputs = getattr(getattr(run, "outputs", None), "model_outputs", None) or []
            for out in outputs:
                _finalize_failed(client, out.model_id)
    return state


def _version_model_id(version) -> str:
    """The LoggedModel a registered version was made from (``models:/<model_id>`` source), else ''."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(getattr(version, "source", "") or "")
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", source)
    return m.group(1) if m else ""


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

"""The tracking store: client set-up, reachability, SQLite WAL, error messages, experiment and registered model.

No function here sets MLflow's process-wide tracking or registry URI for
good: a caller gets an explicit :class:`~mlflow.MlflowClient` from
:func:`configure_tracking` and passes it on.  :func:`scoped_tracking_uri` is
the one place that changes the process URI, for the length of the one MLflow
call that reads it although it is given a client, and puts it back exactly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from compbias import contract as C
from compbias.contract import metric_key
from compbias.platform.config import StudySpec

__all__ = [
    "ARTIFACT_ROOT_ENV",
    "TrackingUnavailableError",
    "check_tracking_reachable",
    "configure_tracking",
    "ensure_experiment",
    "ensure_registered_model",
    "scoped_tracking_uri",
    "sqlite_store_path",
    "tracking_error_message",
    "use_sqlite_wal",
]

log = logging.getLogger("compbias.tracking")

ARTIFACT_ROOT_ENV = "COMPBIAS_ARTIFACT_ROOT"


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
    """A client of one store, tracking and registry both; MLflow's process-wide URIs are left as they are.

    The store is probed first (:func:`check_tracking_reachable`) and a local
    SQLite store is put in WAL mode (:func:`use_sqlite_wal`).

    Parameters
    ----------
    tracking_uri : str, optional
        Defaults to ``MLFLOW_TRACKING_URI`` or MLflow's own default (read, not set).

    Returns
    -------
    MlflowClient
        With ``tracking_uri`` and ``registry_uri`` both the resolved URI.
    """
    uri = str(tracking_uri) if tracking_uri else mlflow.get_tracking_uri()
    check_tracking_reachable(uri)
    use_sqlite_wal(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # what mlflow.set_*_uri export for subprocesses


@contextlib.contextmanager
def _process_uris(tracking_uri: str, registry_uri: str | None = None):
    """Set MLflow's process-wide tracking (and registry) URI for the block, then restore them exactly (see scoped_tracking_uri).

    Exactly: the module globals MLflow keeps (None when only the environment
    named the store) and the environment variables ``mlflow.set_*_uri``
    export, as MLflow's own ``_use_tracking_uri`` does for the global.
    """
    from mlflow.tracking._model_registry import utils as registry_utils  # the globals MLflow itself swaps
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None),
             {k: os.environ.get(k) for k in _URI_ENV})
    mlflow.set_tracking_uri(tracking_uri)
    if registry_uri is not None:
        mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        if registry_uri is not None:
            mlflow.set_registry_uri(saved[1])
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def scoped_tracking_uri(client: MlflowClient):
    """MLflow's process-wide tracking and registry URIs set to the client's while the block runs, then put back exactly.

    For the MLflow calls that read the process URIs although they are given
    a client or URIs: a SQL registry store resolves a ``models:/<model_id>``
    version source with a fresh ``MlflowClient()`` (an MLflow TODO), and
    MLflow's ``models:/`` artifact repository looks a version up with
    ``mlflow.get_registry_uri()`` whatever ``download_artifacts`` is told.
    For a client of another store either would miss. Not thread-safe: only
    the driver's one logging thread (or one task) calls it.

    Returns
    -------
    context manager
    """
    uri = client.tracking_uri
    registry = getattr(client, "_registry_uri", None) or uri
    if not uri or (uri == mlflow.get_tracking_uri() and registry == mlflow.get_registry_uri()):
        return contextlib.nullcontext()
    return _process_uris(uri, registry)


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


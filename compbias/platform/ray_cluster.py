"""Connecting to Ray and watching it: the local cluster's binding, the address probe, the lost-cluster watch.

:func:`init_ray` joins the cluster named by ``RAY_ADDRESS`` (probed first by
:func:`check_ray_address`) or starts a private local one on loopback;
:class:`ClusterWatch` tells the executors (:mod:`compbias.platform.orchestration`)
when the cluster has gone away, before Ray ends the driver on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "WORKER_ENV", "RAY_BIND_ENV", "EXIT_RAY_LOST", "WATCH_EVERY_S", "RayUnavailableError", "RayClusterLostError",
    "ClusterWatch", "check_ray_address", "init_ray", "local_ray_is_loopback", "ray_bind_mode",
]

log = logging.getLogger(__name__)

# numba's default OpenMP threading layer keeps its threads spinning after a
# parallel kernel (the metrics in `evaluate`), and torch's own OpenMP pool then
# runs 10-20x slower in the same process (measured: 2 fine-tuning epochs of the
# digits CNN 0.55 s -> 10 s). numba's own `workqueue` layer does not spin.
WORKER_ENV = {"NUMBA_THREADING_LAYER": "workqueue", "COMPBIAS_RAY_WORKER": "1"}


# A local Ray (no RAY_ADDRESS) listens on loopback only unless this is "all".
RAY_BIND_ENV = "COMPBIAS_RAY_BIND"
# Ray decides its node address with `ray._private.services.get_node_ip_address`:
# on Linux the address other machines reach (and its gRPC servers then listen
# on every interface); with this switch off (Ray's single-machine mode, the
# default on macOS and Windows) the node address is 127.0.0.1 and the GCS,
# raylet, object manager, runtime-env agent and every worker listen on
# loopback only. Ray 2.60 has no other bind option.
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_bind_mode() -> str:
    """Where a local Ray started by compbias listens, from ``COMPBIAS_RAY_BIND``.

    Returns
    -------
    {'loopback', 'all'}
        ``loopback`` when the variable is unset or empty.

    Raises
    ------
    ValueError
        For any other value, naming the variable and the allowed values.
    """
    mode = (os.environ.get(RAY_BIND_ENV) or "loopback").strip().lower()
    if mode not in ("loopback", "all"):
        raise ValueError(f"{RAY_BIND_ENV}={mode!r} is not understood: use 'loopback' (the default) or 'all'")
    return mode


@contextlib.contextmanager
def _single_machine_ray(on: bool):
    """Ray's single-machine (loopback) mode while a local cluster starts.

    The switch is read by the driver (``ray_constants``) and, from the
    environment, by the processes ``ray.init`` starts (GCS, raylet, agents;
    workers inherit the raylet's environment). Both are restored afterwards,
    so that nothing this process starts later (a ``ray start`` joining a real
    cluster, say) inherits the mode.
    """
    if not on:
        yield
        return
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(_RAY_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = before_env


def local_ray_is_loopback() -> bool:
    """Whether the Ray this process is connected to advertises a loopback address.

    Returns
    -------
    bool
        True when the GCS address is on 127.0.0.1 (the node then listens on
        loopback only: see :func:`init_ray`).
    """
    import ray

    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost")


def _numba_cache_dir() -> str:
    from compbias._locations import cache_dir

    d = os.environ.get("NUMBA_CACHE_DIR") or str(cache_dir("numba"))  # never into site-packages
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
    except OSError:
        d = str(Path(os.environ.get("TMPDIR", "/tmp")) / "compbias-numba")
        Path(d).mkdir(parents=True, exist_ok=True)
    return d


#: Exit code of ``compbias study/train/compress`` when the Ray cluster goes away mid-study.
EXIT_RAY_LOST = 3


class RayUnavailableError(RuntimeError):
    """No Ray cluster answers at ``RAY_ADDRESS`` (or a local one cannot be started); nothing was run."""


class RayClusterLostError(RuntimeError):
    """The Ray cluster went away mid-study: its GCS (the head) or this machine's node died.

    Models already logged are complete in MLflow; running the same command
    again resumes the study. The CLI exits with :data:`EXIT_RAY_LOST`.
    """

    exit_code = EXIT_RAY_LOST


def _split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``ray://host:port`` or ``[v6]:port``; None for anything else."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float) -> OSError | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else the error."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc


def check_ray_address(address: str | None = None, *, tries: int = 3, timeout: float = 3.0) -> None:
    """Fail fast when ``RAY_ADDRESS`` names a Ray cluster that does not answer.

    ``ray.init`` on a dead address retries for minutes ("Failed to connect
    to GCS"); this opens a plain TCP connection to the GCS port first
    (``tries`` times, ``timeout`` seconds each, 1 s apart).

    Parameters
    ----------
    address : str, optional
        Defaults to ``RAY_ADDRESS``. Unset, empty, ``auto``, ``local`` and
        anything that is not ``host:port`` (or ``ray://host:port``) are left
        to Ray.

    Raises
    ------
    RayUnavailableError
        Nothing accepts connections there, naming the address and the way out.
    """
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    parsed = _split_address(address.strip()) if address and address.strip() not in ("auto", "local") else None
    if parsed is None:
        return
    error = None
    for attempt in range(tries):
        error = _answers(*parsed, timeout)
        if error is None:
            return
        if attempt + 1 < tries:
            time.sleep(1.0)
    reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__).lower()
    raise RayUnavailableError(
        f"no Ray cluster answers at RAY_ADDRESS={address} ({reason}, {tries} tries); start the cluster "
        f"(`ray start --head` on its head), fix RAY_ADDRESS, or unset it to run on a local Ray of this machine"
    )


def _lost_after_s() -> float:
    """Seconds the GCS or the local raylet may refuse connections before the study gives up on the cluster.

    Ray's own driver exits (status 1, no cleanup) once its GCS has been gone
    for ``RAY_gcs_rpc_server_reconnect_timeout_s`` (60 s by default): the
    study must stop well before that to end its MLflow runs itself. A sixth of
    that timeout (10 s by default), so a longer timeout set for a
    fault-tolerant GCS that restarts also gives it longer here.
    """
    try:
        reconnect = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s") or 60)
    except ValueError:
        reconnect = 60.0
    return max(2.0, reconnect / 6)


#: Seconds between checks of the cluster while waiting for tasks.
WATCH_EVERY_S = 2.0


class ClusterWatch:
    """Notices that the Ray this driver is connected to has gone away, before Ray kills the driver.

    Probes, with plain TCP connections, the GCS (the head node) and the
    raylet of this machine's node. A refused or timed-out connection that
    lasts :func:`_lost_after_s` is taken as the cluster lost.
    """

    def __init__(self, ray_module, local: bool):
        self.local = local
        self.where = "the Ray cluster"
        self.targets: list[tuple[str, tuple[str, int]]] = []
        self.grace = _lost_after_s()
        self._failing_since: float | None = None
        self._probed = float("-inf")
        try:
            gcs = _split_address(ray_module.get_runtime_context().gcs_address)
            node = ray_module._private.worker.global_worker.node
            raylet = (node.node_ip_address, int(node.node_manager_port))
        except Exception:  # pragma: no cover - a Ray release without these: no watch, Ray's errors only
            log.warning("cannot watch the Ray cluster's GCS and raylet; a lost cluster is noticed by Ray's errors only")
            return
        self.where = "the local Ray this study started" if local else f"the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
        if gcs is not None:
            self.targets.append((f"its GCS at {gcs[0]}:{gcs[1]}{'' if local else ' (the head node)'}", gcs))
        self.targets.append((f"this machine's Ray node (raylet at {raylet[0]}:{raylet[1]})", raylet))

    def dead(self) -> str | None:
        """What does not answer right now, e.g. "its GCS at 127.0.0.1:6379 (the head node)"; None when everything does."""
        down = [name for name, addr in self.targets if _answers(*addr, 2.0) is not None]
        return " and ".join(down) if down else None

    def check(self, *, wait: bool = False) -> None:
        """Raise :class:`RayClusterLostError` once something has not answered for the grace period.

        Probes at most every ``WATCH_EVERY_S`` seconds unless ``wait``.

        Parameters
        ----------
        wait : bool
            Probe now, and keep probing (1 s apart) until it answers again or
            the grace period is over, instead of returning at once.
        """
        if not wait and time.monotonic() - self._probed < WATCH_EVERY_S:
            return
        while True:
            down = self.dead()
            now = self._probed = time.monotonic()
            if down is None:
                self._failing_since = None
                return
            if self._failing_since is None:
                self._failing_since = now
            if now - self._failing_since >= self.grace:
                raise RayClusterLostError(
                    f"the Ray cluster went away mid-study: {down} of {self.where} stopped answering "
                    f"(no connection for {now - self._failing_since:.0f} s)"
                )
            if not wait:
                return
            time.sleep(1.0)


def init_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to Ray once per process.

    Joins the cluster named by ``RAY_ADDRESS`` when set, otherwise starts a
    local one that listens on loopback only: its node address is 127.0.0.1
    and the GCS, raylet, object manager, agents and workers bind there, so
    nothing of it is reachable from other machines (Ray's token
    authentication stays on as well). Set ``COMPBIAS_RAY_BIND=all`` to get
    Ray's own default instead (the machine's address, every interface), e.g.
    to let other machines join with ``ray start --address``; for a real
    cluster start it with ``ray start`` and set ``RAY_ADDRESS``
    (docs/operations.md). Workers get ``NUMBA_CACHE_DIR`` (a writable directory),
    ``NUMBA_THREADING_LAYER=workqueue`` (see :data:`WORKER_ENV`) and the
    source checkout on ``PYTHONPATH`` when compbias runs from one (an installed
    compbias is imported from the workers' environment).

    Without ``RAY_ADDRESS`` this always starts a new, private Ray
    (``ray.init(address="local")``): it never joins a Ray found on the
    machine, and never the address that a crashed Ray or ``ray start`` left
    in ``ray_current_cluster`` in Ray's temporary directory (``RAY_TMPDIR``,
    ``TMPDIR`` or ``/tmp``, then ``ray/``), which ``ray.init()`` would
    otherwise try to join and hang on. With ``RAY_ADDRESS`` set, the address
    is probed first (:func:`check_ray_address`), so a dead one fails within
    seconds instead of Ray's minutes of retries.

    Parameters
    ----------
    num_cpus : int, optional
        CPUs of a local cluster (ignored when joining one).
    num_gpus : int, optional
        GPUs a local cluster declares (ignored when joining one); default:
        Ray counts the machine's GPUs.

    Raises
    ------
    RayUnavailableError
        Nothing answers at ``RAY_ADDRESS``, or Ray cannot connect to it.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_ray_address(address)
    if address is None or os.environ.get("NUMBA_CACHE_DIR"):
        cache = _numba_cache_dir()
    else:  # other nodes may not have this checkout: a per-node temporary directory
        cache = str(Path(tempfile.gettempdir()) / "compbias-numba")
    env_vars = {"NUMBA_CACHE_DIR": cache, **WORKER_ENV}
    from compbias._locations import source_checkout

    # workers import the installed compbias; the checkout goes first only when this one is a checkout
    checkout = source_checkout()
    pythonpath = [p for p in (str(checkout) if checkout else "", os.environ.get("PYTHONPATH", "")) if p]
    if pythonpath:
        env_vars["PYTHONPATH"] = os.pathsep.join(pythonpath)
    kwargs: dict[str, Any] = dict(
        # "local": a new Ray, never the one named in <Ray's temp dir>/ray_current_cluster
        address=address or "local",
        runtime_env={"env_vars": env_vars},
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if address is None and num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    loopback = address is None and ray_bind_mode() == "loopback"
    with _single_machine_ray(loopback):
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:  # e.g. a port that answers but is no Ray GCS
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
            raise RayUnavailableError(f"cannot connect to {where}: {exc}") from exc
    if loopback and not local_ray_is_loopback():  # pragma: no cover - a Ray release that changed the switch
        log.warning(
            "the local Ray cluster advertises %s, not loopback: this Ray release ignores %s; "
            "it may listen on every interface (token authentication is on)",
            ray.get_runtime_context().gcs_address, _RAY_CLUSTER_SWITCH,
        )

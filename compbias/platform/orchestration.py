"""Running model tasks: on Ray (the default) or one after another in this process.

Both executors have the same small interface, used by the study driver:
``submit(task, baseline)`` returns a handle, ``wait(handles)`` returns the
handles that finished, ``result(handle)`` returns the :class:`TaskResult` or
raises the task's error. A compressed task's ``baseline`` may be the handle of
its baseline task: on Ray it is passed as an ``ObjectRef`` argument, so the
compressed task starts as soon as its own baseline is done (a dependency, not
a barrier).

Connecting to Ray and noticing that its cluster went away is
:mod:`compbias.platform.ray_cluster`; its public names are importable from
here as well. How much of a GPU a task asks for under ``gpus_per_task: auto``
is :mod:`compbias.platform.gpu_share` (a probe task measures the model first).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from compbias.platform.config import StudySpec
from compbias.platform.gpu_share import GpuShareDecision, gpu_share, resolve_gpu_share, run_probe_on_ray
from compbias.platform.plan import ModelTask
from compbias.platform.ray_cluster import (
    EXIT_RAY_LOST,
    RAY_BIND_ENV,
    WATCH_EVERY_S,
    WORKER_ENV,
    ClusterWatch,
    RayClusterLostError,
    RayUnavailableError,
    check_ray_address,
    init_ray,
    local_ray_is_loopback,
    ray_bind_mode,
)
from compbias.platform.tasks import ModelFiles, TaskResult, execute_task

__all__ = [
    "WORKER_ENV", "RAY_BIND_ENV", "EXIT_RAY_LOST", "RayUnavailableError", "RayClusterLostError", "check_ray_address",
    "init_ray", "local_ray_is_loopback", "ray_bind_mode", "gpu_share", "task_options", "RayExecutor", "LocalExecutor",
    "make_executor",
]


def _remote_body(
    task: ModelTask, spec_data: dict[str, Any], baseline: ModelFiles | TaskResult | None, tracking_uri: str | None = None
) -> TaskResult:
    if isinstance(baseline, TaskResult):
        baseline = baseline.model_files
    return execute_task(task, spec_data, baseline, tracking_uri=tracking_uri)


def task_options(spec: StudySpec, cluster_gpus: float, share: float | None = None) -> dict[str, Any]:
    """Ray options of every model task of a study.

    Parameters
    ----------
    spec : StudySpec
        ``resources.cpus_per_task``, ``gpus_per_task`` and ``max_retries``.
    cluster_gpus : float
        GPUs of the Ray cluster the tasks run on (``ray.cluster_resources()``).
        ``gpus_per_task: auto`` asks for GPUs when the cluster has any,
        whatever the driver's own machine has (a CPU-only driver joining a GPU
        cluster gets GPU tasks; a GPU driver on a CPU-only cluster does not
        ask for GPUs that would never come).
    share : float, optional
        The share of a GPU that ``auto`` asks for on a cluster with GPUs,
        measured by :func:`compbias.platform.gpu_share.resolve_gpu_share`
        (:func:`compbias.platform.gpu_share.gpu_share`); default (and after a
        failed probe) one whole GPU. Ignored for a fixed ``gpus_per_task``.

    Returns
    -------
    dict
        ``num_cpus``, ``num_gpus`` when GPUs are asked for, ``max_retries``
        (retries when a worker dies) and ``retry_exceptions=False``.

    Raises
    ------
    ValueError
        A fixed ``gpus_per_task`` larger than the cluster's GPUs (the tasks
        could never be scheduled).
    """
    gpus = spec.resources.gpus_per_task
    if gpus == "auto":
        gpus = (1 if share is None else share) if cluster_gpus >= 1 else 0
    elif gpus > cluster_gpus:
        raise ValueError(
            f"the study asks for resources.gpus_per_task={gpus:g} but the Ray cluster has {cluster_gpus:g} GPU(s), so its "
            "tasks would wait forever; set gpus_per_task to auto or 0, or join a cluster with GPUs (RAY_ADDRESS)"
        )
    options: dict[str, Any] = {"max_retries": spec.resources.max_retries, "retry_exceptions": False,
                               "num_cpus": spec.resources.cpus_per_task}
    if gpus:
        options["num_gpus"] = gpus
    return options


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RayExecutor:
    """Runs tasks as Ray tasks, one per model.

    Parameters
    ----------
    spec : StudySpec
        Supplies the resources (:func:`task_options`): ``num_cpus`` and,
        when the cluster has GPUs (``gpus_per_task: auto``) or the study asks
        for them, ``num_gpus``; ``max_retries`` for workers that die.
    tracking_uri : str, optional
        The study's store, handed to every task.
    log : callable, optional
        Receives the one line saying which GPU share ``auto`` chose (default: stderr).

    Attributes
    ----------
    share_decision : GpuShareDecision or None
        With ``gpus_per_task: auto`` on a cluster with GPUs, the share every
        task asks for and the probe it came from (a probe task on one whole
        GPU, before any task: :mod:`compbias.platform.gpu_share`); None
        otherwise (no probe ran).

    Notes
    -----
    A worker that dies is Ray's to retry (``max_retries``). The cluster itself
    going away (its GCS, the head, or this machine's raylet) is raised as
    :class:`RayClusterLostError` by :meth:`wait` and :meth:`result`, within
    the grace period of :class:`~compbias.platform.ray_cluster.ClusterWatch` and before Ray ends the driver
    on its own.
    """

    name = "ray"

    def __init__(self, spec: StudySpec, *, tracking_uri: str | None = None, log: Callable[[str], None] | None = _stderr):
        import ray

        self.tracking_uri = tracking_uri  # the study's store, passed to each task (a given baseline's model_uri)
        init_ray()
        self._ray = ray
        self.spec_data = spec.resolved()
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        self.share_decision: GpuShareDecision | None = resolve_gpu_share(
            spec, cluster_gpus, lambda: run_probe_on_ray(ray, self.spec_data, num_cpus=spec.resources.cpus_per_task), log)
        self.options = task_options(spec, cluster_gpus, None if self.share_decision is None else self.share_decision.share)
        self._remote = ray.remote(_remote_body)
        self._spec_ref = ray.put(self.spec_data)
        self._watch = ClusterWatch(ray, local=not os.environ.get("RAY_ADDRESS"))

    def resource_params(self) -> dict[str, str]:
        """What the study's parent run records about the tasks' GPUs: :meth:`GpuShareDecision.params`, or nothing.

        Returns
        -------
        dict of str to str
            ``resources.gpu_share`` and ``resources.gpu_probe.*`` when a probe ran.
        """
        return {} if self.share_decision is None else self.share_decision.params()

    def submit(self, task: ModelTask, baseline: Any = None):
        """Start a task; ``baseline`` is model files, a handle of a baseline task, or None.

        Parameters
        ----------
        task : ModelTask
        baseline : ObjectRef or dict of bytes or None

        Returns
        -------
        ray.ObjectRef
        """
        return self._remote.options(name=task.label, **self.options).remote(task, self._spec_ref, baseline, self.tracking_uri)

    def put(self, files: ModelFiles):
        """Store model files once in the object store to share among tasks.

        Parameters
        ----------
        files : dict of str to bytes

        Returns
        -------
        ray.ObjectRef
        """
        return self._ray.put(files)

    def wait(self, handles: list) -> tuple[list, list]:
        """Block until at least one handle is ready.

        Parameters
        ----------
        handles : list of ObjectRef

        Returns
        -------
        (ready, pending) : tuple of lists

        Raises
        ------
        RayClusterLostError
            The cluster went away while waiting.
        """
        while True:
            try:
                ready, pending = self._ray.wait(handles, num_returns=1, timeout=WATCH_EVERY_S)
            except (self._ray.exceptions.RayError, ConnectionError) as exc:
                self._lost(exc)
                raise
            self._watch.check()  # also while results keep coming: Ray ends a driver 60 s after its GCS is gone
            if ready:
                return ready, pending

    def result(self, handle) -> TaskResult:
        """The task's result, or its exception re-raised.

        Parameters
        ----------
        handle : ObjectRef

        Returns
        -------
        TaskResult

        Raises
        ------
        RayClusterLostError
            The task's error says that this machine's node is gone
            (``LocalRayletDiedError``, ``RaySystemError``), or any other Ray
            error (``NodeDiedError``, ``WorkerCrashedError`` after the
            retries, ``ObjectLostError``...) comes while the GCS or the local
            raylet does not answer. A task's own exception, or a worker or
            node failure on a cluster still there, is re-raised as it is (that
            model fails; the study goes on).
        """
        try:
            return self._ray.get(handle)
        except (self._ray.exceptions.RayError, ConnectionError) as exc:
            self._lost(exc)
            raise

    def _lost(self, exc: BaseException) -> None:
        """Raise :class:`RayClusterLostError` from ``exc`` when it means the cluster is gone."""
        errors = self._ray.exceptions
        if isinstance(exc, errors.RayTaskError):  # the task's own exception
            return
        if isinstance(exc, (errors.LocalRayletDiedError, errors.RaySystemError)):
            down = self._watch.dead() or "this machine's Ray node"
            raise RayClusterLostError(
                f"the Ray cluster went away mid-study: {down} of {self._watch.where} died ({type(exc).__name__})"
            ) from exc
        self._watch.check(wait=True)  # raises once the GCS or the raylet stays silent for the grace period




class _Done:
    def __init__(self, value: TaskResult | None = None, error: BaseException | None = None):
        self.value, self.error = value, error


class LocalExecutor:
    """Runs each task to completion in this process, at submission, one after another.

    Used by the benchmark as the sequential reference and handy for debugging
    (``compbias study --executor local``).

    Parameters
    ----------
    spec : StudySpec
    """

    name = "local"

    def __init__(self, spec: StudySpec, *, tracking_uri: str | None = None):
        self.spec_data = spec.resolved()
        self.tracking_uri = tracking_uri

    def resource_params(self) -> dict[str, str]:
        """Nothing to record: tasks run in this process, on its own device (see :meth:`RayExecutor.resource_params`).

        Returns
        -------
        dict
            Empty.
        """
        return {}

    def submit(self, task: ModelTask, baseline: Any = None) -> _Done:
        """Run the task now.

        Parameters
        ----------
        task : ModelTask
        baseline : _Done or dict of bytes or None

        Returns
        -------
        handle
        """
        if isinstance(baseline, _Done):
            if baseline.error is not None:
                return _Done(error=RuntimeError(f"baseline of {task.label} failed: {baseline.error}"))
            baseline = baseline.value.model_files
        try:
            return _Done(value=execute_task(task, self.spec_data, baseline, tracking_uri=self.tracking_uri))
        except Exception as exc:  # reported by result()
            return _Done(error=exc)

    def put(self, files: ModelFiles) -> ModelFiles:
        """Identity (no object store).

        Parameters
        ----------
        files : dict of str to bytes

        Returns
        -------
        dict of str to bytes
        """
        return files

    def wait(self, handles: list) -> tuple[list, list]:
        """Everything is already done: return the first handle.

        Parameters
        ----------
        handles : list

        Returns
        -------
        (ready, pending) : tuple of lists
        """
        return handles[:1], handles[1:]

    def result(self, handle: _Done) -> TaskResult:
        """The task's result, or its exception re-raised.

        Parameters
        ----------
        handle : _Done

        Returns
        -------
        TaskResult
        """
        if handle.error is not None:
            raise handle.error
        return handle.value


def make_executor(kind: str, spec: StudySpec, *, tracking_uri: str | None = None):
    """Build an executor by name.

    Parameters
    ----------
    kind : {"ray", "local"}
    spec : StudySpec
    tracking_uri : str, optional
        The study's store, handed to every task (a baseline given by ``model_uri`` is downloaded from it).

    Returns
    -------
    RayExecutor or LocalExecutor
    """
    if kind == "ray":
        return RayExecutor(spec, tracking_uri=tracking_uri)
    if kind == "local":
        return LocalExecutor(spec, tracking_uri=tracking_uri)
    raise ValueError(f"unknown executor {kind!r}; use 'ray' or 'local'")

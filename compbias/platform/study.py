"""The study job: plan, resume, run on Ray, log every model to MLflow as it completes.

>>> from compbias.platform.config import load_study
>>> from compbias.platform.study import run_study
>>> outcome = run_study(load_study("configs/digits.yaml"))   # doctest: +SKIP
>>> print(outcome.summary_table())                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from compbias import contract as C
from compbias.platform import tracking
from compbias.platform.config import StudySpec
from compbias.platform.orchestration import make_executor
from compbias.platform.ray_cluster import RayClusterLostError, check_ray_address
from compbias.platform.plan import ModelTask, plan_study
from compbias.platform.study_outcome import ArtifactStorageError, StudyConflictError, StudyOutcome, storage_exhausted

__all__ = ["StudyOutcome", "StudyConflictError", "ArtifactStorageError", "RayClusterLostError", "run_study"]


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_study(
    spec: StudySpec,
    *,
    study_text: str | None = None,
    executor: str = "ray",
    roles: Iterable[str] = ("baseline", "compressed"),
    methods: Iterable[str] | None = None,
    levels: Iterable[str] | None = None,
    tracking_uri: str | None = None,
    client: MlflowClient | None = None,
    step: str = "study",
    log: Callable[[str], None] = _default_log,
) -> StudyOutcome:
    """Run (or resume) a study and record every model in MLflow.

    Parameters
    ----------
    spec : StudySpec
        The validated study.
    study_text : str, optional
        The study file as written (logged as ``study.yaml``); defaults to the resolved config.
    executor : {"ray", "local"}
        Ray tasks (default) or one after another in this process.
    roles : iterable of {"baseline", "compressed"}
        ``("baseline",)`` trains the population only (``compbias train``).
    methods, levels : iterable of str, optional
        Restrict the compressed tasks (``compbias compress --method ... --level ...``).
    tracking_uri : str, optional
        The store (tracking and registry); default ``MLFLOW_TRACKING_URI`` or
        MLflow's default. Read into a client, never set process-wide.
    client : MlflowClient, optional
        A client of the store, instead of ``tracking_uri`` (as
        :func:`compbias.platform.tracking.configure_tracking` makes it).
    step : str
        Recorded as the parent run's ``compbias.step`` tag.
    log : callable
        Progress messages.

    Returns
    -------
    StudyOutcome

    Raises
    ------
    StudyConflictError
        If finished models of this study were made with a different dataset,
        model, training or compression setting.
    RuntimeError
        If compressed tasks are requested whose baselines are neither finished
        nor planned (run ``compbias train`` first).
    RayUnavailableError
        ``RAY_ADDRESS`` names a Ray cluster that does not answer (checked
        before anything is logged).
    RayClusterLostError
        The Ray cluster (its head, or this machine's node) went away
        mid-study. Every model logged so far is complete; the parent run is
        ended FAILED with ``compbias.error``; running the study again resumes it.
    ArtifactStorageError
        The artifact location filled up or turned read-only.

    Any error that ends the study ends its parent run FAILED with the error
    in its ``compbias.error`` tag.
    """
    t_start = time.perf_counter()
    watch = tracking.Stopwatch()
    study_text = study_text if study_text is not None else spec.to_yaml()
    roles = tuple(roles)
    tasks = plan_study(spec, roles=roles, methods=methods, levels=levels)
    if executor == "ray":
        check_ray_address()  # a dead RAY_ADDRESS fails here, before anything is logged
    if any(t.role == "baseline" for t in tasks):
        from compbias.platform.tasks import check_study_model

        check_study_model(spec)  # a factory model that does not fit the dataset: refused before anything trains

    with watch:
        client = client if client is not None else tracking.configure_tracking(tracking_uri)
        exp_id = tracking.ensure_experiment(client, spec.experiment_name)
        tracking.ensure_registered_model(client, spec)
        project_run = os.environ.get("MLFLOW_RUN_ID")
        state = tracking.scan_study(client, exp_id, spec, current_run_ids=[project_run] if project_run else [])
    if state.interrupted:
        log(f"marked {len(state.interrupted)} interrupted run(s) as FAILED; their models will be made again")
    if state.deleted_versions:
        log(f"deleted {len(state.deleted_versions)} registered version(s) without a finished run")

    # refuse to mix models made under a different study file
    stale = []
    for t in tasks:
        done = state.done.get(t.key)
        if done is not None and done.spec_hash and done.spec_hash != spec.model_fingerprint(t.compression_index):
            stale.append(t.label)
    if stale:
        raise StudyConflictError(
            f"study {spec.name!r} already has finished models made with different dataset/model/train/compression "
            f"settings ({', '.join(stale[:5])}{'...' if len(stale) > 5 else ''}); give the changed study a new "
            f"'name' (or delete experiment {spec.experiment_name!r} and registered model {spec.registered_model_name!r})"
        )

    todo = [t for t in tasks if t.key not in state.done]
    todo_keys = {t.key for t in todo}
    missing_base = sorted(
        {t.seed for t in todo if t.baseline_key and t.baseline_key not in state.done and t.baseline_key not in todo_keys}
    )
    if missing_base:
        raise RuntimeError(
            f"baselines for seeds {missing_base} of study {spec.name!r} are not finished; "
            f"run `compbias train` (or `compbias study`) first"
        )

    with watch:
        extra = {}
        if project_run:
            extra[C.PROJECT_RUN_ID] = project_run
        parent_id = tracking.start_parent_run(client, exp_id, spec, study_text, step=step, extra_tags=extra)
        if project_run:
            try:
                client.set_tag(project_run, C.STUDY_RUN_ID, parent_id)
                client.set_tag(project_run, C.STUDY, spec.name)
            except Exception:  # the project run may live in another store; not essential
                pass

    outcome = StudyOutcome(
        study=spec.name,
        experiment_id=exp_id,
        parent_run_id=parent_id,
        tracking_uri=str(client.tracking_uri),
        interrupted=list(state.interrupted),
        deleted_versions=list(state.deleted_versions),
    )
    for t in tasks:
        if t.key in state.done:
            outcome.models[t.key] = state.done[t.key]
            outcome.resumed.append(t.key)
    log(
        f"study {spec.name}: {len(tasks)} models planned, {len(outcome.resumed)} already finished, "
        f"{len(todo)} to run ({executor})"
    )

    ok = False
    error: BaseException | None = None
    try:
        if todo:
            _execute(spec, study_text, todo, state, outcome, client, exp_id, parent_id, executor, watch, log)
        ok = outcome.ok
    except RayClusterLostError as exc:
        error = RayClusterLostError(
            f"{exc}; the {len(outcome.trained)} model(s) finished in this execution (and {len(outcome.resumed)} "
            f"before it) are safe in MLflow, the study's parent run {parent_id} ended FAILED; "
            "re-run the same command to resume (finished models are not made again)"
        )
        raise error from exc
    except BaseException as exc:
        error = exc
        raise
    finally:
        with watch:
            if error is not None:
                try:
                    client.set_tag(parent_id, C.ERROR, f"{type(error).__name__}: {error}"[:5000])
                except Exception:  # pragma: no cover - the store itself is gone; the run still ends below
                    pass
            now = int(time.time() * 1000)
            client.log_batch(
                parent_id,
                metrics=[
                    Metric("models_trained", float(len(outcome.trained)), now, 0),
                    Metric("models_resumed", float(len(outcome.resumed)), now, 0),
                    Metric("models_failed", float(len(outcome.failed)), now, 0),
                ],
            )
            tracking.finish_run(client, parent_id, ok)
        outcome.wall_seconds = time.perf_counter() - t_start
        outcome.tracking_seconds = watch.seconds
        try:
            with watch:
                client.log_metric(parent_id, "wall_seconds", outcome.wall_seconds)
                client.log_metric(parent_id, "tracking_seconds", outcome.tracking_seconds)
        except Exception:  # pragma: no cover
            pass
    return outcome


def _execute(spec, study_text, todo, state, outcome, client, exp_id, parent_id, executor_kind, watch, log) -> None:
    ex = make_executor(executor_kind, spec, tracking_uri=str(client.tracking_uri))
    params = ex.resource_params()  # e.g. the GPU share gpus_per_task: auto chose, and its probe
    if params:
        with watch:
            client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in params.items()])
    handles: dict = {}
    task_of: dict = {}
    baseline_refs: dict = {}
    for t in todo:
        if t.role == "baseline":
            h = ex.submit(t)
            handles[t.key] = h
            task_of[h] = t
    for t in todo:
        if t.role != "compressed":
            continue
        bk = t.baseline_key
        if bk in handles:
            base = handles[bk]
        else:
            if bk not in baseline_refs:
                with watch:
                    files = tracking.download_model_files(client, spec, state.done[bk])
                baseline_refs[bk] = ex.put(files)
            base = baseline_refs[bk]
        h = ex.submit(t, base)
        handles[t.key] = h
        task_of[h] = t

    pending = list(task_of)

    def _baseline_of(task: ModelTask):
        # logged in this execution, or finished in an earlier one (compbias compress)
        if task.baseline_key is None:
            return None
        return outcome.models.get(task.baseline_key) or state.done.get(task.baseline_key)
    deferred: dict = {}  # baseline key -> [(task, result)] waiting for the baseline to be logged
    n_total, n_done = len(pending), 0

    def log_result(task: ModelTask, result) -> None:
        nonlocal n_done
        baseline = _baseline_of(task)
        try:
            with watch:
                # the model's study.yaml is the resolved config (dataset root from --data-root
                # included): the audit rebuilds its probe set from it
                fm = tracking.log_model_run(client, exp_id, parent_id, spec, spec.to_yaml(), result, baseline=baseline)
        except Exception as exc:
            outcome.failed[task.key] = f"logging failed: {type(exc).__name__}: {exc}"
            log(f"[{n_done + 1}/{n_total}] {task.label}: LOGGING FAILED ({exc})")
            n_done += 1
            full = storage_exhausted(exc)
            if full is not None:  # every later model would fail the same way: stop here
                raise ArtifactStorageError(full.errno, f"{full.strerror}: {full.filename2 or full.filename or 'the artifact location'}; "
                                           f"stopped after {n_done} of {n_total} models") from exc
            return
        outcome.models[task.key] = fm
        outcome.trained.append(task.key)
        outcome.nodes.add(result.node_id)
        n_done += 1
        extra = f" sparsity={fm.metrics['sparsity']:.3f}" if "sparsity" in fm.metrics else ""
        log(f"[{n_done}/{n_total}] {task.label}: acc={fm.metrics.get('acc', float('nan')):.4f}{extra} ({result.seconds:.1f}s) -> version {fm.version}")
        for t2, r2 in deferred.pop(task.key, []):
            log_result(t2, r2)

    def fail(task: ModelTask, exc: BaseException) -> None:
        nonlocal n_done
        n_done += 1
        msg = f"{type(exc).__name__}: {exc}"
        outcome.failed[task.key] = msg.splitlines()[0][:500] if msg else type(exc).__name__
        log(f"[{n_done}/{n_total}] {task.label}: FAILED ({outcome.failed[task.key]})")
        with watch:
            try:
                tracking.log_failed_run(client, exp_id, parent_id, spec, task, exc)
            except Exception:  # pragma: no cover
                pass
        for t2, _ in deferred.pop(task.key, []):
            fail(t2, RuntimeError(f"its baseline {task.label} could not be logged"))

    while pending:
        ready, pending = ex.wait(pending)
        for h in ready:
            task = task_of[h]
            try:
                result = ex.result(h)
            except RayClusterLostError:  # nothing more will run: stop (the parent run ends FAILED)
                raise
            except Exception as exc:
                fail(task, exc)
                continue
            bk = task.baseline_key
            if bk is not None and _baseline_of(task) is None:
                if bk in outcome.failed:
                    fail(task, RuntimeError(f"its baseline {bk} failed"))
                else:
                    deferred.setdefault(bk, []).append((task, result))
                continue
            log_result(task, result)
    for bk, items in deferred.items():
        for t2, _ in items:
            fail(t2, RuntimeError(f"its baseline {bk} never finished"))

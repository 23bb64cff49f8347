"""Writing runs: the study's parent run, one run per model (with its LoggedModel and registered version), failed runs.

Every call goes through the client passed in.  The one MLflow call that
reads the process-wide tracking URI anyway (registering a version from a
``models:/<model_id>`` source in a SQL registry) runs inside
:func:`~compbias.platform.tracking.store.scoped_tracking_uri`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from compbias import contract as C
from compbias.platform.config import StudySpec
from compbias.platform.plan import ModelTask
from compbias.platform.tasks import TaskResult, write_model_files
from compbias.platform.tracking.packaging import MODEL_VERSIONS_TAG, finalize_failed, log_pyfunc_model, logged_model_name
from compbias.platform.tracking.records import (
    DATASET_CONTEXT_TAG,
    flatten_params,
    is_evaluation_metric,
    metric_series,
    model_metrics,
    model_params,
    model_tags,
    split_datasets,
    write_tables,
)
from compbias.platform.tracking.store import scoped_tracking_uri

__all__ = ["FinishedModel", "Stopwatch", "finish_run", "log_failed_run", "log_model_run", "start_parent_run"]

log = logging.getLogger("compbias.tracking")


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
        params = [Param(k, v[:6000]) for k, v in flatten_params(spec.resolved()).items()]
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
        param_values = model_params(spec, task)
        params = [Param(k, v) for k, v in param_values.items()]
        datasets = split_datasets(spec, result)
        with tempfile.TemporaryDirectory(prefix="compbias-log-") as tmp:
            out = Path(tmp) / "run"
            write_tables(out, result, study_text)
            client.log_artifacts(run_id, str(out))  # one upload: parquet tables, CSV twins, member.json, study.yaml
            weights = write_model_files(result.model_files, Path(tmp) / "weights")
            model_id = log_pyfunc_model(
                client, experiment_id, run_id, logged_model_name(task), weights, result.input_shape, tags, param_values, Path(tmp)
            )
        inputs = [DatasetInput(ds, [InputTag(DATASET_CONTEXT_TAG, context)]) for context, ds in sorted(datasets.items(), reverse=True)]
        models = [LoggedModelInput(baseline.model_id)] if baseline is not None and baseline.model_id else None
        client.log_inputs(run_id, datasets=inputs, models=models)
        now = int(time.time() * 1000)
        test, train = datasets["evaluation"], datasets.get("training")

        def metric(key: str, value: float, step: int, ds) -> Metric:
            if ds is None:
                return Metric(key, value, now, step, model_id=model_id, run_id=run_id)
            return Metric(key, value, now, step, model_id=model_id, dataset_name=ds.name, dataset_digest=ds.digest, run_id=run_id)

        mlist = [metric(k, v, 0, test if is_evaluation_metric(k) else None) for k, v in metrics.items()]
        for k, series in metric_series(result.info).items():  # per-epoch training history: the training split
            mlist += [metric(k, v, i, train) for i, v in enumerate(series)]
        for i in range(0, max(len(mlist), 1), 1000):
            client.log_batch(run_id, metrics=mlist[i : i + 1000], params=params if i == 0 else [])
        # registered last: a version exists only once every artifact is logged
        with scoped_tracking_uri(client):
            mv = client.create_model_version(
                reg_name, source=f"models:/{model_id}", run_id=run_id, tags=tags, await_creation_for=60, model_id=model_id
            )
        version = mv.version
        # what mlflow.register_model records on the model: its versions
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([{"name": reg_name, "version": str(version)}])})
        finish_run(client, run_id, True)
    except BaseException as exc:
        if version is not None:
            try:
                client.delete_model_version(reg_name, version)
            except MlflowException:  # pragma: no cover
                log.exception("could not delete version %s of %s", version, reg_name)
        finalize_failed(client, model_id)
        try:
            client.set_tag(run_id, C.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
            finish_run(client, run_id, False)
        except MlflowException:  # pragma: no cover
            log.exception("could not mark run %s as failed", run_id)
        raise
    return FinishedModel(
        key=task.key, run_id=run_id, version=str(version), metrics=metrics, spec_hash=tags[C.SPEC_HASH], model_id=model_id
    )


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


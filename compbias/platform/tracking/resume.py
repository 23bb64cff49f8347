"""Resuming a study: what an earlier execution finished, cleaning up what it left half-done, downloading model files.

Every call goes through a client; downloads name the client's tracking and
registry URIs explicitly, so nothing here reads MLflow's process-wide URIs
when a client is given.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus, ViewType
from mlflow.exceptions import MlflowException

from compbias import contract as C
from compbias.platform.config import StudySpec
from compbias.platform.tracking.packaging import finalize_failed
from compbias.platform.tracking.runs import FinishedModel, finish_run

__all__ = ["ResumeState", "download_model_files", "download_version", "scan_study", "version_model_files"]


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
                finalize_failed(client, out.model_id)
    return state


def _version_model_id(version) -> str:
    """The LoggedModel a registered version was made from (``models:/<model_id>`` source), else ''."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(getattr(version, "source", "") or "")
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", source)
    return m.group(1) if m else ""


def download_version(client: MlflowClient, registered_model: str, version: str, dst: str) -> Path:
    """Download a registered version's artifacts into ``dst`` through ``client``; returns the local directory.

    What MLflow's ``models:/<name>/<version>`` repository does (the version's
    download location, then everything under it: nothing when it was
    deleted), except that the version is looked up with the client: that
    repository asks the process's registry URI whatever it is given.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    location = client.get_model_version_download_uri(registered_model, version)
    repo = get_artifact_repository(location, tracking_uri=client.tracking_uri,
                                   registry_uri=getattr(client, "_registry_uri", None) or client.tracking_uri)
    return Path(repo.download_artifacts("", dst_path=dst))


def version_model_files(registered_model: str, version: str, *, client: MlflowClient | None = None) -> dict[str, bytes]:
    """The saved-model files (weights and ``model_spec.json``) of one registered version.

    Parameters
    ----------
    registered_model : str
    version : str
    client : MlflowClient, optional
        The store to read (its tracking and registry URIs); default: MLflow's
        current URIs (read, not set).

    Returns
    -------
    dict of str to bytes

    Raises
    ------
    FileNotFoundError
        The version's artifacts hold no ``model_spec.json``.
    """
    from compbias.platform.tasks import model_files_from_dir

    with tempfile.TemporaryDirectory(prefix="compbias-dl-") as tmp:
        if client is None:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model}/{version}", dst_path=tmp))
        else:
            local = download_version(client, registered_model, version, tmp)
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
    return version_model_files(spec.registered_model_name, model.version, client=client)

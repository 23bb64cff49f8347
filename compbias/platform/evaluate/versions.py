"""The registry side: which versions need predictions, evaluating them, logging their predictions."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.evaluate.data import EvaluationData, load_data
from compbias.platform.evaluate.errors import EvaluationError, first_line, log
from compbias.platform.evaluate.loaders import load_local_model
from compbias.platform.evaluate.predict import evaluate_model
from compbias.platform.evaluate.spec import EvalSpec

__all__ = ["EvaluationReport", "evaluate_versions", "has_predictions", "log_predictions", "pending_versions",
           "tag_errors"]


@dataclass
class EvaluationReport:
    """What an evaluation pass did.

    Attributes
    ----------
    evaluated : dict of str to str
        ``NAME/VERSION -> model kind`` of the versions whose predictions were logged.
    errors : dict of str to str
        ``NAME/VERSION -> reason`` of the versions that could not be evaluated.
    skipped : list of str
        Selected versions that already had predictions.
    seconds : float
    """

    evaluated: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def has_predictions(client: MlflowClient, run_id: str) -> bool:
    """Tell whether a run's artifact root holds the predictions table."""
    try:
        return any(f.path == C.PREDICTIONS for f in client.list_artifacts(run_id))
    except Exception:
        return False


def pending_versions(client: MlflowClient, selection=None, *, force: bool = False,
                     registered_models: Sequence[str] | None = None) -> tuple[list, list]:
    """The selected registered versions that carry lineage tags but whose runs have no predictions.

    Parameters
    ----------
    client : MlflowClient
    selection : compbias.platform.audit.selection.Selection, optional
        As ``compbias audit`` selects; empty: every version not yet audited.
    force : bool
        Also consider versions already audited.
    registered_models : sequence of str, optional
        Only versions of these registered models (the spec's ``registered_models``).

    Returns
    -------
    (list of VersionRecord, list of VersionRecord)
        Versions to evaluate, and selected versions that already have predictions.

    Raises
    ------
    ValueError
        An explicit selection names nothing that exists (the audit's message).
    """
    from compbias.platform.audit import tags as T
    from compbias.platform.audit.selection import Selection, list_versions, select_targets

    selection = selection or Selection()
    records = list_versions(client, registered_model=selection.registered_model)
    targets = records if force and selection.empty else select_targets(records, selection, T.current_metrics_version())
    if registered_models:
        targets = [r for r in targets if r.name in set(registered_models)]
    todo, done = [], []
    for r in targets:
        (done if r.run_id and has_predictions(client, r.run_id) else todo).append(r)
    return todo, done


def log_predictions(client: MlflowClient, run_id: str, predictions: pd.DataFrame, info: C.MemberInfo, *,
                    study_yaml: dict | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Log a member's predictions table, ``member.json`` (and ``study.yaml``) to its run in one upload.

    Parameters
    ----------
    client : MlflowClient
    run_id : str
    predictions : pandas.DataFrame
        Checked with :func:`compbias.contract.validate_predictions`.
    info : compbias.contract.MemberInfo
    study_yaml : dict, optional
    tags : mapping, optional
        Run tags written after the upload.
    """
    table = C.validate_predictions(predictions, num_classes=info.num_classes, groups=list(info.groups or ()),
                                   where=f"predictions of run {run_id}")
    with tempfile.TemporaryDirectory(prefix="compbias-eval-") as tmp:
        out = Path(tmp)
        (out / C.MEMBER_FILE).write_text(info.to_json())
        if study_yaml:
            (out / C.STUDY_FILE).write_text(yaml.safe_dump(study_yaml, sort_keys=False))
        table.to_parquet(out / C.PREDICTIONS, index=False)
        client.log_artifacts(run_id, str(out))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)


def _download(client: MlflowClient, record, dst: str, what: str) -> Path:
    import mlflow

    uri = f"models:/{record.name}/{record.version}"
    try:
        location = client.get_model_version_download_uri(record.name, record.version)
    except Exception as exc:
        raise EvaluationError(f"{what}: the registry does not resolve {uri}: {first_line(exc)}") from None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst,
                                                        tracking_uri=str(client.tracking_uri)))
    except Exception as exc:
        raise EvaluationError(
            f"{what}: its model files cannot be downloaded from {location}: {first_line(exc)}; check that the "
            "version's source still exists and that the artifact store is reachable from here"
        ) from None


def evaluate_versions(
    client: MlflowClient,
    records: Sequence,
    spec: EvalSpec,
    *,
    allow_pickle: bool = False,
    data: EvaluationData | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Evaluate registered versions and log their predictions under the contract.

    Each version is downloaded, loaded (see :mod:`compbias.platform.evaluate.loaders`
    for the formats and the pickle rule), run on the evaluation data, and its
    predictions, ``member.json`` and (for a dataset section) ``study.yaml``
    are uploaded to its run together.  A version that fails gets nothing
    written; its reason is in the report.

    Parameters
    ----------
    client : MlflowClient
    records : sequence of VersionRecord
        Versions with lineage tags and a run.
    spec : EvalSpec
    allow_pickle : bool
        Load pickled models and pyfuncs (code stored with the model runs).
    data : EvaluationData, optional
        Already loaded evaluation data (default: :func:`load_data`).
    progress : callable, optional

    Returns
    -------
    EvaluationReport

    Raises
    ------
    EvaluationError
        When the evaluation data cannot be loaded (no version is touched).
    """
    say = progress or (lambda msg: log.info(msg))
    report = EvaluationReport()
    if not records:
        return report
    t0 = time.perf_counter()
    data = data if data is not None else load_data(spec)
    for r in records:
        what = f"version {r.key}"
        try:
            C.Member.from_tags(r.tags)
        except C.ContractError as exc:
            report.errors[r.key] = f"{what}: {exc}"
            continue
        if not r.run_id:
            report.errors[r.key] = (f"{what} has no run, so its predictions have nowhere to go; "
                                    "log and register the model inside mlflow.start_run()")
            continue
        tmp = tempfile.mkdtemp(prefix="compbias-model-")
        try:
            local = _download(client, r, tmp, what)
            model = load_local_model(local, spec, allow_pickle=allow_pickle, what=what)
            table = evaluate_model(model, data, spec, what=what)
            log_predictions(client, r.run_id, table, data.info, study_yaml=data.study_yaml,
                            tags={C.EVALUATION_MODEL_KIND: model.kind, C.EVALUATION_SPEC_HASH: spec.digest()})
            report.evaluated[r.key] = model.kind
            acc = float((table[C.PRED] == table[C.LABEL]).mean())
            say(f"evaluated {r.key} ({model.kind}): {len(table)} examples, accuracy {acc:.4f}")
        except EvaluationError as exc:
            report.errors[r.key] = str(exc)
        except Exception as exc:  # an upload or registry failure: this version only, with what happened
            log.debug("evaluating %s failed", r.key, exc_info=True)
            report.errors[r.key] = f"{what}: evaluation failed with {type(exc).__name__}: {first_line(exc)}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def tag_errors(client: MlflowClient, records: Sequence, errors: Mapping[str, str]) -> None:
    """Tag versions that could not be evaluated with the audit status ``error`` and the reason.

    They then count as audited by the current metrics version, so later
    passes do not retry them; register a fixed version (or audit with
    ``--force``) after fixing the cause.
    """
    from compbias.platform.audit import tags as T
    from compbias.platform.audit.registry import write_version_tags

    mv = T.current_metrics_version()
    for r in records:
        if r.key in errors:
            write_version_tags(client, r, T.STATUS_ERROR, {"reason": errors[r.key][:4000]}, run_id=None, metrics_version=mv)

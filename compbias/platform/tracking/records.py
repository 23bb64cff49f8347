"""What a model run records: its tags, metrics, params, dataset entities and contract tables.

Pure functions of a :class:`~compbias.platform.tasks.TaskResult` and the
study; nothing here talks to a tracking store (:mod:`.runs` writes what they
return).  ``mlflow.data.from_pandas`` builds a dataset entity in memory and
reads no process-wide URI.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd

from compbias import contract as C
from compbias.contract import metric_key
from compbias.platform.config import StudySpec
from compbias.platform.plan import ModelTask
from compbias.platform.tasks import TaskResult

if TYPE_CHECKING:
    from compbias.platform.tracking.runs import FinishedModel

__all__ = [
    "DATASET_CONTEXT_TAG",
    "flatten_params",
    "is_evaluation_metric",
    "member_info",
    "metric_series",
    "model_metrics",
    "model_params",
    "model_tags",
    "split_datasets",
    "write_tables",
]

#: tag MLflow puts on a dataset input: what the run did with it
DATASET_CONTEXT_TAG = "mlflow.data.context"


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as flat ``a.b.0.c`` -> text params (``None`` as ``null``)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten_params(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            out.update(flatten_params(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = "null" if data is None else str(data)
    return out

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


def metric_series(info: dict[str, Any]) -> dict[str, list[float]]:
    """The per-epoch series of a job's info (lists of finite numbers), by metric key."""
    out = {}
    for k, v in info.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and _finite(x) for x in v):
            out[metric_key(k)] = [float(x) for x in v]
    return out


def model_params(spec: StudySpec, task: ModelTask) -> dict[str, str]:
    """The params of a model run (and of its LoggedModel): the task and the settings that made it."""
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


def split_datasets(spec: StudySpec, result: TaskResult) -> dict[str, Any]:
    """The dataset entities of a result's splits: ``training`` (when shipped) and ``evaluation``."""
    test = result.predictions.drop(columns=[c for c in ("pred", "prob") if c in result.predictions.columns])
    out = {"evaluation": _dataset_entity(test.reset_index(drop=True), f"{spec.dataset.kind}-test", spec)}
    if result.train_split is not None:
        out["training"] = _dataset_entity(result.train_split.reset_index(drop=True), f"{spec.dataset.kind}-train", spec)
    return out


def is_evaluation_metric(key: str) -> bool:
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


def write_tables(out: Path, result: TaskResult, study_text: str) -> None:
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


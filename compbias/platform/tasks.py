"""What one model task does, wherever it runs (a Ray worker or the driver).

A task trains a baseline or compresses one, evaluates it on the test split and
returns a :class:`TaskResult` made of plain values: tables, numbers and the
model's files as bytes. It never talks to MLflow; the driver logs results.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from compbias.platform.config import StudySpec, parse_study
from compbias.platform.plan import ModelTask

__all__ = ["TaskResult", "ModelFiles", "execute_task", "model_files_from_dir", "write_model_files"]

# A model as files: {"weights.safetensors": b"...", "model_spec.json": b"..."}.
ModelFiles = dict[str, bytes]

_DATASETS: dict[str, Any] = {}


@dataclass
class TaskResult:
    """Everything a finished task hands back to the driver.

    Attributes
    ----------
    task : ModelTask
    predictions : pandas.DataFrame
        ``example_id``, ``label``, ``pred``, ``prob`` and the group columns.
    per_class, per_group : pandas.DataFrame
        Confusion counts and rates from ``compbias.metrics``.
    info : dict
        The job's info (sparsity, size_bytes, losses, ...).
    model_files : dict of str to bytes
        The files written by ``compbias.jobs.save_model``.
    node_id : str
        The Ray node that ran the task (``local`` outside Ray).
    seconds : float
        Wall time of the task body.
    input_shape : tuple of int
    n_classes : int
    extra : dict
        Timing facts (``pid``, ``started``, ``ended``).
    train_split : pandas.DataFrame or None
        The training split as the driver logs it (an MLflow dataset input):
        ``example_id``, ``label`` and the group columns, one row per training
        example; no images. None for results made without it.
    class_names : list of str
        The dataset's class names, in class-id order (empty when unknown).
    positive_class : int or None
        The dataset's positive class id (binary tasks), as the dataset resolved it.
    group_columns : list of str
        The group attribute columns of ``predictions``.
    """

    task: ModelTask
    predictions: pd.DataFrame
    per_class: pd.DataFrame
    per_group: pd.DataFrame
    info: dict[str, Any]
    model_files: ModelFiles
    node_id: str
    seconds: float
    input_shape: tuple[int, ...] = ()
    n_classes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    train_split: pd.DataFrame | None = None
    class_names: list[str] = field(default_factory=list)
    positive_class: int | None = None
    group_columns: list[str] = field(default_factory=list)


def model_files_from_dir(directory: str | Path) -> ModelFiles:
    """Read the files of a saved model into memory.

    Parameters
    ----------
    directory : str or Path
        A directory written by ``compbias.jobs.save_model``.

    Returns
    -------
    dict of str to bytes
    """
    d = Path(directory)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def write_model_files(files: ModelFiles, directory: str | Path) -> Path:
    """Write model files (as returned by a task) into a directory.

    Parameters
    ----------
    files : dict of str to bytes
    directory : str or Path
        Created if missing.

    Returns
    -------
    Path
        The directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (d / name).write_bytes(blob)
    return d


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - ray missing or not in a worker
        pass
    return "local"


def _dataset(spec: StudySpec):
    """Load (once per worker process) the study's dataset."""
    from compbias import jobs

    opts = spec.dataset.loader_options()
    if spec.dataset.kind != "digits":
        from compbias._locations import cache_dir

        cache = str(cache_dir("datasets"))  # under $COMPBIAS_CACHE_DIR when set
        opts["cache_dir"] = cache
    key = repr((spec.dataset.kind, sorted(opts.items(), key=lambda kv: kv[0])))
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = jobs.load_dataset(spec.dataset.kind, **opts)
    return _DATASETS[key]


def study_dataset(spec: StudySpec):
    """The study's dataset, loaded once per process (the cache the tasks of this process share)."""
    return _dataset(spec)


def check_study_model(spec: StudySpec) -> None:
    """Build the study's model for its dataset once and check its output, before any task runs.

    A built-in architecture is right by construction; a factory model
    (``model: package.module:callable``) is run on one batch of the dataset's
    inputs (:func:`compbias.jobs.check_model_output`), so that a model with
    the wrong number of outputs, or one that cannot take the dataset's
    images, is refused before anything trains or is logged.

    Raises
    ------
    ValueError
        Naming the problem and what to change in the study file.
    """
    from compbias import jobs

    if ":" not in str(spec.model.arch):
        return
    bundle = _dataset(spec)
    try:
        jobs.build_model(spec.model.arch, bundle.n_classes, bundle.input_shape, spec.model.width, seed=0,
                         kwargs=spec.model.kwargs, blocks=spec.model.blocks)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"model: {spec.model.arch!r} cannot be built: {type(exc).__name__}: {exc}") from None


def _load_files(files: ModelFiles):
    from compbias import jobs

    with tempfile.TemporaryDirectory(prefix="compbias-model-") as tmp:
        write_model_files(files, tmp)
        return jobs.load_model(tmp)


def execute_task(
    task: ModelTask, spec_data: dict[str, Any], baseline: ModelFiles | None = None, *, tracking_uri: str | None = None
) -> TaskResult:
    """Train or compress one model and evaluate it.

    Parameters
    ----------
    task : ModelTask
    spec_data : dict
        The resolved study config (``StudySpec.resolved()``), plain data so it
        travels to workers without pickling pydantic objects.
    baseline : dict of str to bytes, optional
        The baseline model's files; required for compressed tasks.
    tracking_uri : str, optional
        The store (tracking and registry) a ``baseline: {model_uri: ...}`` is
        downloaded from; default: MLflow's current URIs (read, not set).

    Returns
    -------
    TaskResult

    Raises
    ------
    ValueError
        If a compressed task gets no baseline.
    """
    from compbias import jobs

    t0 = time.perf_counter()
    started = time.time()
    spec = parse_study(spec_data, source="task payload")
    bundle = _dataset(spec)
    train = spec.train
    if task.role == "baseline":
        # A factory model is checked on one batch of the dataset's inputs here, before any training.
        model = jobs.build_model(spec.model.arch, bundle.n_classes, bundle.input_shape, spec.model.width, seed=task.seed,
                                 kwargs=spec.model.kwargs, blocks=spec.model.blocks)
        if spec.baseline is not None:
            source = _load_given_baseline(spec, task, model, tracking_uri=tracking_uri)
            history: list = []
            _progress(task)(f"baseline from {spec.baseline.kind} {source} (not trained)")
        else:
            model, history = jobs.train_model(
                model,
                bundle,
                epochs=train.epochs,
                batch_size=train.batch_size,
                lr=train.lr,
                momentum=train.momentum,
                weight_decay=train.weight_decay,
                seed=task.seed,
                log=_progress(task),
            )
        sparsity, _ = jobs.measure_sparsity(model, "magnitude")
        info = {"sparsity": sparsity, **jobs.model_size_bytes(model), "history": history}
    else:
        if baseline is None:
            raise ValueError(f"task {task.label} compresses a baseline but was given none")
        entry = spec.compression[task.compression_index]
        base_model = _load_files(baseline)
        model, info = jobs.compress_model(
            base_model, bundle, entry.method, task.level_value, seed=task.seed, log=_progress(task), **entry.job_options(train)
        )
    evaluation = jobs.evaluate(model, bundle)
    info["pred_ties"] = evaluation.n_ties  # logged as a metric: examples whose top logits tie (see jobs.evaluate)
    with tempfile.TemporaryDirectory(prefix="compbias-save-") as tmp:
        jobs.save_model(model, _model_spec(spec, bundle, task), tmp)
        files = model_files_from_dir(tmp)
    return TaskResult(
        task=task,
        predictions=evaluation.predictions,
        per_class=evaluation.per_class,
        per_group=evaluation.per_group,
        info=_plain_info(info),
        model_files=files,
        node_id=_node_id(),
        seconds=time.perf_counter() - t0,
        input_shape=tuple(int(x) for x in bundle.input_shape),
        n_classes=int(bundle.n_classes),
        extra={"pid": os.getpid(), "started": started, "ended": time.time()},
        train_split=_split_frame(bundle.train_frame, bundle.group_columns),
        class_names=[str(c) for c in getattr(bundle, "class_names", None) or []],
        positive_class=getattr(bundle, "positive_class", None),
        group_columns=list(getattr(bundle, "group_columns", None) or []),
    )


def _resolve_path(text: str) -> Path:
    """A baseline weights path: absolute, or relative to the working directory (or to ``$PWD``, where the
    user launched compbias: Ray workers run elsewhere but inherit it)."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    for base in dict.fromkeys([os.getcwd(), os.environ.get("PWD") or os.getcwd()]):
        if (Path(base) / p).exists():
            return Path(base) / p
    return p


def _load_given_baseline(spec: StudySpec, task: ModelTask, model, *, tracking_uri: str | None = None) -> str:
    """Fill ``model`` (built by the study's ``model:``) with the baseline given in ``baseline:``; return its source.

    Weights files and the ``weights.safetensors`` of a model URI are checked
    against the model's state dict (keys and shapes) by
    ``compbias.jobs.load_state_file``; nothing is unpickled.
    """
    from compbias import jobs

    source = spec.baseline.source_for(task.seed, spec.seeds())
    if spec.baseline.kind == "weights":
        path = _resolve_path(source)
        if not path.is_file():
            raise FileNotFoundError(f"baseline.weights for seed {task.seed}: {source} not found (looked in {os.getcwd()})")
        jobs.load_state_file(model, path)
        return str(path)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="compbias-baseline-") as tmp:
        try:
            if tracking_uri:
                from mlflow import MlflowClient

                from compbias.platform.tracking.store import scoped_tracking_uri

                # MLflow's models:/ repository looks the version up in the process's registry whatever it is
                # told: the study's store for this one call, then the process's URIs as they were
                with scoped_tracking_uri(MlflowClient(tracking_uri, tracking_uri)):
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                                     tracking_uri=tracking_uri, registry_uri=tracking_uri))
            else:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
        except Exception as exc:
            raise ValueError(
                f"baseline.model_uri for seed {task.seed}: cannot download {source!r} from {tracking_uri or mlflow.get_tracking_uri()} "
                f"({type(exc).__name__}: {exc}); check the name and version and the tracking/registry URI"
            ) from None
        found = [local] if local.is_file() and local.suffix == ".safetensors" else sorted(local.rglob("*.safetensors"))
        if len(found) != 1:
            files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())[:10] if local.is_dir() else [local.name]
            raise ValueError(
                f"baseline.model_uri for seed {task.seed}: {source!r} holds {len(found)} safetensors files (files: {files}); "
                "compbias loads exactly one weights.safetensors and never unpickles a model (an MLflow pytorch-flavour "
                "model is pickled): log the state dict as safetensors (safetensors.torch.save_file) in the version, or "
                "register a model made by compbias study"
            )
        jobs.load_state_file(model, found[0])
    return source


def _split_frame(frame: pd.DataFrame, group_columns: list[str]) -> pd.DataFrame:
    """``example_id``, ``label`` and the group columns of a split (ids and codes only: small to ship)."""
    cols = ["example_id", "label", *[g for g in group_columns if g in frame.columns]]
    return frame[cols].reset_index(drop=True)


def _progress(task: ModelTask):
    """A progress printer for the console; lines carry the task's label.

    In a Ray worker, Ray already prefixes each line with the task's name (the
    label), so the label is not repeated there.
    """
    prefix = "" if os.environ.get("COMPBIAS_RAY_WORKER") else f"[{task.label}] "

    def log(msg: str) -> None:
        print(f"{prefix}{msg}", flush=True)

    return log


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """Numbers stay numbers; per-epoch history records become series ``<key>`` (one value per epoch)."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if k == "history" and isinstance(v, list):
            series: dict[str, list[float]] = {}
            for rec in v:
                for hk, hv in (rec or {}).items():
                    if isinstance(hv, (int, float)) and not isinstance(hv, bool):
                        series.setdefault(f"history/{hk}", []).append(float(hv))
            out.update({hk: vals for hk, vals in series.items() if len(vals) == len(v)})
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def _model_spec(spec: StudySpec, bundle, task: ModelTask) -> dict[str, Any]:
    return {
        "class_names": [str(c) for c in getattr(bundle, "class_names", [])],
        "study": spec.name,
        "seed": task.seed,
        "method": task.method,
        "level": task.level,
    }

"""Packaging a model for MLflow: the models-from-code pyfunc, its requirements, signature and code copy, the LoggedModel.

Nothing here reads or sets MLflow's process-wide URIs: ``mlflow.pyfunc.save_model``
writes a local directory, and the LoggedModel is created, uploaded and
finalized through the given client.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from compbias import contract as C
from compbias.platform.plan import ModelTask

__all__ = [
    "MODEL_VERSIONS_TAG",
    "PACKAGE_DIR",
    "PYFUNC_CODE",
    "finalize_failed",
    "log_pyfunc_model",
    "logged_model_name",
    "model_requirements",
    "package_copy",
    "save_pyfunc",
    "scratch_dir",
    "signature",
]

log = logging.getLogger("compbias.tracking")

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
#: The installed ``compbias`` package (its ``jobs`` and ``metrics`` ship with each model).
PACKAGE_DIR = Path(__file__).resolve().parents[2]
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
#: tag MLflow itself puts on a LoggedModel registered through ``mlflow.register_model``
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


@functools.lru_cache(maxsize=1)
def model_requirements() -> list[str]:
    reqs = []
    for name in _MODEL_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs  # cached: reading package metadata costs ~0.1 s per call


_SCRATCH: dict[str, Path] = {}


def scratch_dir() -> Path:
    """This process's directory for the code copy shipped with each pyfunc model, removed at exit."""
    d = _SCRATCH.get("dir")
    if d is None or not d.is_dir():
        d = Path(tempfile.mkdtemp(prefix="compbias-pyfunc-"))
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        _SCRATCH["dir"] = d
    return d


def package_copy() -> Path:
    """A copy of the compbias sources a served model needs (the package root, jobs, metrics).

    Shipped with each model (``code_paths``) so that ``mlflow models serve``
    works where compbias is not installed; made once per process.
    """
    root = scratch_dir() / "code" / "compbias"
    if not (root / "__init__.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", "metrics"):
            shutil.copytree(PACKAGE_DIR / sub, root / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        shutil.copy2(PACKAGE_DIR / "__init__.py", root / "__init__.py")  # last: marks the copy complete
    return root


def signature(input_shape: tuple[int, ...]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([ColSpec("long", "pred"), ColSpec("double", "prob")]),
    )




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


def save_pyfunc(model_dir: Path, weights: Path, input_shape: tuple[int, ...], mlflow_model) -> None:
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
            code_paths=[str(package_copy())],
            signature=signature(tuple(int(x) for x in input_shape)),
            pip_requirements=model_requirements(),
            mlflow_model=mlflow_model,
        )


def log_pyfunc_model(
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
        metadata = {"compbias": {k[len(C.PREFIX):]: v for k, v in tags.items() if k.startswith(C.PREFIX)}}
        save_pyfunc(
            local,
            weights,
            input_shape,
            Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id, metadata=metadata),
        )
        client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        finalize_failed(client, model.model_id)
        raise
    return model.model_id


def finalize_failed(client: MlflowClient, model_id: str | None) -> None:
    if not model_id:
        return
    from mlflow.entities import LoggedModelStatus

    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except MlflowException:  # pragma: no cover - the store itself is gone
        log.exception("could not mark logged model %s as failed", model_id)


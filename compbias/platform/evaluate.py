"""Bring your own models: evaluate registered versions that carry the lineage tags but no predictions.

A team that trains, prunes and quantizes its models with its own code can
register them in its MLflow Model Registry with the lineage tags of
:mod:`compbias.contract` (``compbias.study``, ``compbias.role``,
``compbias.seed``, and for compressed versions ``compbias.method``,
``compbias.level`` and ``compbias.baseline_version``) and no predictions.
:func:`evaluate_versions` runs each such version on the dataset an
**evaluation spec** names and logs its predictions table and ``member.json``
to the version's run, in one upload, so that ``compbias audit`` audits it
like any other member.  ``compbias audit --evaluate SPEC.yaml`` does this
before it audits; with ``--watch`` each pass does it for new versions.

Model kinds (docs/bring-your-own.md, "Bring your own models"):

* MLflow ``pytorch`` flavour saved with ``serialization_format="pt2"``
  (a ``torch.export`` program, MLflow 3's default): loaded after MLflow's own
  check that the archive holds no pickle payload.
* a state dict (``mlflow.pytorch.log_state_dict``'s ``state_dict.pth``, read
  with ``torch.load(weights_only=True)``, or ``*.safetensors``) rebuilt with the
  ``state_dict.factory`` the spec names.
* ONNX: the ``onnx`` flavour, or a ``.onnx`` file among the version's
  artifacts, run with onnxruntime on the CPU.
* MLflow ``pyfunc`` (and the ``pytorch`` flavour saved whole with pickle):
  loading them executes code stored with the model, so they are refused
  unless ``allow_pickle=True`` (``--allow-pickle``).  A ``pyfunc`` whose loader
  is ``mlflow.pytorch`` (pt2) or ``mlflow.onnx`` is loaded as that flavour.

Security rule: nothing is unpickled and no code stored with a model is run
unless the caller opts in; the refusal names the safe alternatives.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C

log = logging.getLogger("compbias.evaluate")

__all__ = [
    "EvalSpec",
    "EvaluationData",
    "EvaluationError",
    "EvaluationReport",
    "LoadedModel",
    "PickleRefused",
    "SAFE_ALTERNATIVES",
    "evaluate_versions",
    "evaluate_model",
    "load_data",
    "load_local_model",
    "load_spec",
    "log_predictions",
    "pending_versions",
]

#: Run tag naming the model format a version was evaluated as.
EVALUATED_KIND = C.PREFIX + "evaluation.model_kind"
#: Run tag holding a hash of the evaluation spec the predictions came from.
EVALUATED_SPEC = C.PREFIX + "evaluation.spec_hash"

SAFE_ALTERNATIVES = (
    "log the model without pickle: a state dict (mlflow.pytorch.log_state_dict or a .safetensors file) "
    "with a factory named in the evaluation spec (state_dict.factory), an ONNX model (mlflow.onnx.log_model), "
    "a torch.export program (mlflow.pytorch.log_model(..., serialization_format='pt2')), or log the "
    "predictions only (compbias register / compbias.log_member)"
)

OUTPUT_KINDS = ("auto", "logits", "probabilities", "labels")


class EvaluationError(ValueError):
    """A version cannot be evaluated, or the spec is invalid; the message says what to do."""


class PickleRefused(EvaluationError):
    """Loading the model would unpickle data or run code stored with it, and the caller did not opt in."""


# --------------------------------------------------------------------------
# The evaluation spec
# --------------------------------------------------------------------------


@dataclass
class EvalSpec:
    """A parsed evaluation spec (``compbias audit --evaluate SPEC.yaml``).

    Attributes
    ----------
    dataset : dict, optional
        A compbias study file's ``dataset:`` section (``kind``, ``root``,
        ``groups``...), loaded with :func:`compbias.jobs.load_dataset`; its
        test split is evaluated.
    table : dict, optional
        A predictions-only dataset: ``path`` (parquet or CSV), ``features``
        (list of columns, the model's inputs), ``groups`` (group columns),
        ``example_id`` and ``label`` (column names, default those), ``shape``
        (optional: reshape each feature row to this input shape).
    num_classes : int, optional
        Required for a table unless ``class_names`` is given; for a dataset it
        must agree with the dataset's classes.
    class_names : list of str, optional
    positive_class : int or str, optional
        Class id or name whose group rates the audit reports.
    batch_size : int
    output : {'auto', 'logits', 'probabilities', 'labels'}
        What the model returns: ``(N, num_classes)`` scores (``auto`` treats
        rows of non-negative numbers summing to one as probabilities, anything
        else as logits) or ``labels``, ``(N,)`` class ids.
    normalize : dict, optional
        ``mean`` and ``std`` (one value per channel or feature) applied to the
        inputs, which are otherwise in ``[0, 1]`` for images.
    factory : str, optional
        ``module:function`` that builds the architecture of versions stored as
        state dicts (``state_dict.factory``), with ``factory_kwargs``.
    python_path : list of path
        Directories added to ``sys.path`` to import ``factory``.
    onnx_input, onnx_output : str, optional
        Input and output names of ONNX models with several of them.
    audit : dict, optional
        An ``audit:`` section (thresholds...) logged with the dataset as the
        member's ``study.yaml``.
    registered_models : list of str, optional
        Evaluate only versions of these registered models (a registry with
        models of several input kinds needs one spec per kind).
    source : path, optional
        The spec file.
    """

    dataset: dict | None = None
    table: dict | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    positive_class: int | str | None = None
    batch_size: int = 256
    output: str = "auto"
    normalize: dict | None = None
    factory: str | None = None
    factory_kwargs: dict = field(default_factory=dict)
    python_path: list[str] = field(default_factory=list)
    onnx_input: str | None = None
    onnx_output: str | None = None
    audit: dict | None = None
    registered_models: list[str] | None = None
    source: Path | None = None

    def digest(self) -> str:
        """A short hash of what determines the predictions."""
        body = {k: getattr(self, k) for k in ("dataset", "table", "num_classes", "class_names", "positive_class",
                                              "output", "normalize", "factory", "factory_kwargs")}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SPEC_KEYS = {"dataset", "study", "table", "num_classes", "class_names", "positive_class", "batch_size", "output",
              "normalize", "state_dict", "onnx", "audit", "registered_models"}


def load_spec(source: str | os.PathLike | Mapping) -> EvalSpec:
    """Read and check an evaluation spec.

    Parameters
    ----------
    source : path or mapping
        A YAML file, or its parsed content.  Exactly one of ``dataset:`` (a
        study file's dataset section), ``study:`` (a study file whose
        ``dataset:`` section is used) or ``table:`` (a predictions-only
        dataset).  Relative paths are read against the spec file's folder.

    Returns
    -------
    EvalSpec

    Raises
    ------
    EvaluationError
        Naming the invalid entry.
    """
    base = Path.cwd()
    where = "the evaluation spec"
    path = None
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source).expanduser()
        where = f"evaluation spec {path}"
        if not path.is_file():
            raise EvaluationError(f"{where} does not exist; write a YAML file with a dataset: or table: section "
                                  "(docs/bring-your-own.md)")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise EvaluationError(f"{where} is not valid YAML{_yaml_where(exc)}") from None
        base = path.resolve().parent
    if not isinstance(raw, dict):
        raise EvaluationError(f"{where} must be a mapping with a dataset:, study: or table: section")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise EvaluationError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    chosen = [k for k in ("dataset", "study", "table") if raw.get(k) is not None]
    if len(chosen) != 1:
        raise EvaluationError(f"{where} needs exactly one of dataset:, study: or table:, got {chosen or 'none'}")

    def rel(p) -> str:
        q = Path(str(p)).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    spec = EvalSpec(source=path)
    if "study" in chosen:
        study_path = Path(rel(raw["study"]))
        try:
            study = yaml.safe_load(study_path.read_text())
        except OSError as exc:
            raise EvaluationError(f"{where}: cannot read study file {study_path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise EvaluationError(f"{where}: study file {study_path} is not valid YAML{_yaml_where(exc)}") from None
        if not isinstance(study, dict) or not isinstance(study.get("dataset"), dict):
            raise EvaluationError(f"{where}: study file {study_path} has no dataset: section")
        spec.dataset = dict(study["dataset"])
        if spec.dataset.get("root") is not None:
            root = Path(str(spec.dataset["root"])).expanduser()
            spec.dataset["root"] = str(root if root.is_absolute() else (study_path.resolve().parent / root).resolve())
        if raw.get("audit") is None and isinstance(study.get("audit"), dict):
            spec.audit = dict(study["audit"])
    elif "dataset" in chosen:
        if not isinstance(raw["dataset"], dict) or "kind" not in raw["dataset"]:
            raise EvaluationError(f"{where}: dataset: must be a study file's dataset section with a kind "
                                  "(digits, imagefolder, celeba, cifar10, cifar100)")
        spec.dataset = dict(raw["dataset"])
        if spec.dataset.get("root") is not None:
            spec.dataset["root"] = rel(spec.dataset["root"])
    else:
        table = raw["table"]
        if not isinstance(table, dict) or not table.get("path"):
            raise EvaluationError(f"{where}: table: needs a path (a parquet or CSV file)")
        extra = sorted(set(table) - {"path", "features", "groups", "example_id", "label", "shape"})
        if extra:
            raise EvaluationError(f"{where}: unknown table key(s) {extra}; allowed: path, features, groups, "
                                  "example_id, label, shape")
        features = table.get("features")
        if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
            raise EvaluationError(f"{where}: table.features must list the feature columns (the model's inputs)")
        groups = table.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise EvaluationError(f"{where}: table.groups must be a list of column names")
        shape = table.get("shape")
        if shape is not None and (not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape)
                                  or int(np.prod(shape)) != len(features)):
            raise EvaluationError(f"{where}: table.shape {shape!r} must be positive ints whose product is the "
                                  f"number of features ({len(features)})")
        spec.table = {"path": rel(table["path"]), "features": list(features), "groups": list(groups),
                      "example_id": str(table.get("example_id", C.EXAMPLE_ID)), "label": str(table.get("label", C.LABEL)),
                      "shape": shape}
        if raw.get("num_classes") is None and not raw.get("class_names"):
            raise EvaluationError(f"{where}: a table dataset needs num_classes (or class_names)")
    if spec.dataset is not None:
        _dataset_spec(spec.dataset)  # a bad section is named before any model is downloaded
    if raw.get("num_classes") is not None:
        n = raw["num_classes"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise EvaluationError(f"{where}: num_classes must be an integer >= 2, got {n!r}")
        spec.num_classes = n
    if raw.get("class_names") is not None:
        names = raw["class_names"]
        if not isinstance(names, list) or len(names) < 2:
            raise EvaluationError(f"{where}: class_names must be a list of at least two names")
        spec.class_names = [str(x) for x in names]
        if spec.num_classes is not None and spec.num_classes != len(names):
            raise EvaluationError(f"{where}: {len(names)} class_names for num_classes {spec.num_classes}")
        spec.num_classes = len(names)
    spec.positive_class = raw.get("positive_class")
    bs = raw.get("batch_size", 256)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise EvaluationError(f"{where}: batch_size must be a positive integer, got {bs!r}")
    spec.batch_size = bs
    out = raw.get("output", "auto")
    if out not in OUTPUT_KINDS:
        raise EvaluationError(f"{where}: output must be one of {list(OUTPUT_KINDS)}, got {out!r}")
    spec.output = out
    norm = raw.get("normalize")
    if norm is not None:
        if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
            raise EvaluationError(f"{where}: normalize needs exactly mean and std (a number or one per channel)")
        try:
            std = np.atleast_1d(np.asarray(norm["std"], dtype=np.float64))
            np.atleast_1d(np.asarray(norm["mean"], dtype=np.float64))
        except (TypeError, ValueError):
            raise EvaluationError(f"{where}: normalize mean/std must be numbers or lists of numbers") from None
        if (std <= 0).any():
            raise EvaluationError(f"{where}: normalize std must be positive")
        spec.normalize = {"mean": norm["mean"], "std": norm["std"]}
    sd = raw.get("state_dict")
    if sd is not None:
        if not isinstance(sd, dict) or not isinstance(sd.get("factory"), str) or ":" not in sd["factory"]:
            raise EvaluationError(f"{where}: state_dict.factory must be 'module:function', e.g. torchvision.models:resnet18")
        extra = sorted(set(sd) - {"factory", "kwargs", "python_path"})
        if extra:
            raise EvaluationError(f"{where}: unknown state_dict key(s) {extra}; allowed: factory, kwargs, python_path")
        if not isinstance(sd.get("kwargs") or {}, dict):
            raise EvaluationError(f"{where}: state_dict.kwargs must be a mapping")
        spec.factory = sd["factory"]
        spec.factory_kwargs = dict(sd.get("kwargs") or {})
        pp = sd.get("python_path") or []
        spec.python_path = [rel(p) for p in ([pp] if isinstance(pp, str) else pp)]
    onnx = raw.get("onnx")
    if onnx is not None:
        if not isinstance(onnx, dict) or set(onnx) - {"input", "output"}:
            raise EvaluationError(f"{where}: onnx: takes input and output (tensor names)")
        spec.onnx_input, spec.onnx_output = onnx.get("input"), onnx.get("output")
    if raw.get("registered_models") is not None:
        names = raw["registered_models"]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise EvaluationError(f"{where}: registered_models must be a list of registered model names")
        spec.registered_models = list(names)
    if raw.get("audit") is not None:
        if not isinstance(raw["audit"], dict):
            raise EvaluationError(f"{where}: audit: must be a mapping (a study file's audit section)")
        spec.audit = dict(raw["audit"])
    return spec


def _yaml_where(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: <problem>`` in one line."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{at}: {getattr(exc, 'problem', None) or _first_line(exc)}"


# --------------------------------------------------------------------------
# The evaluation data
# --------------------------------------------------------------------------


@dataclass
class EvaluationData:
    """The examples every version is evaluated on.

    Attributes
    ----------
    frame : pandas.DataFrame
        ``example_id``, ``label``, the group columns (integer codes) and
        ``path`` when the examples are image files; one row per example.
    inputs : numpy.ndarray
        float32 model inputs, row ``i`` for ``frame`` row ``i``.
    features : pandas.DataFrame or None
        The raw feature columns of a table dataset (what a pyfunc receives).
    info : compbias.contract.MemberInfo
    study_yaml : dict or None
        ``dataset:`` (and ``audit:``) logged as the member's ``study.yaml``.
    """

    frame: pd.DataFrame
    inputs: np.ndarray
    features: pd.DataFrame | None
    info: C.MemberInfo
    study_yaml: dict | None = None


def load_data(spec: EvalSpec) -> EvaluationData:
    """Load the examples an evaluation spec names.

    Parameters
    ----------
    spec : EvalSpec

    Returns
    -------
    EvaluationData

    Raises
    ------
    EvaluationError
        The dataset cannot be loaded or disagrees with the spec.
    """
    data = _load_dataset_section(spec) if spec.dataset is not None else _load_table(spec)
    if spec.normalize is not None:
        mean = np.asarray(spec.normalize["mean"], dtype=np.float32)
        std = np.asarray(spec.normalize["std"], dtype=np.float32)
        x = data.inputs
        if x.ndim == 4 and mean.ndim == 1 and mean.size > 1:
            mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
        try:
            data.inputs = ((x - mean) / std).astype(np.float32)
        except ValueError:
            raise EvaluationError(f"normalize mean/std of length {mean.size} do not fit inputs of shape "
                                  f"{tuple(x.shape[1:])}; give one value per channel (or per feature)") from None
    return data


def _load_dataset_section(spec: EvalSpec) -> EvaluationData:
    from compbias.jobs import load_dataset

    dspec = _dataset_spec(spec.dataset)
    try:
        bundle = load_dataset(dspec.kind, **dspec.loader_options())
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise EvaluationError(f"cannot load the {dspec.kind} dataset: {exc}") from None
    if spec.num_classes is not None and spec.num_classes != bundle.n_classes:
        raise EvaluationError(f"the evaluation spec says num_classes {spec.num_classes} but the {dspec.kind} dataset "
                              f"has {bundle.n_classes} classes {bundle.class_names}")
    names = spec.class_names or list(bundle.class_names)
    if len(names) != bundle.n_classes:
        raise EvaluationError(f"{len(names)} class_names for the dataset's {bundle.n_classes} classes")
    pos = spec.positive_class if spec.positive_class is not None else bundle.positive_class
    try:
        info = C.MemberInfo(num_classes=bundle.n_classes, class_names=names, positive_class=pos,
                            groups=list(bundle.group_columns))
    except C.ContractError as exc:
        raise EvaluationError(f"the evaluation spec's classes: {exc}") from None
    frame = bundle.test_frame.copy()
    x, _ = bundle.test.batch(slice(None))
    dataset = dspec.model_dump(mode="json")
    dataset["positive_class"] = info.positive_class
    study_yaml = {"dataset": dataset}
    if spec.audit:
        study_yaml["audit"] = spec.audit
    return EvaluationData(frame=frame, inputs=x.numpy().astype(np.float32), features=None, info=info, study_yaml=study_yaml)


def _dataset_spec(section: dict):
    """Validate a study file's dataset section with compbias's own schema; one-line errors."""
    from compbias.platform.config import DatasetSpec

    try:
        return DatasetSpec.model_validate(section)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'dataset'}: {e.get('msg')}" for e in errors())
        else:
            text = _first_line(exc)
        raise EvaluationError(f"the evaluation spec's dataset section is invalid: {text}") from None


def _load_table(spec: EvalSpec) -> EvaluationData:
    t = spec.table
    path = Path(t["path"])
    if not path.is_file():
        raise EvaluationError(f"the evaluation table {path} does not exist")
    try:
        raw = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as exc:
        raise EvaluationError(f"cannot read the evaluation table {path}: {exc}") from None
    id_col, label_col = t["example_id"], t["label"]
    needed = [id_col, label_col, *t["features"], *t["groups"]]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise EvaluationError(f"the evaluation table {path} lacks the column(s) {missing}; it has {list(raw.columns)}")
    num_classes = spec.num_classes
    names = spec.class_names
    labels = raw[label_col]
    if not pd.api.types.is_integer_dtype(labels):
        if names is None:
            raise EvaluationError(f"column {label_col!r} of {path} holds {labels.dtype} values; give integer class ids "
                                  "or list class_names in the spec")
        try:
            labels = labels.map(lambda v: C.resolve_class(v if isinstance(v, str) else str(v), num_classes, names))
        except C.ContractError as exc:
            raise EvaluationError(f"column {label_col!r} of {path}: {exc}") from None
    frame = pd.DataFrame({C.EXAMPLE_ID: raw[id_col], C.LABEL: labels})
    for g in t["groups"]:
        col = raw[g]
        if col.isna().any():
            raise EvaluationError(f"group column {g!r} of {path} has missing values")
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_integer_dtype(col):
            frame[g] = col.astype(np.int64)
        else:  # the contract's group columns are integer codes: sorted values -> 0..G-1
            levels = sorted(col.astype(str).unique())
            frame[g] = col.astype(str).map({v: i for i, v in enumerate(levels)}).astype(np.int64)
            log.info("group column %s coded %s", g, {v: i for i, v in enumerate(levels)})
    try:
        frame = C.validate_predictions(frame.assign(**{C.PRED: frame[C.LABEL]}), num_classes=num_classes,
                                       groups=t["groups"], where=f"the evaluation table {path}")
    except C.ContractError as exc:
        raise EvaluationError(str(exc).replace("pred value", "label value")) from None
    order = raw[id_col].argsort(kind="stable").to_numpy()
    feats = raw[t["features"]].iloc[order].reset_index(drop=True)
    try:
        x = feats.to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise EvaluationError(f"feature columns of {path} must be numeric") from None
    if not np.isfinite(x).all():
        raise EvaluationError(f"feature columns of {path} have missing or infinite values")
    if t.get("shape"):
        x = x.reshape(len(x), *t["shape"])
    try:
        info = C.MemberInfo(num_classes=num_classes, class_names=names, positive_class=spec.positive_class,
                            groups=list(t["groups"]))
    except C.ContractError as exc:
        raise EvaluationError(f"the evaluation spec's classes: {exc}") from None
    study_yaml = {"audit": spec.audit} if spec.audit else None
    return EvaluationData(frame=frame.drop(columns=[C.PRED]), inputs=x, features=feats, info=info, study_yaml=study_yaml)


# --------------------------------------------------------------------------
# Loading a model without running code stored with it
# --------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to predict.

    Attributes
    ----------
    kind : str
        ``pytorch-pt2``, ``pytorch-state-dict``, ``pytorch-pickle``, ``onnx`` or ``pyfunc``.
    predict : callable
        ``inputs -> numpy.ndarray`` for one batch (numpy array, or a DataFrame
        of features for a pyfunc on a table).
    wants_frame : bool
        True when ``predict`` takes a DataFrame of the table's features.
    """

    kind: str
    predict: Callable[[Any], np.ndarray]
    wants_frame: bool = False


def _refuse(what: str, why: str) -> PickleRefused:
    return PickleRefused(
        f"{what}: {why}; loading it executes code stored with the model, so compbias refuses it by default. "
        f"Safe alternatives: {SAFE_ALTERNATIVES}. If you trust the registry and everyone who can write to it, "
        "opt in with --allow-pickle (allow_pickle=True)."
    )


@contextlib.contextmanager
def _mlflow_pickle_allowed():
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    old = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _torch_module_predict(module) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "dequantize") and getattr(out, "is_quantized", False):
            out = out.dequantize()
        return out.detach().float().cpu().numpy()

    return predict


def _load_pt2(path: Path, allow_pickle: bool, what: str) -> LoadedModel:
    import torch

    if not allow_pickle:
        try:
            from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as check
        except ImportError:  # pragma: no cover - depends on the MLflow version
            raise _refuse(what, "this MLflow cannot check that the torch.export archive is free of pickles") from None
        try:
            check(str(path))
        except Exception as exc:
            raise _refuse(what, f"its torch.export archive holds a pickled payload ({_first_line(exc)})") from None
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise EvaluationError(f"{what}: cannot load the torch.export program {path.name}: {_first_line(exc)}") from None
    return LoadedModel("pytorch-pt2", _torch_module_predict(module))


def _load_state_dict(path: Path, spec: EvalSpec, what: str) -> LoadedModel:
    import torch

    if spec.factory is None:
        raise EvaluationError(
            f"{what} is a state dict ({path.name}) without its architecture; name the function that builds the "
            "model in the evaluation spec: state_dict: {factory: 'torchvision.models:resnet18', kwargs: {num_classes: 2}}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise EvaluationError(f"{what}: {path.name} is corrupt or truncated ({_first_line(exc)}); log it again") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # the restricted unpickler: tensors only
        except Exception as exc:
            if "weights_only" in str(exc) or "Weights only" in str(exc):
                raise _refuse(what, f"{path.name} holds objects other than tensors ({_first_line(exc)})") from None
            raise EvaluationError(f"{what}: {path.name} cannot be read ({_first_line(exc)}); log it again") from None
    if not isinstance(state, Mapping):
        raise EvaluationError(f"{what}: {path.name} holds a {type(state).__name__}, not a state dict")
    state = _fold_prune_masks(dict(state))
    module_name, _, func_name = spec.factory.partition(":")
    added = [p for p in spec.python_path if p not in sys.path]
    sys.path[:0] = added
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise EvaluationError(f"cannot import the state_dict factory {spec.factory!r}: {exc}; "
                              "install its package or add its folder to state_dict.python_path") from None
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)
    try:
        model = factory(**spec.factory_kwargs)
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise EvaluationError(f"{what}: the state dict does not fit {spec.factory}(**{spec.factory_kwargs}): "
                              f"{_first_line(exc)}") from None
    model.eval()
    return LoadedModel("pytorch-state-dict", _torch_module_predict(model))


def _fold_prune_masks(state: dict) -> dict:
    """``torch.nn.utils.prune`` leaves ``<p>_orig`` and ``<p>_mask``: fold them into ``<p>``."""
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state


def _load_onnx(path: Path, spec: EvalSpec, what: str) -> LoadedModel:
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EvaluationError(f"{what}: onnxruntime cannot load {path.name}: {_first_line(exc)}") from None
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    if spec.onnx_input is not None:
        chosen = [i for i in inputs if i.name == spec.onnx_input]
        if not chosen:
            raise EvaluationError(f"{what}: the ONNX model has no input {spec.onnx_input!r}; inputs: {[i.name for i in inputs]}")
        inp = chosen[0]
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        raise EvaluationError(f"{what}: the ONNX model has {len(inputs)} inputs {[i.name for i in inputs]}; "
                              "name the one that takes the examples in the spec (onnx: {input: NAME})")
    out_name = spec.onnx_output or outputs[0]
    if out_name not in outputs:
        raise EvaluationError(f"{what}: the ONNX model has no output {out_name!r}; outputs: {outputs}")
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(inp.type)
    if dtype is None:
        raise EvaluationError(f"{what}: the ONNX input {inp.name!r} takes {inp.type}; only float inputs are supported")

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([out_name], {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0])

    return LoadedModel("onnx", predict)


def _load_mlmodel(root: Path, spec: EvalSpec, allow_pickle: bool, what: str) -> LoadedModel:
    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EvaluationError(f"{what}: its MLmodel file is unreadable: {exc}") from None
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    if "onnx" in flavors or pyfunc.get("loader_module") == "mlflow.onnx":
        name = (flavors.get("onnx") or {}).get("data") or pyfunc.get("data") or "model.onnx"
        return _load_onnx(root / name, spec, what)
    if "pytorch" in flavors or pyfunc.get("loader_module") == "mlflow.pytorch":
        data = root / ((flavors.get("pytorch") or {}).get("model_data") or pyfunc.get("data") or "data")
        if (data / "model.pt2").is_file():
            return _load_pt2(data / "model.pt2", allow_pickle, what)
        if not (data / "model.pth").is_file():
            raise EvaluationError(f"{what}: its pytorch flavour has neither data/model.pt2 nor data/model.pth")
        if not allow_pickle:
            raise _refuse(what, "it is an MLflow pytorch model saved whole with pickle (data/model.pth)")
        module = _load_executing_code(root, "pytorch", what)
        module.eval()
        return LoadedModel("pytorch-pickle", _torch_module_predict(module))
    if pyfunc:
        if pyfunc.get("python_model") or pyfunc.get("model_code_path") or mlmodel.get("model_code_path"):
            why = "it is an MLflow pyfunc whose Python model is cloudpickled or a code file run at load time"
        else:
            why = f"it is an MLflow pyfunc loaded by {pyfunc.get('loader_module')!r}, which may unpickle its data"
        if not allow_pickle:
            raise _refuse(what, why)
        model = _load_executing_code(root, "pyfunc", what)
        return LoadedModel("pyfunc", lambda x: np.asarray(_pyfunc_output(model.predict(x))), wants_frame=True)
    raise EvaluationError(f"{what}: its MLmodel has flavours {sorted(flavors)}; compbias evaluates the pytorch, "
                          "onnx and python_function flavours (or log predictions only: compbias register)")


def _load_executing_code(root: Path, flavour: str, what: str):
    """The one place compbias unpickles a model or runs code stored with it.

    Reached only with ``allow_pickle=True`` (``--allow-pickle``); the
    security scan (tests/reliability/test_rel_security.py) exempts this
    function and nothing else.
    """
    import mlflow.pyfunc
    import mlflow.pytorch

    try:
        with _mlflow_pickle_allowed():
            if flavour == "pytorch":
                return mlflow.pytorch.load_model(str(root), map_location="cpu", weights_only=False)
            return mlflow.pyfunc.load_model(str(root))
    except Exception as exc:
        raise EvaluationError(f"{what}: cannot load the {flavour} model: {_first_line(exc)}") from None


def _pyfunc_output(out):
    if isinstance(out, pd.DataFrame):
        return out.to_numpy()
    if isinstance(out, pd.Series):
        return out.to_numpy()
    if isinstance(out, dict) and len(out) == 1:
        return np.asarray(next(iter(out.values())))
    return out


def load_local_model(root: str | os.PathLike, spec: EvalSpec, *, allow_pickle: bool = False,
                     what: str = "the model") -> LoadedModel:
    """Load a downloaded model directory (or file) for evaluation.

    Parameters
    ----------
    root : path
        A directory holding an ``MLmodel`` file, a state dict, a ``.pt2`` or
        an ``.onnx`` file, or one such file.
    spec : EvalSpec
        For the state-dict factory and ONNX tensor names.
    allow_pickle : bool
        Load models whose loading unpickles data or runs code stored with them.
    what : str
        Named in messages (e.g. ``version NAME/3``).

    Returns
    -------
    LoadedModel

    Raises
    ------
    PickleRefused
        The model would be unpickled and ``allow_pickle`` is false.
    EvaluationError
        Any other reason it cannot be loaded.
    """
    root = Path(root)
    if root.is_file():
        files, base = [root], root.parent
    else:
        base = root
        if (root / "MLmodel").is_file():
            return _load_mlmodel(root, spec, allow_pickle, what)
        nested = sorted(p.parent for p in root.rglob("MLmodel"))
        if len(nested) == 1:  # a version registered from a folder that holds the MLflow model
            return _load_mlmodel(nested[0], spec, allow_pickle, what)
        if len(nested) > 1:
            raise EvaluationError(f"{what}: its artifacts hold {len(nested)} MLflow models "
                                  f"({[str(p.relative_to(root)) for p in nested]}); register one model per version")
        files = sorted(p for p in root.rglob("*") if p.is_file())
    by_suffix = {}
    for f in files:
        by_suffix.setdefault(f.suffix.lower(), []).append(f)
    for suffix, loader in ((".onnx", lambda f: _load_onnx(f, spec, what)),
                           (".pt2", lambda f: _load_pt2(f, allow_pickle, what)),
                           (".safetensors", lambda f: _load_state_dict(f, spec, what))):
        found = by_suffix.get(suffix, [])
        if len(found) > 1:
            raise EvaluationError(f"{what}: its artifacts hold {len(found)} {suffix} files "
                                  f"({[str(f.relative_to(base)) for f in found]}); register one model per version")
        if found:
            return loader(found[0])
    state = [f for f in files if f.name == "state_dict.pth"]
    if state:
        return _load_state_dict(state[0], spec, what)
    pickles = [f for f in files if f.suffix.lower() in (".pth", ".pt", ".pkl", ".pickle", ".joblib", ".bin")]
    if pickles:
        raise _refuse(what, f"{pickles[0].name} is a pickle of unknown content") if not allow_pickle else EvaluationError(
            f"{what}: {pickles[0].name} is not an MLflow model; log it with mlflow.pytorch.log_model, "
            "mlflow.pytorch.log_state_dict or mlflow.onnx.log_model")
    raise EvaluationError(f"{what}: its artifacts hold no model compbias can evaluate (no MLmodel, .onnx, .pt2, "
                          f"state_dict.pth or .safetensors; found {[f.name for f in files][:10]})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# --------------------------------------------------------------------------
# Predicting
# --------------------------------------------------------------------------


def evaluate_model(model: LoadedModel, data: EvaluationData, spec: EvalSpec, *, what: str = "the model") -> pd.DataFrame:
    """Run a loaded model on the evaluation data and build its predictions table.

    Parameters
    ----------
    model : LoadedModel
    data : EvaluationData
    spec : EvalSpec
    what : str
        Named in messages.

    Returns
    -------
    pandas.DataFrame
        The contract's table: ``example_id``, ``label``, ``pred`` (argmax of
        the scores), ``prob`` (probability of ``pred``, when the model returns
        scores), the group columns and ``path`` when present.

    Raises
    ------
    EvaluationError
        The outputs do not have one row per example and ``num_classes``
        columns (or one class id per example for ``output: labels``), or hold
        non-finite values.
    """
    k = data.info.num_classes
    n = len(data.frame)
    bs = spec.batch_size
    chunks = []
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        if model.wants_frame and data.features is not None:
            batch = data.features.iloc[start:stop]
        else:
            batch = data.inputs[start:stop]
            if stop - start < bs:  # pad a short batch: models exported with a fixed batch size
                batch = np.concatenate([batch, np.repeat(batch[-1:], bs - (stop - start), axis=0)])
        try:
            out = np.asarray(model.predict(batch))
        except Exception as exc:
            raise EvaluationError(f"{what}: the model failed on inputs of shape {tuple(np.shape(batch))}: "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from None
        chunks.append(out[: stop - start] if out.ndim >= 1 else out)
    try:
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    except ValueError:
        raise EvaluationError(f"{what}: the model's output shape changes between batches "
                              f"({[tuple(c.shape) for c in chunks][:3]})") from None
    frame = data.frame.copy()
    labels_out = spec.output == "labels" or (spec.output == "auto" and out.ndim == 1 and np.issubdtype(out.dtype, np.integer))
    if labels_out:
        if out.shape != (n,) or not np.issubdtype(out.dtype, np.number) or not np.all(np.mod(out, 1) == 0):
            raise EvaluationError(f"{what}: expected {n} class ids (output: labels), the model returned shape {out.shape}")
        pred = out.astype(np.int64)
        if pred.min() < 0 or pred.max() >= k:
            raise EvaluationError(f"{what}: the model predicts class {int(pred.max())} (min {int(pred.min())}) but "
                                  f"the evaluation spec has {k} classes (ids 0..{k - 1})")
        prob = None
    else:
        if out.ndim != 2 or out.shape != (n, k):
            raise EvaluationError(
                f"{what}: the model returns outputs of shape {tuple(out.shape)} but the evaluation has {n} examples "
                f"of {k} classes, so (N, {k}) scores are expected; check num_classes in the spec and the model's "
                "output layer (or output: labels for a model that returns class ids)"
            )
        scores = out.astype(np.float64)
        if not np.isfinite(scores).all():
            raise EvaluationError(f"{what}: the model returned {int((~np.isfinite(scores)).sum())} NaN or infinite scores")
        is_prob = spec.output == "probabilities" or (
            spec.output == "auto" and (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))
        if is_prob:
            probs = scores
        else:
            z = scores - scores.max(axis=1, keepdims=True)
            e = np.exp(z)
            probs = e / e.sum(axis=1, keepdims=True)
        pred = scores.argmax(axis=1).astype(np.int64)
        prob = np.clip(probs[np.arange(n), pred], 0.0, 1.0)
    cols = {C.EXAMPLE_ID: frame[C.EXAMPLE_ID].to_numpy(np.int64), C.LABEL: frame[C.LABEL].to_numpy(np.int64),
            C.PRED: pred}
    if prob is not None:
        cols[C.PROB] = prob
    table = pd.DataFrame(cols)
    for c in frame.columns:
        if c not in (C.EXAMPLE_ID, C.LABEL):
            table[c] = frame[c].to_numpy()
    try:
        return C.validate_predictions(table, num_classes=k, groups=list(data.info.groups or ()), where=what)
    except C.ContractError as exc:
        raise EvaluationError(str(exc)) from None


# --------------------------------------------------------------------------
# Registry side
# --------------------------------------------------------------------------


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
        raise EvaluationError(f"{what}: the registry does not resolve {uri}: {_first_line(exc)}") from None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst,
                                                        tracking_uri=str(client.tracking_uri)))
    except Exception as exc:
        raise EvaluationError(
            f"{what}: its model files cannot be downloaded from {location}: {_first_line(exc)}; check that the "
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

    Each version is downloaded, loaded (see the module docstring for the
    formats and the pickle rule), run on the evaluation data, and its
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
                            tags={EVALUATED_KIND: model.kind, EVALUATED_SPEC: spec.digest()})
            report.evaluated[r.key] = model.kind
            acc = float((table[C.PRED] == table[C.LABEL]).mean())
            say(f"evaluated {r.key} ({model.kind}): {len(table)} examples, accuracy {acc:.4f}")
        except EvaluationError as exc:
            report.errors[r.key] = str(exc)
        except Exception as exc:  # an upload or registry failure: this version only, with what happened
            log.debug("evaluating %s failed", r.key, exc_info=True)
            report.errors[r.key] = f"{what}: evaluation failed with {type(exc).__name__}: {_first_line(exc)}"
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

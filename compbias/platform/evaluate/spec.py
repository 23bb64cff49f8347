"""The evaluation spec (``compbias audit --evaluate SPEC.yaml``): read and checked before any model is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from compbias import contract as C
from compbias.platform.evaluate.errors import EvaluationError, first_line

__all__ = ["EvalSpec", "OUTPUT_KINDS", "dataset_spec", "load_spec"]

OUTPUT_KINDS = ("auto", "logits", "probabilities", "labels")


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
        dataset_spec(spec.dataset)  # a bad section is named before any model is downloaded
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
    return f"{at}: {getattr(exc, 'problem', None) or first_line(exc)}"


def dataset_spec(section: dict):
    """Validate a study file's dataset section with compbias's own schema; one-line errors."""
    from compbias.platform.config import DatasetSpec

    try:
        return DatasetSpec.model_validate(section)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'dataset'}: {e.get('msg')}" for e in errors())
        else:
            text = first_line(exc)
        raise EvaluationError(f"the evaluation spec's dataset section is invalid: {text}") from None

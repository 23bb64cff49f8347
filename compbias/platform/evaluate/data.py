"""The evaluation data: the examples an evaluation spec names, loaded once for every version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from compbias import contract as C
from compbias.platform.evaluate.errors import EvaluationError, log
from compbias.platform.evaluate.spec import EvalSpec, dataset_spec

__all__ = ["EvaluationData", "SplitInputs", "load_data"]


class SplitInputs:
    """A dataset split's float32 model inputs, read a slice at a time (row ``i`` for ``frame`` row ``i``).

    What :class:`EvaluationData` holds for a study-style ``dataset:``
    section: every version reads the split batch by batch, so a split left
    in its image files (``compbias.jobs.data.FileImageDataset``) is never
    decoded whole. ``mean`` / ``std`` (the spec's ``normalize``) are
    applied to each slice.
    """

    def __init__(self, split, sample_shape: tuple[int, ...], mean: np.ndarray | None = None, std: np.ndarray | None = None):
        self.split, self.sample_shape, self.mean, self.std = split, tuple(sample_shape), mean, std

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.split), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("SplitInputs is read by slices of rows")
        x = self.split.batch(index)[0].numpy().astype(np.float32, copy=False)
        if self.mean is not None:
            x = ((x - self.mean) / self.std).astype(np.float32)
        return x


@dataclass
class EvaluationData:
    """The examples every version is evaluated on.

    Attributes
    ----------
    frame : pandas.DataFrame
        ``example_id``, ``label``, the group columns (integer codes) and
        ``path`` when the examples are image files; one row per example.
    inputs : numpy.ndarray or SplitInputs
        float32 model inputs, row ``i`` for ``frame`` row ``i``; read by
        slices of rows (a dataset split's are read from it slice by slice).
    features : pandas.DataFrame or None
        The raw feature columns of a table dataset (what a pyfunc receives).
    info : compbias.contract.MemberInfo
    study_yaml : dict or None
        ``dataset:`` (and ``audit:``) logged as the member's ``study.yaml``.
    """

    frame: pd.DataFrame
    inputs: "np.ndarray | SplitInputs"
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
            # the inputs' shape must survive: 3 channel means on 1-channel images would broadcast to 3 channels
            if np.broadcast_shapes((1, *x.shape[1:]), mean.shape, std.shape)[1:] != tuple(x.shape[1:]):
                raise ValueError("normalize changes the input shape")
            if isinstance(x, SplitInputs):  # applied to every slice when it is read
                x.mean, x.std = mean.astype(np.float32), std.astype(np.float32)
            else:
                data.inputs = ((x - mean) / std).astype(np.float32)
        except ValueError:
            raise EvaluationError(f"normalize mean/std of length {mean.size} do not fit inputs of shape "
                                  f"{tuple(x.shape[1:])}; give one value per channel (or per feature)") from None
    return data


def _load_dataset_section(spec: EvalSpec) -> EvaluationData:
    from compbias.jobs import load_dataset

    dspec = dataset_spec(spec.dataset)
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
    dataset = dspec.model_dump(mode="json")
    dataset["positive_class"] = info.positive_class
    study_yaml = {"dataset": dataset}
    if spec.audit:
        study_yaml["audit"] = spec.audit
    return EvaluationData(frame=frame, inputs=SplitInputs(bundle.test, bundle.input_shape), features=None, info=info,
                          study_yaml=study_yaml)


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

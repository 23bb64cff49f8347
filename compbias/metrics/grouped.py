"""Rates per group and per intersection of groups: :func:`group_rates` and its :class:`GroupRates` frame."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from compbias.metrics import _validation as v
from compbias.metrics._validation import validate_labels
from compbias.metrics._validation import safe_ratio
from compbias.metrics.rates import ClassRates, ovr_rates

__all__ = ["GroupRates", "group_rates"]

ERR_GROUP_MISSING = (
    "group attribute {name!r} is missing for {count} examples (first at "
    "index {index}); fill them with an explicit level such as 'unknown'."
)
ERR_GROUPS_EMPTY = "groups must name at least one attribute column."
ERR_RESERVED = "attribute names {names} clash with the table's own columns {reserved}; rename them."
ERR_POSITIVE_CLASS = "positive_class must be a class id in [0, {n}), got {value!r}."
ERR_METRIC = "metric must be one of {allowed}, got {value!r}."
ERR_METHOD = "method must be 'between_groups' or 'to_overall', got {value!r}."
ERR_GROUPING = "grouping {value!r} is not one of {allowed}."

_GROUP_METRICS = ("fpr", "fnr", "recall", "accuracy")
_RESERVED = ("model", "grouping", "group", "class", "size", "tp", "fp", "fn", "tn", "fpr", "fnr",
             "recall", "accuracy")


def _attribute_columns(groups, n: int) -> dict[str, np.ndarray]:
    if isinstance(groups, pd.DataFrame):
        cols = {str(c): groups[c].to_numpy() for c in groups.columns}
    elif isinstance(groups, pd.Series):
        cols = {str(groups.name) if groups.name is not None else "attr0": groups.to_numpy()}
    elif isinstance(groups, Mapping):
        cols = {str(k): np.asarray(val) for k, val in groups.items()}
    else:
        arr = v.as_array(groups, "groups")
        if arr.ndim == 1:
            cols = {"attr0": arr}
        elif arr.ndim == 2:
            cols = {f"attr{j}": arr[:, j] for j in range(arr.shape[1])}
        else:
            raise ValueError(v.ERR_NDIM.format(name="groups", expected="1 or 2 dimensions", shape=arr.shape))
    if not cols:
        raise ValueError(ERR_GROUPS_EMPTY)
    clash = sorted(set(cols) & set(_RESERVED))
    if clash:
        raise ValueError(ERR_RESERVED.format(names=clash, reserved=list(_RESERVED)))
    for name, col in cols.items():
        if col.ndim != 1:
            raise ValueError(v.ERR_NDIM.format(name=f"groups[{name!r}]", expected="1 dimension", shape=col.shape))
        v.check_same_length(col, n, f"groups[{name!r}]")
    return cols


@dataclass(frozen=True)
class GroupRates:
    """Rates per group and per intersection of groups (a fairlearn-style frame).

    Attributes
    ----------
    attributes : tuple of str
        The attribute columns, in the order given.
    groups : pandas.DataFrame
        One row per group: ``grouping`` (attribute names joined by ``&``),
        ``group`` (``name=value`` pairs joined by ``&``), one column per
        attribute (its value, or ``None`` when the grouping does not use it)
        and ``size`` (number of examples, possibly 0).
    rates : ClassRates
        Shape ``([n_models,] n_groups_total, n_classes)``, or without the
        class axis when ``positive_class`` is set.
    overall : ClassRates
        The same over all examples: ``([n_models,] n_classes)`` or
        ``([n_models,])``.
    accuracy : ndarray
        Top-1 accuracy per group, ``([n_models,] n_groups_total)``.
    overall_accuracy : ndarray
        Top-1 accuracy over all examples, ``([n_models,])``.
    positive_class : int or None
        The class whose rates are reported, for binary tasks.
    """

    attributes: tuple[str, ...]
    groups: pd.DataFrame
    rates: ClassRates
    overall: ClassRates
    accuracy: np.ndarray
    overall_accuracy: np.ndarray
    positive_class: int | None
    n_models: int | None

    def _metric(self, metric: str, rates: ClassRates, accuracy: np.ndarray) -> np.ndarray:
        if metric not in _GROUP_METRICS:
            raise ValueError(ERR_METRIC.format(allowed=list(_GROUP_METRICS), value=metric))
        if metric == "accuracy":
            return accuracy
        return getattr(rates, metric)

    @property
    def groupings(self) -> list[str]:
        """Names of the groupings, e.g. ``['sex', 'age', 'sex&age']``."""
        return list(dict.fromkeys(self.groups["grouping"]))

    @property
    def table(self) -> pd.DataFrame:
        """Long table: one row per group (and model, and class unless a
        positive class is set) with ``size, tp, fp, fn, tn, fpr, fnr,
        recall, accuracy``."""
        k = len(self.groups)
        frames = []
        models = range(self.n_models) if self.n_models is not None else [None]
        for m in models:
            sel = (lambda a: a[m]) if m is not None else (lambda a: a)
            cols = {n: sel(getattr(self.rates, n)) for n in ("tp", "fp", "fn", "tn", "fpr", "fnr")}
            cols["recall"] = sel(self.rates.recall)
            acc = sel(self.accuracy)
            if self.positive_class is None:
                c = cols["tp"].shape[-1]
                base = self.groups.loc[self.groups.index.repeat(c)].reset_index(drop=True)
                base.insert(2, "class", np.tile(np.arange(c), k))
                data = {n: a.reshape(-1) for n, a in cols.items()}
                data["accuracy"] = np.repeat(acc, c)
            else:
                base = self.groups.reset_index(drop=True).copy()
                base.insert(2, "class", self.positive_class)
                data = dict(cols)
                data["accuracy"] = acc
            frame = base.assign(**data)
            if m is not None:
                frame.insert(0, "model", m)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @property
    def by_group(self) -> pd.DataFrame:
        """The table indexed by (model,) group (, class)."""
        t = self.table
        index = [c for c in ("model", "group", "class") if c in t.columns]
        if self.positive_class is not None:
            index.remove("class")
        return t.set_index(index)

    def _grouping_rows(self, grouping: str | None) -> np.ndarray:
        allowed = self.groupings
        if grouping is None:
            grouping = allowed[-1]
        if grouping not in allowed:
            raise ValueError(ERR_GROUPING.format(value=grouping, allowed=allowed))
        return np.flatnonzero(self.groups["grouping"].to_numpy() == grouping)

    def _group_values(self, metric: str, grouping: str | None) -> tuple[np.ndarray, np.ndarray]:
        rows = self._grouping_rows(grouping)
        vals = self._metric(metric, self.rates, self.accuracy)
        axis = 0 if self.n_models is None else 1
        vals = np.take(vals, rows, axis=axis)
        overall = self._metric(metric, self.overall, self.overall_accuracy)
        return np.moveaxis(vals, axis, 0), overall

    def difference(self, metric: str = "fpr", *, method: str = "between_groups",
                   grouping: str | None = None) -> np.ndarray:
        """Largest gap of ``metric`` between groups (NaN groups ignored).

        Parameters
        ----------
        metric : {'fpr', 'fnr', 'recall', 'accuracy'}
        method : {'between_groups', 'to_overall'}
            ``max - min`` over groups, or ``max |group - overall|``.
        grouping : str, default=None
            A grouping such as ``'sex'`` or ``'sex&age'``; default the
            finest one (the intersection of all attributes when
            intersections are computed, else the last attribute).

        Returns
        -------
        ndarray or float
            Over the remaining axes (models, classes); NaN when no group
            has a defined value.
        """
        vals, overall = self._group_values(metric, grouping)
        with np.errstate(invalid="ignore"):
            if method == "between_groups":
                out = _nan_reduce(np.fmax.reduce, vals) - _nan_reduce(np.fmin.reduce, vals)
            elif method == "to_overall":
                out = _nan_reduce(np.fmax.reduce, np.abs(vals - overall))
            else:
                raise ValueError(ERR_METHOD.format(value=method))
        return out[()] if np.ndim(out) == 0 else out

    def ratio(self, metric: str = "fpr", *, method: str = "between_groups",
              grouping: str | None = None) -> np.ndarray:
        """Smallest ratio of ``metric`` between groups, in [0, 1].

        ``min / max`` over groups (``between_groups``) or the smallest of
        ``group / overall`` and ``overall / group`` (``to_overall``); NaN
        where the denominator is 0 or no group has a defined value.
        """
        vals, overall = self._group_values(metric, grouping)
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "between_groups":
                out = safe_ratio(_nan_reduce(np.fmin.reduce, vals), _nan_reduce(np.fmax.reduce, vals))
            elif method == "to_overall":
                r = np.fmin(safe_ratio(vals, np.broadcast_to(overall, vals.shape)),
                            safe_ratio(np.broadcast_to(overall, vals.shape), vals))
                out = _nan_reduce(np.fmin.reduce, r)
            else:
                raise ValueError(ERR_METHOD.format(value=method))
        return out[()] if np.ndim(out) == 0 else out


def _nan_reduce(func, vals: np.ndarray) -> np.ndarray:
    """fmin/fmax over axis 0 (NaN ignored; NaN if all NaN or no groups)."""
    if vals.shape[0] == 0:
        return np.full(vals.shape[1:], np.nan)
    return func(vals, axis=0)


def group_rates(y_true, y_pred, groups, n_classes, *, positive_class=None,
                intersections=True, smoothing=0.0):
    r"""Rates per group, per intersection of groups, and overall.

    Parameters
    ----------
    y_true : array-like of shape (n_examples,)
        True class ids in ``[0, n_classes)``.
    y_pred : array-like of shape (n_examples,) or (n_models, n_examples)
        Predictions of one model or of a population.
    groups : DataFrame, mapping of name to array, or array-like
        Attribute values of each example: a DataFrame with one column per
        attribute, a dict ``{name: values}``, a 1-D array (one attribute
        named ``attr0``) or a 2-D array of shape (n_examples, n_attributes)
        (attributes ``attr0``, ``attr1``, ...). Values may be of any type
        (ints, strings, booleans); missing values raise.
    n_classes : int
        Number of classes.
    positive_class : int, default=None
        For binary tasks: report only this class's one-vs-rest rates (the
        class axis is dropped). By default every class's rates are kept.
    intersections : bool, default=True
        Also compute every intersection of two or more attributes (e.g.
        ``sex&age``), over the Cartesian product of the observed levels;
        combinations with no example are kept with size 0 and NaN rates.
    smoothing : float, default=0.0
        Additive smoothing of the rates, see :func:`class_rates`.

    Returns
    -------
    result : GroupRates
        ``.table`` (long pandas DataFrame), ``.by_group``, ``.overall``,
        ``.difference(metric)``, ``.ratio(metric)``.

    Notes
    -----
    Inside each group :math:`g` the one-vs-rest rates of
    :func:`class_rates` are computed on the examples of that group only:

    .. math::

        FPR_{g,c} = \frac{FP_{g,c}}{FP_{g,c} + TN_{g,c}},\qquad
        FNR_{g,c} = \frac{FN_{g,c}}{FN_{g,c} + TP_{g,c}}

    Levels of each attribute are sorted. An empty group (size 0) has NaN
    rates; ``difference`` and ``ratio`` ignore NaN groups.

    References
    ----------
    Hooker, Moorosi et al. (2020), "Characterising Bias in Compressed
    Models", subgroup FPR/FNR on CelebA. The result object follows
    fairlearn's ``MetricFrame`` (overall / by group / difference / ratio).

    Examples
    --------
    >>> r = group_rates([1, 0, 1, 0], [1, 1, 0, 0], {"sex": ["f", "f", "m", "m"]}, 2,
    ...                 positive_class=1)
    >>> r.table[["group", "size", "fpr", "fnr"]]
       group  size  fpr  fnr
    0  sex=f     2  1.0  0.0
    1  sex=m     2  0.0  1.0
    >>> float(r.difference("fnr"))
    1.0
    """
    y_true, y_pred, n_classes = validate_labels(y_true, y_pred, n_classes)
    n = y_true.shape[0]
    smoothing = v.check_nonnegative(smoothing, "smoothing")
    if positive_class is not None:
        if isinstance(positive_class, bool) or not isinstance(positive_class, (int, np.integer)) \
                or not 0 <= int(positive_class) < n_classes:
            raise ValueError(ERR_POSITIVE_CLASS.format(n=n_classes, value=positive_class))
        positive_class = int(positive_class)
    cols = _attribute_columns(groups, n)
    names = tuple(cols)
    codes: dict[str, np.ndarray] = {}
    levels: dict[str, np.ndarray] = {}
    for name, col in cols.items():
        c, u = pd.factorize(pd.Series(col), sort=True)
        missing = c < 0
        if missing.any():
            raise ValueError(ERR_GROUP_MISSING.format(name=name, count=int(missing.sum()),
                                                      index=int(np.flatnonzero(missing)[0])))
        codes[name] = c.astype(np.int64)
        levels[name] = np.asarray(u, dtype=object)

    single = y_pred.ndim == 1
    preds = y_pred.reshape(1, -1) if single else y_pred
    combos: list[tuple[str, ...]] = [(a,) for a in names]
    if intersections:
        for r in range(2, len(names) + 1):
            combos.extend(itertools.combinations(names, r))

    rows: list[dict[str, Any]] = []
    parts: list[ClassRates] = []
    for combo in combos:
        sizes = [len(levels[a]) for a in combo]
        code = np.zeros(n, np.int64)
        for a, s in zip(combo, sizes):
            code = code * s + codes[a]
        n_g = int(np.prod(sizes))
        parts.append(ovr_rates(y_true, preds, code, True, n_g, n_classes, smoothing=smoothing))
        for values in itertools.product(*(levels[a] for a in combo)):
            row: dict[str, Any] = {"grouping": "&".join(combo),
                                   "group": "&".join(f"{a}={val}" for a, val in zip(combo, values))}
            for a in names:
                row[a] = None
            row.update({a: val for a, val in zip(combo, values)})
            rows.append(row)
    table = pd.DataFrame(rows, columns=["grouping", "group", *names])
    fields = ("tp", "fp", "fn", "tn")
    joined = {f: np.concatenate([getattr(p, f) for p in parts], axis=1) for f in fields}
    rates = ClassRates.from_counts(**joined, smoothing=smoothing)
    table["size"] = rates.n_examples[0, :, 0] if n_classes else 0
    accuracy = rates.accuracy
    overall = ovr_rates(y_true, preds, np.empty(0, np.int64), False, 1, n_classes, smoothing=smoothing)
    overall_acc = overall.accuracy[:, 0]
    overall = ClassRates.from_counts(*(getattr(overall, f)[:, 0] for f in fields), smoothing=smoothing)
    has_axis = positive_class is None
    if not has_axis:
        rates = ClassRates.from_counts(*(getattr(rates, f)[..., positive_class] for f in fields),
                                       smoothing=smoothing, has_class_axis=False)
        overall = ClassRates.from_counts(*(getattr(overall, f)[..., positive_class] for f in fields),
                                         smoothing=smoothing, has_class_axis=False)
    if single:
        rates = ClassRates.from_counts(*(getattr(rates, f)[0] for f in fields), smoothing=smoothing,
                                       has_class_axis=has_axis)
        overall = ClassRates.from_counts(*(getattr(overall, f)[0] for f in fields), smoothing=smoothing,
                                         has_class_axis=has_axis)
        accuracy, overall_acc = accuracy[0], overall_acc[0]
    return GroupRates(attributes=names, groups=table, rates=rates, overall=overall,
                      accuracy=accuracy, overall_accuracy=overall_acc,
                      positive_class=positive_class, n_models=None if single else preds.shape[0])

"""One-vs-rest counts and rates: :class:`ClassRates`, from confusion counts or from the one-vs-rest kernel."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._validation import safe_ratio
from compbias.metrics._confusion_kernels import ovr_kernel
from compbias.metrics._numba import threads_for
from compbias.metrics._validation import validate_groups, validate_labels

__all__ = ["ClassRates", "class_rates", "population_rates"]

ERR_COUNTS_SHAPE = (
    "counts must have shape (..., n_classes, n_classes) with rows = true "
    "class, columns = predicted class; got shape {shape}."
)
ERR_COUNTS_NEGATIVE = "counts must be non-negative integers; found {value} at index {index}."
ERR_NO_CLASS_AXIS = (
    "these rates hold one class only (a positive class was selected), so "
    "top-1 accuracy cannot be derived from them; use GroupRates.accuracy."
)


@dataclass(frozen=True)
class ClassRates:
    """One-vs-rest counts and rates per class.

    All attributes share the shape ``(..., n_classes)``: the leading axes of
    the counts they were computed from (models, groups) and the class axis.

    Attributes
    ----------
    tp, fp, fn, tn : ndarray of int64
        True positives, false positives, false negatives, true negatives.
    fpr, fnr : ndarray of float64
        False positive rate ``(FP + a) / (FP + TN + 2a)`` and false negative
        rate ``(FN + a) / (FN + TP + 2a)`` with ``a = smoothing``; NaN where
        the denominator is 0.
    smoothing : float
        The additive smoothing ``a`` used (0 by default).
    has_class_axis : bool
        False when one class was selected (``group_rates(...,
        positive_class=c)``): the last axis is then not the class axis and
        ``accuracy`` is not available.
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    fpr: np.ndarray = field(repr=False)
    fnr: np.ndarray = field(repr=False)
    smoothing: float = 0.0
    has_class_axis: bool = True

    @classmethod
    def from_counts(cls, tp, fp, fn, tn, smoothing: float = 0.0, has_class_axis: bool = True) -> "ClassRates":
        """Build rates from one-vs-rest counts (arrays of the same shape)."""
        a = float(smoothing)
        fpr = safe_ratio(fp + a, fp + tn + 2 * a)
        fnr = safe_ratio(fn + a, fn + tp + 2 * a)
        return cls(tp=tp, fp=fp, fn=fn, tn=tn, fpr=fpr, fnr=fnr, smoothing=a, has_class_axis=has_class_axis)

    @classmethod
    def _from_ovr(cls, tp, pred_count, true_count, n, smoothing: float = 0.0) -> "ClassRates":
        fp = pred_count - tp
        fn = true_count - tp
        tn = n - tp - fp - fn
        return cls.from_counts(tp, fp, fn, tn, smoothing)

    @property
    def support(self) -> np.ndarray:
        """Examples of each class, ``TP + FN``."""
        return self.tp + self.fn

    @property
    def n_examples(self) -> np.ndarray:
        """Examples counted, ``TP + FP + FN + TN`` (the same for every class)."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def recall(self) -> np.ndarray:
        """Per-class recall ``TP / (TP + FN)`` (unsmoothed), NaN for absent classes."""
        return safe_ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> np.ndarray:
        """Top-1 accuracy over the class axis, shape ``(...)``; NaN with no examples."""
        if not self.has_class_axis:
            raise ValueError(ERR_NO_CLASS_AXIS)
        n = self.n_examples[..., 0] if self.tp.shape[-1] else np.zeros(self.tp.shape[:-1])
        return safe_ratio(self.tp.sum(axis=-1), n)


def class_rates(counts, *, smoothing=0.0):
    r"""One-vs-rest TP, FP, FN, TN, FPR and FNR of every class.

    Parameters
    ----------
    counts : array-like of int, shape (..., n_classes, n_classes)
        Confusion counts, rows = true class, columns = predicted class, as
        returned by :func:`confusion_counts` (any leading axes: models,
        groups).
    smoothing : float, default=0.0
        Additive (Lidstone) smoothing ``a >= 0`` of the two rates. With
        ``a > 0`` no rate is ever 0 or undefined, so normalised changes
        against a perfect baseline exist (see :func:`normalized_change`).

    Returns
    -------
    rates : ClassRates
        Attributes ``tp, fp, fn, tn, fpr, fnr`` of shape ``(..., n_classes)``.

    Notes
    -----
    With :math:`C` the confusion matrix and :math:`N` its total,

    .. math::

        TP_c = C_{cc},\quad FP_c = \sum_t C_{tc} - C_{cc},\quad
        FN_c = \sum_p C_{cp} - C_{cc},\quad TN_c = N - TP_c - FP_c - FN_c

    .. math::

        FPR_c = \frac{FP_c + a}{FP_c + TN_c + 2a},\qquad
        FNR_c = \frac{FN_c + a}{FN_c + TP_c + 2a}

    A rate whose denominator is 0 is NaN: FNR of a class absent from the
    true labels, FPR of a class that is every example's true label, both
    for an empty group.

    Examples
    --------
    >>> r = class_rates(confusion_counts([0, 0, 1, 1], [0, 1, 1, 1], 2))
    >>> r.fpr, r.fnr
    (array([0. , 0.5]), array([0.5, 0. ]))
    """
    arr = v.as_array(counts, "counts")
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(ERR_COUNTS_SHAPE.format(shape=arr.shape))
    arr = v.check_int_ids(arr, "counts", ndims=(arr.ndim,))
    neg = arr < 0
    if neg.any():
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        raise ValueError(ERR_COUNTS_NEGATIVE.format(value=int(arr[idx]), index=idx))
    smoothing = v.check_nonnegative(smoothing, "smoothing")
    tp = np.diagonal(arr, axis1=-2, axis2=-1).copy()
    pred_count = arr.sum(axis=-2)
    true_count = arr.sum(axis=-1)
    n = arr.sum(axis=(-2, -1))[..., None]
    return ClassRates._from_ovr(tp, pred_count, true_count, n, smoothing)


def ovr_rates(y_true, preds, groups, has_groups, n_groups, n_classes, weights=None, smoothing=0.0):
    """Rates of validated (M, N) predictions through the one-vs-rest kernel.

    Returns ClassRates of shape (M, G, C). ``weights`` (int64, shape (N,))
    counts example ``i`` ``weights[i]`` times.
    """
    has_w = weights is not None
    w = weights if has_w else np.empty(0, np.int64)
    with threads_for(preds.size):
        tp, pc = ovr_kernel(y_true, preds, groups, has_groups, n_groups, n_classes, w, has_w)
    key = y_true + n_classes * groups if has_groups else y_true
    tc = np.bincount(key, weights=w if has_w else None, minlength=n_groups * n_classes)
    tc = np.rint(tc).astype(np.int64).reshape(n_groups, n_classes)
    n = tc.sum(axis=1)[:, None]
    return ClassRates._from_ovr(tp, pc, tc[None], n[None], smoothing)


def population_rates(y_true, preds, n_classes, *, groups=None, n_groups=None, smoothing=0.0):
    r"""Per-model, per-class rates of a whole population of models.

    Equivalent to ``class_rates(confusion_counts(y_true, preds, n_classes,
    groups, n_groups), smoothing=smoothing)`` but never builds the
    (C, C) matrices: a numba kernel (parallel over models) counts only the
    true positives and predictions per class, which is all the one-vs-rest
    rates need, so it stays cheap for 1,000 classes.

    Parameters
    ----------
    y_true : array-like of shape (n_examples,)
        True class ids.
    preds : array-like of shape (n_models, n_examples)
        Predictions, one row per model.
    n_classes : int
        Number of classes.
    groups : array-like of shape (n_examples,), default=None
        Integer group codes; adds a group axis.
    n_groups : int, default=None
        Number of groups (default ``groups.max() + 1``).
    smoothing : float, default=0.0
        Additive smoothing of the rates, see :func:`class_rates`.

    Returns
    -------
    rates : ClassRates
        Shape ``(n_models, n_classes)``, or ``(n_models, n_groups,
        n_classes)`` with groups.

    Notes
    -----
    For model :math:`m` (and group :math:`g`), with :math:`N` examples,

    .. math::

        TP_{m,c} = \sum_i [y_i = c][\hat y_{m,i} = c], \qquad
        P_{m,c} = \sum_i [\hat y_{m,i} = c], \qquad
        S_c = \sum_i [y_i = c]

    .. math::

        FP = P - TP,\quad FN = S - TP,\quad TN = N - TP - FP - FN

    and the rates of :func:`class_rates`.

    Examples
    --------
    >>> r = population_rates([0, 1, 1], [[0, 1, 1], [1, 1, 1]], 2)
    >>> r.fnr
    array([[0., 0.],
           [1., 0.]])
    """
    y_true, preds, n_classes = validate_labels(y_true, preds, n_classes, pred_name="preds")
    if preds.ndim != 2:
        raise ValueError(v.ERR_NDIM.format(name="preds", expected="2 dimensions (n_models, n_examples)", shape=preds.shape))
    groups_arr, has_groups, n_groups_ = validate_groups(groups, n_groups, y_true.shape[0])
    smoothing = v.check_nonnegative(smoothing, "smoothing")
    rates = ovr_rates(y_true, preds, groups_arr, has_groups, n_groups_, n_classes, smoothing=smoothing)
    if has_groups:
        return rates
    return ClassRates(**{k: (getattr(rates, k)[:, 0] if k != "smoothing" else rates.smoothing)
                         for k in ("tp", "fp", "fn", "tn", "fpr", "fnr", "smoothing")})

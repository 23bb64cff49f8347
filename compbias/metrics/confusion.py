"""Confusion counts and the one-vs-rest rates derived from them.

Every rate in :mod:`compbias.metrics` comes from one counting kernel: the
confusion counts of :func:`confusion_counts` (or, where only the diagonal and
the margins are needed, the one-vs-rest counts of the same predictions).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numba
import numpy as np
import pandas as pd

from compbias.metrics import _validation as v
from compbias.metrics._numba import PARALLEL_MIN_LABELS, kernel, threads_for, threads_for_labels

__all__ = [
    "ClassRates",
    "GroupRates",
    "class_rates",
    "confusion_counts",
    "group_rates",
    "population_rates",
]

ERR_COUNTS_SHAPE = (
    "counts must have shape (..., n_classes, n_classes) with rows = true "
    "class, columns = predicted class; got shape {shape}."
)
ERR_COUNTS_NEGATIVE = "counts must be non-negative integers; found {value} at index {index}."
ERR_GROUP_MISSING = (
    "group attribute {name!r} is missing for {count} examples (first at "
    "index {index}); fill them with an explicit level such as 'unknown'."
)
ERR_GROUPS_EMPTY = "groups must name at least one attribute column."
ERR_RESERVED = "attribute names {names} clash with the table's own columns {reserved}; rename them."
ERR_POSITIVE_CLASS = "positive_class must be a class id in [0, {n}), got {value!r}."
ERR_NO_CLASS_AXIS = (
    "these rates hold one class only (a positive class was selected), so "
    "top-1 accuracy cannot be derived from them; use GroupRates.accuracy."
)
ERR_METRIC = "metric must be one of {allowed}, got {value!r}."
ERR_METHOD = "method must be 'between_groups' or 'to_overall', got {value!r}."
ERR_GROUPING = "grouping {value!r} is not one of {allowed}."

# examples per block below which splitting one model's examples over threads
# costs more than it gains
_MIN_CHUNK = 32_768
# upper bound on the private count buffers of a chunked run
_MAX_BUFFER_BYTES = 256 * 2**20
# examples per block at most: a block's private counts are int32
_MAX_BLOCK = 2**31 - 1


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
@kernel()
def _count_block(row, key, flat, n_classes):  # pragma: no cover - numba
    """``flat[key[i] + min(row[i], C)] += 1`` for every ``i``, ``row[i]`` read as unsigned.

    A separate function over views of the block's examples, with unsigned
    indices: LLVM then compiles a plain loop without numba's negative-index
    wraparound on each access (as part of the parallel loop's body, with
    signed offsets, the same loop ran 1.5x slower on one thread).
    """
    cu = np.uint64(n_classes)
    for i in range(row.shape[0]):
        flat[np.uint64(key[i]) + min(np.uint64(row[i]), cu)] += 1


@kernel()
def _flush_block(table, block, n_classes):  # pragma: no cover - numba
    """Copy the ``G * C`` by ``C`` counts of ``table`` to ``block`` and zero ``table``.

    Returns the number of predictions out of range (the last column) of
    examples whose true label and group are valid (the other rows).
    """
    rows = block.shape[0]
    bad = 0
    for r in range(rows):
        bad += table[r, n_classes]
    for r in range(rows):
        for p in range(n_classes):
            block[r, p] = table[r, p]
    table[:] = 0
    return bad


@kernel()
def _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad):  # pragma: no cover - numba
    """Fill ``key`` with each example's row offset in the count table; flag bad true labels and groups in ``bad``."""
    c1 = n_classes + 1
    dead = n_groups * n_classes * c1  # the row of examples with a bad label or group
    for i in range(y_true.shape[0]):
        t = y_true[i]
        g = groups[i] if has_groups else 0
        if t < 0 or t >= n_classes:
            bad[0] = 1
            key[i] = dead
        elif g < 0 or g >= n_groups:
            bad[2] = 1
            key[i] = dead
        else:
            key[i] = (g * n_classes + t) * c1


@kernel()
def _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out):  # pragma: no cover - numba
    """Count blocks ``th, th + n_threads, ...`` into ``out`` with one private table; the number of bad predictions."""
    n = y_pred.shape[1]
    rows = n_groups * n_classes
    table = np.zeros((rows + 1, n_classes + 1), np.int32)
    flat = table.reshape(-1)
    chunk = (n + n_chunks - 1) // n_chunks
    bad = 0
    for b in range(th, out.shape[0], n_threads):
        start = (b % n_chunks) * chunk
        stop = min(n, start + chunk)
        _count_block(y_pred[b // n_chunks, start:stop], key[start:stop], flat, n_classes)
        bad += _flush_block(table, out[b], n_classes)
    return bad


@kernel()
def _confusion_kernel(y_true, y_pred, groups, has_groups, n_groups, n_classes, n_chunks, n_threads, key):  # pragma: no cover - numba
    """Confusion counts per (model, chunk) block, validating every label in the same pass.

    Returns ``(counts, bad)``: ``counts`` of shape ``(n_models * n_chunks,
    G, C, C)``, block ``b`` counting model ``b // n_chunks`` on its
    ``b % n_chunks``-th slice of examples, and ``bad`` (int64, 3) flags of
    a ``y_true``, ``y_pred`` or ``groups`` value outside its range (the
    caller then finds the first one and raises).

    One pass reads each label once. ``key`` (int32 or int64, shape (N,)) is
    filled with each example's row offset ``(g * C + t) * (C + 1)`` in a
    private int32 table of ``G * C + 1`` rows of ``C + 1`` columns, shared by
    all models. A prediction ``p`` is counted at ``key + min(p, C)`` with
    ``p`` read as unsigned, so every id outside ``[0, C)`` (negative ids
    wrap to huge unsigned values) lands in the last column, and an example
    with a bad true label or group in the last row: range checks without a
    branch in the counting loop and no write outside the table. Only the
    ``G * C`` by ``C`` part of the table is copied to the int64 output.
    The work of ``n_threads`` threads (blocks ``t, t + n_threads, ...``,
    each with its own table) runs here one after the other:
    :func:`_confusion_kernel_parallel` runs it on numba's threads. This
    serial twin serves small inputs, which must not wait for a parallel
    region (on a loaded machine its second thread may not be scheduled for
    milliseconds).
    """
    n_models, n = y_pred.shape
    bad = np.zeros(3, np.int64)
    _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad)
    out = np.empty((n_models * n_chunks, n_groups * n_classes, n_classes), np.int64)
    for th in range(n_threads):
        if _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out) > 0:
            bad[1] = 1
    return out.reshape(n_models * n_chunks, n_groups, n_classes, n_classes), bad


@kernel(parallel=True)
def _confusion_kernel_parallel(y_true, y_pred, groups, has_groups, n_groups, n_classes, n_chunks, n_threads, key):  # pragma: no cover - numba
    """:func:`_confusion_kernel` with the threads' work on numba's threads (``prange``)."""
    n_models, n = y_pred.shape
    bad = np.zeros(3, np.int64)
    _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad)
    out = np.empty((n_models * n_chunks, n_groups * n_classes, n_classes), np.int64)
    bad_pred = np.zeros(n_threads, np.int64)
    for th in numba.prange(n_threads):
        bad_pred[th] = _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out)
    if bad_pred.sum() > 0:
        bad[1] = 1
    return out.reshape(n_models * n_chunks, n_groups, n_classes, n_classes), bad


@kernel(parallel=True)
def _ovr_kernel(y_true, y_pred, groups, has_groups, n_groups, n_classes, weights, has_weights):  # pragma: no cover - numba
    """Per (model, group, class): true positives and predicted counts.

    ``weights[i]`` is how often example ``i`` counts (a bootstrap resample);
    models are processed in parallel, each writing its own rows.
    """
    n_models, n = y_pred.shape
    tp = np.zeros((n_models, n_groups, n_classes), np.int64)
    pc = np.zeros((n_models, n_groups, n_classes), np.int64)
    for m in numba.prange(n_models):
        for i in range(n):
            w = weights[i] if has_weights else 1
            if w == 0:
                continue
            g = groups[i] if has_groups else 0
            p = y_pred[m, i]
            pc[m, g, p] += w
            if p == y_true[i]:
                tp[m, g, p] += w
    return tp, pc


def _n_chunks(n_models: int, n: int, block_bytes: int, threads: int | None = None) -> int:
    """Slices of examples per model: enough blocks for every thread when models are few.

    Every block has at most ``_MAX_BLOCK`` examples (its counts are int32).
    """
    threads = numba.get_num_threads() if threads is None else threads
    at_least = -(-n // _MAX_BLOCK) if n else 1
    if n_models >= threads or n < 2 * _MIN_CHUNK or n_models * n < PARALLEL_MIN_LABELS:
        return max(1, at_least)
    want = -(-threads // n_models)
    by_size = n // _MIN_CHUNK
    by_memory = max(1, _MAX_BUFFER_BYTES // max(1, block_bytes * n_models))
    return int(max(1, at_least, min(want, by_size, by_memory)))


# --------------------------------------------------------------------------
# validation shared by the functions taking labels
# --------------------------------------------------------------------------
def validate_labels(y_true, y_pred, n_classes, *, pred_name="y_pred"):
    """Validate labels and (M, N) predictions as class ids below ``n_classes``: ``(y_true, preds, n_classes)``.

    Shared by the metrics modules; raises ValueError naming ``pred_name`` on bad input.
    """
    n_classes = v.check_positive_int(n_classes, "n_classes")
    y_true = v.check_int_ids(y_true, "y_true", ndims=(1,))
    y_pred = v.check_int_ids(y_pred, pred_name, ndims=(1, 2))
    v.check_same_length(y_pred, y_true.shape[0], pred_name)
    v.check_range(y_true, n_classes, "y_true", "n_classes")
    v.check_range(y_pred, n_classes, pred_name, "n_classes")
    return y_true, y_pred, n_classes


def validate_groups(groups, n_groups, n, *, check_range=True):
    """Validate group codes of ``n`` examples against ``n_groups``: ``(groups, has_groups, n_groups)``.

    Shared by the metrics modules; raises ValueError naming the problem.
    With ``check_range=False`` codes below ``n_groups`` (when it is given)
    are left to the counting kernel, which checks them in its own pass.
    """
    if groups is None:
        if n_groups is not None:
            raise ValueError(v.ERR_GROUPS_NEED_N)
        return np.empty(0, np.int64), False, 1
    groups = v.check_int_ids(groups, "groups", ndims=(1,))
    v.check_same_length(groups, n, "groups")
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if groups.size else 1
        if groups.size and groups.min() < 0:
            v.check_range(groups, n_groups, "groups", "n_groups")
        return groups, True, v.check_positive_int(n_groups, "n_groups")
    n_groups = v.check_positive_int(n_groups, "n_groups")
    if check_range:
        v.check_range(groups, n_groups, "groups", "n_groups")
    return groups, True, n_groups


def as_label_ids(x, name, *, ndims=(1,)):
    """Predictions (or any labels) as a C-contiguous array of ids in their own integer dtype.

    Like :func:`compbias.metrics._validation.check_int_ids` (same checks,
    same messages) but integer arrays keep their dtype (int8 predictions
    are read as 1 byte each, not copied to int64) and booleans are read as
    uint8; floats are checked to be whole numbers and become int64. Values
    are not range checked here: the counting kernels check every value in
    the pass that counts it, and :func:`raise_first_out_of_range` reports
    the first bad one.
    """
    arr = v.as_array(x, name)
    if arr.ndim not in ndims:
        expected = " or ".join(f"{d} dimension{'s' if d != 1 else ''}" for d in ndims)
        raise ValueError(v.ERR_NDIM.format(name=name, expected=expected, shape=arr.shape))
    kind = arr.dtype.kind
    if kind in "iub":
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
        return arr.view(np.uint8) if kind == "b" else arr
    return v.check_int_ids(arr, name, ndims=ndims)


def raise_first_out_of_range(checks) -> None:
    """Raise the range error of the first ``(array, n, name, n_name)`` holding an id outside ``[0, n)``.

    Called only after a counting kernel flagged a bad value, with the
    checks in the order the validators always made them, so that the
    message (first bad value and its index) is the one
    :func:`compbias.metrics._validation.check_range` gives.
    """
    for arr, n, name, n_name in checks:
        v.check_range(arr, n, name, n_name)
    raise AssertionError("a counting kernel flagged an id out of range that the range checks did not find")


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def confusion_counts(y_true, y_pred, n_classes, groups=None, n_groups=None):
    r"""Confusion counts of one model or a population, optionally per group.

    Parameters
    ----------
    y_true : array-like of shape (n_examples,)
        True class ids in ``[0, n_classes)``.
    y_pred : array-like of shape (n_examples,) or (n_models, n_examples)
        Predicted class ids of one model, or of ``n_models`` models (one row
        per model) on the same examples.
    n_classes : int
        Number of classes ``C``. Classes absent from ``y_true`` and
        ``y_pred`` still get their rows and columns (of zeros).
    groups : array-like of shape (n_examples,), default=None
        Integer group code of each example in ``[0, n_groups)``. Use
        :func:`group_rates` for named or several attributes.
    n_groups : int, default=None
        Number of groups ``G``; defaults to ``groups.max() + 1``. Groups
        without examples get all-zero counts.

    Returns
    -------
    counts : ndarray of int64
        ``counts[..., t, p]`` is the number of examples of true class ``t``
        predicted as ``p``:

        ========================  ============  ======================
        ``y_pred``                no ``groups``  with ``groups``
        ========================  ============  ======================
        (n_examples,)             (C, C)        (G, C, C)
        (n_models, n_examples)    (M, C, C)     (M, G, C, C)
        ========================  ============  ======================

    Notes
    -----
    .. math::

        \mathrm{counts}_{m,g,t,p} = \sum_{i=1}^{N}
            [y_i = t]\,[\hat y_{m,i} = p]\,[g_i = g]

    One pass of a numba kernel reads every label once, in the predictions'
    own integer dtype (int8 predictions are not copied to int64), and checks
    its range in the same pass (an id outside ``[0, C)`` raises the same
    ValueError, naming the first bad value and its index, as the separate
    checks did). Threads split the work in blocks of (model, slice of
    examples), each with private int32 counts, so no two threads ever
    increment the same counter; inputs below :data:`PARALLEL_MIN_LABELS`
    labels run on one thread. The result is identical to
    ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(C))``
    applied per model and group, and to ``np.bincount((g * C + t) * C + p,
    minlength=G * C * C)`` per model.

    References
    ----------
    scikit-learn, ``sklearn.metrics.confusion_matrix``.

    Examples
    --------
    >>> confusion_counts([0, 1, 1, 2], [0, 2, 1, 2], 3)
    array([[1, 0, 0],
           [0, 1, 1],
           [0, 0, 1]])
    """
    n_classes = v.check_positive_int(n_classes, "n_classes")
    y_true = v.check_int_ids(y_true, "y_true", ndims=(1,))
    y_pred = as_label_ids(y_pred, "y_pred", ndims=(1, 2))
    v.check_same_length(y_pred, y_true.shape[0], "y_pred")
    n = y_true.shape[0]
    groups_arr, has_groups, n_groups_ = validate_groups(groups, n_groups, n, check_range=False)
    single = y_pred.ndim == 1
    preds = y_pred.reshape(1, -1) if single else y_pred
    n_threads = threads_for_labels(preds.size)
    n_chunks = _n_chunks(preds.shape[0], n, n_groups_ * n_classes * n_classes * 8, n_threads)
    n_threads = max(1, min(n_threads, preds.shape[0] * n_chunks))
    wide = (n_groups_ * n_classes + 1) * (n_classes + 1) >= 2**31
    key = np.empty(n, np.int64 if wide else np.int32)
    run = _confusion_kernel if n_threads == 1 else _confusion_kernel_parallel
    out, bad = run(y_true, preds, groups_arr, has_groups, n_groups_, n_classes, n_chunks, n_threads, key)
    if bad.any():
        raise_first_out_of_range([(y_true, n_classes, "y_true", "n_classes"),
                                  (y_pred, n_classes, "y_pred", "n_classes"),
                                  (groups_arr, n_groups_, "groups", "n_groups")])
    if n_chunks > 1:
        out = out.reshape(preds.shape[0], n_chunks, n_groups_, n_classes, n_classes).sum(axis=1)
    if not has_groups:
        out = out[:, 0]
    return out[0] if single else out


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


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
        fpr = _safe_ratio(fp + a, fp + tn + 2 * a)
        fnr = _safe_ratio(fn + a, fn + tp + 2 * a)
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
        return _safe_ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> np.ndarray:
        """Top-1 accuracy over the class axis, shape ``(...)``; NaN with no examples."""
        if not self.has_class_axis:
            raise ValueError(ERR_NO_CLASS_AXIS)
        n = self.n_examples[..., 0] if self.tp.shape[-1] else np.zeros(self.tp.shape[:-1])
        return _safe_ratio(self.tp.sum(axis=-1), n)


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
        tp, pc = _ovr_kernel(y_true, preds, groups, has_groups, n_groups, n_classes, w, has_w)
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


# --------------------------------------------------------------------------
# group rates
# --------------------------------------------------------------------------
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
                out = _safe_ratio(_nan_reduce(np.fmin.reduce, vals), _nan_reduce(np.fmax.reduce, vals))
            elif method == "to_overall":
                r = np.fmin(_safe_ratio(vals, np.broadcast_to(overall, vals.shape)),
                            _safe_ratio(np.broadcast_to(overall, vals.shape), vals))
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

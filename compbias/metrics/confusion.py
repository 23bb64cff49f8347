"""Confusion counts and the one-vs-rest rates derived from them.

Every rate in :mod:`compbias.metrics` comes from one counting kernel: the
confusion counts of :func:`confusion_counts` (or, where only the diagonal and
the margins are needed, the one-vs-rest counts of the same predictions).

This module holds :func:`confusion_counts`; its kernels are in
:mod:`compbias.metrics._confusion_kernels`, the rates derived from counts
(:class:`ClassRates`, :func:`class_rates`, :func:`population_rates`) in
:mod:`compbias.metrics.rates`, the per-group frame (:class:`GroupRates`,
:func:`group_rates`) in :mod:`compbias.metrics.grouped`, the label checks
shared by every module in :mod:`compbias.metrics._validation`. All of them
are re-exported here, so ``compbias.metrics.confusion`` keeps its names.
"""

from __future__ import annotations

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._confusion_kernels import chunk_count, confusion_kernel, confusion_kernel_parallel, key_dtype
from compbias.metrics._numba import threads_for_labels
from compbias.metrics._validation import (  # noqa: F401  (shared label validation, re-exported for old imports)
    as_label_ids,
    raise_first_out_of_range,
    validate_groups,
    validate_labels,
)
from compbias.metrics.grouped import (  # noqa: F401  (re-exported: compbias.metrics.confusion keeps its names)
    ERR_GROUP_MISSING,
    ERR_GROUPING,
    ERR_GROUPS_EMPTY,
    ERR_METHOD,
    ERR_METRIC,
    ERR_POSITIVE_CLASS,
    ERR_RESERVED,
    GroupRates,
    group_rates,
)
from compbias.metrics.rates import (  # noqa: F401  (re-exported: compbias.metrics.confusion keeps its names)
    ERR_COUNTS_NEGATIVE,
    ERR_COUNTS_SHAPE,
    ERR_NO_CLASS_AXIS,
    ClassRates,
    class_rates,
    ovr_rates,
    population_rates,
)

__all__ = [
    "ClassRates",
    "GroupRates",
    "class_rates",
    "confusion_counts",
    "group_rates",
    "population_rates",
]


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
    examples), each with private uint16 counts (flushed to the int64 result
    every 65,535 examples), so no two threads ever
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
    n_chunks = chunk_count(preds.shape[0], n, n_groups_ * n_classes * n_classes * 8, n_threads)
    n_threads = max(1, min(n_threads, preds.shape[0] * n_chunks))
    key = np.empty(n, key_dtype(n_groups_, n_classes))
    run = confusion_kernel if n_threads == 1 else confusion_kernel_parallel
    out, bad = run(y_true, preds, groups_arr, has_groups, n_groups_, n_classes, n_chunks, n_threads, key)
    if any(bad.tolist()):  # a list: 0.2 us where ndarray.any() takes 1 us on a 15 us call
        raise_first_out_of_range([(y_true, n_classes, "y_true", "n_classes"),
                                  (y_pred, n_classes, "y_pred", "n_classes"),
                                  (groups_arr, n_groups_, "groups", "n_groups")])
    if n_chunks > 1:
        out = out.reshape(preds.shape[0], n_chunks, n_groups_, n_classes, n_classes).sum(axis=1)
    if not has_groups:
        out = out[:, 0]
    return out[0] if single else out

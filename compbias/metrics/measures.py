"""More of the field's measures of who compression hurts: recall intensification, worst-group accuracy, vote-margin AUROC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats

from compbias.metrics import _validation as v

__all__ = ["Intensification", "recall_intensification", "worst_group_accuracy_change", "vote_margin", "margin_auroc"]


@dataclass(frozen=True)
class Intensification:
    """Relative recall change of the classes below and at-or-above the baseline's mean recall.

    Attributes
    ----------
    below, above : float
        Mean relative recall change (%) of the classes whose baseline recall
        is below the mean recall of all classes, and of the others.
    intensification : float
        ``below - above`` (percentage points of relative change): negative
        when the weaker classes lose relatively more, Good et al.'s
        "intensification".
    n_below, n_above : int
    """

    below: float
    above: float
    intensification: float
    n_below: int
    n_above: int


def recall_intensification(base_recall, comp_recall) -> Intensification:
    r"""Do the classes the baseline already handles worst lose relatively more recall?

    Parameters
    ----------
    base_recall, comp_recall : array-like of float, shape (n_classes,)
        Per-class recall (``1 - FNR``) of the baseline and the compressed
        model (or population means). Classes with a NaN or zero baseline
        recall are left out (their relative change is undefined).

    Returns
    -------
    Intensification

    Notes
    -----
    With :math:`\bar r` the mean baseline recall over the kept classes and
    :math:`\delta_c = (r'_c - r_c) / r_c \times 100`,

    .. math::

        I = \operatorname{mean}_{c: r_c < \bar r} \delta_c
            - \operatorname{mean}_{c: r_c \ge \bar r} \delta_c .

    :math:`I < 0` is the "intensification" Good et al. report for pruned
    networks: classes with below-average recall lose a larger share of it.

    References
    ----------
    Good, Lin, Sieg, Ferguson, Yu, Zhe, Wieczorek, Serra (2022), "Recall
    Distortion in Neural Network Pruning and the Undecayed Pruning
    Algorithm", NeurIPS.

    Examples
    --------
    >>> r = recall_intensification([0.6, 0.9, 1.0], [0.3, 0.9, 0.95])
    >>> round(r.below, 2), round(r.above, 2), round(r.intensification, 2)
    (-50.0, -2.5, -47.5)
    """
    b = v.check_float(base_recall, "base_recall", allow_nan=True, ndims=(1,))
    c = v.check_float(comp_recall, "comp_recall", allow_nan=True, ndims=(1,))
    if b.shape != c.shape:
        raise ValueError(f"base_recall {b.shape} and comp_recall {c.shape} must have one entry per class")
    keep = np.isfinite(b) & np.isfinite(c) & (b > 0)
    if keep.sum() < 2:
        raise ValueError("recall_intensification needs at least two classes with a defined, non-zero baseline recall")
    b, c = b[keep], c[keep]
    delta = (c - b) / b * 100.0
    low = b < b.mean()
    if not low.any():  # every kept class has the same recall: nothing is below the mean
        return Intensification(float("nan"), float(delta.mean()), float("nan"), 0, int(b.size))
    below, above = float(delta[low].mean()), float(delta[~low].mean())
    return Intensification(below, above, below - above, int(low.sum()), int((~low).sum()))


def worst_group_accuracy_change(y_true, base_pred, comp_pred, groups, *, min_count: int = 1) -> tuple[float, float, float]:
    r"""Worst-group accuracy of the baseline and the compressed model, and its change in percentage points.

    Parameters
    ----------
    y_true, base_pred, comp_pred : array-like of int, shape (N,)
    groups : array-like, shape (N,)
        Group of each example (any hashable values; intersections encoded
        by the caller).
    min_count : int, default 1
        Groups with fewer examples are left out.

    Returns
    -------
    (base_wga, comp_wga, change_pp) : tuple of float
        :math:`\min_g \mathrm{acc}_g` of each model (fractions) and
        ``(comp_wga - base_wga) * 100``. The worst group may differ between
        the two models.

    References
    ----------
    Sagawa, Koh, Hashimoto, Liang (2020), "Distributionally Robust Neural
    Networks", ICLR (worst-group accuracy).

    Examples
    --------
    >>> worst_group_accuracy_change([0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0], ["a", "a", "b", "b"])
    (0.5, 0.5, 0.0)
    """
    y = np.asarray(y_true).ravel()
    pb, pc, g = np.asarray(base_pred).ravel(), np.asarray(comp_pred).ravel(), np.asarray(groups).ravel()
    if not (y.size == pb.size == pc.size == g.size):
        raise ValueError("y_true, base_pred, comp_pred and groups must have one entry per example")
    codes, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    ok = counts >= int(min_count)
    if not ok.any():
        raise ValueError(f"no group has at least min_count={min_count} examples")
    acc_b = np.bincount(inverse, weights=(pb == y).astype(float), minlength=codes.size) / counts
    acc_c = np.bincount(inverse, weights=(pc == y).astype(float), minlength=codes.size) / counts
    wb, wc = float(acc_b[ok].min()), float(acc_c[ok].min())
    return wb, wc, (wc - wb) * 100.0


def vote_margin(preds, n_classes: int) -> np.ndarray:
    r"""Per example, the share of a population's votes for its top class minus the share for the runner-up.

    Parameters
    ----------
    preds : array-like of int, shape (M, N)
    n_classes : int

    Returns
    -------
    numpy.ndarray of float, shape (N,)
        In ``[0, 1]``: 1 when every model agrees, 0 when the top two classes
        tie.

    Examples
    --------
    >>> vote_margin([[0, 1, 2], [0, 1, 1], [0, 2, 0]], 3).round(3).tolist()
    [1.0, 0.333, 0.0]
    """
    p = np.atleast_2d(np.asarray(preds))
    v.check_range(p, int(n_classes), "preds", "n_classes")
    m, n = p.shape
    counts = np.zeros((n_classes, n), np.int64)
    np.add.at(counts, (p, np.broadcast_to(np.arange(n), p.shape)), 1)
    top2 = -np.sort(-counts, axis=0)[:2] if n_classes > 1 else np.vstack([counts, np.zeros_like(counts)])
    return (top2[0] - top2[1]) / m


def margin_auroc(margin, members) -> float:
    r"""AUROC of low baseline vote margin as a predictor of membership in a set (e.g. the CIE set).

    Parameters
    ----------
    margin : array-like of float, shape (N,)
        :func:`vote_margin` of the baseline population.
    members : array-like of bool, shape (N,)
        The set to predict (e.g. :func:`cie_mask` of the compressed population).

    Returns
    -------
    float
        The probability that a member has a lower margin than a non-member
        (ties count one half): Mann-Whitney :math:`U / (n_1 n_0)` with
        ``-margin`` as the score. 0.5 is chance; NaN when either class is
        empty.

    References
    ----------
    Iofinova, Peste, Alistarh (2023), "Bias in Pruned Vision Models:
    In-Depth Analysis and Countermeasures", CVPR: the dense models'
    uncertainty predicts which examples compression changes.

    Examples
    --------
    >>> margin_auroc([0.2, 1.0, 0.6, 1.0], [True, False, True, False])
    1.0
    """
    s = -v.check_float(margin, "margin", allow_nan=False, ndims=(1,))
    y = np.asarray(members, dtype=bool).ravel()
    if y.size != s.size:
        raise ValueError(f"margin ({s.size}) and members ({y.size}) must have one entry per example")
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

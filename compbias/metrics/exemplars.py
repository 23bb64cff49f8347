"""Modal labels, Pruning/Compression Identified Exemplars (Hooker et al.)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._numba import kernel, threads_for

__all__ = ["CIECut", "cie_cut", "cie_mask", "cie_scores", "modal_labels", "pie_mask"]

ERR_POPULATION = (
    "{name} must have shape (n_models, n_examples) with at least one model; "
    "got shape {shape}."
)
ERR_EXAMPLES_MISMATCH = (
    "base_preds has {n1} examples but comp_preds has {n2}; both populations "
    "must be evaluated on the same test examples in the same order."
)

_BLOCK = 1024  # examples per parallel block


@kernel(parallel=True)
def _modal_kernel(preds, n_classes):  # pragma: no cover - numba
    n_models, n = preds.shape
    out = np.empty(n, np.int64)
    n_blocks = (n + _BLOCK - 1) // _BLOCK
    for b in numba.prange(n_blocks):
        counts = np.zeros(n_classes, np.int64)
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            for m in range(n_models):
                counts[preds[m, i]] += 1
            best = -1
            best_count = 0
            for m in range(n_models):
                c = preds[m, i]
                k = counts[c]
                if k > best_count or (k == best_count and c > best):
                    best = c
                    best_count = k
            for m in range(n_models):
                counts[preds[m, i]] = 0
            out[i] = best
    return out


@kernel(parallel=True)
def _cie_kernel(base, comp, n_classes):  # pragma: no cover - numba
    """Integer numerators sum_c |n_c * M' - n'_c * M| of the CIE score."""
    m1, n = base.shape
    m2 = comp.shape[0]
    out = np.empty(n, np.int64)
    n_blocks = (n + _BLOCK - 1) // _BLOCK
    for b in numba.prange(n_blocks):
        cb = np.zeros(n_classes, np.int64)
        cc = np.zeros(n_classes, np.int64)
        seen = np.zeros(n_classes, np.bool_)
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            for m in range(m1):
                cb[base[m, i]] += 1
            for m in range(m2):
                cc[comp[m, i]] += 1
            total = 0
            for m in range(m1):
                c = base[m, i]
                if not seen[c]:
                    seen[c] = True
                    total += abs(cb[c] * m2 - cc[c] * m1)
            for m in range(m2):
                c = comp[m, i]
                if not seen[c]:
                    seen[c] = True
                    total += abs(cb[c] * m2 - cc[c] * m1)
            for m in range(m1):
                c = base[m, i]
                cb[c] = 0
                cc[c] = 0
                seen[c] = False
            for m in range(m2):
                c = comp[m, i]
                cb[c] = 0
                cc[c] = 0
                seen[c] = False
            out[i] = total
    return out


def _check_population(preds, n_classes, name):
    arr = v.check_int_ids(preds, name, ndims=(2,))
    if arr.shape[0] < 1:
        raise ValueError(ERR_POPULATION.format(name=name, shape=arr.shape))
    v.check_range(arr, n_classes, name, "n_classes")
    return arr


def _check_two_populations(base_preds, comp_preds, n_classes):
    n_classes = v.check_positive_int(n_classes, "n_classes")
    base = _check_population(base_preds, n_classes, "base_preds")
    comp = _check_population(comp_preds, n_classes, "comp_preds")
    if base.shape[1] != comp.shape[1]:
        raise ValueError(ERR_EXAMPLES_MISMATCH.format(n1=base.shape[1], n2=comp.shape[1]))
    return base, comp, n_classes


def modal_labels(preds, n_classes):
    r"""The most frequent prediction of each example over a population.

    Parameters
    ----------
    preds : array-like of int, shape (n_models, n_examples)
        Predicted class ids, one row per model.
    n_classes : int
        Number of classes.

    Returns
    -------
    labels : ndarray of int64, shape (n_examples,)

    Notes
    -----
    .. math::

        \hat y^{M}_i = \max\,\operatorname*{arg\,max}_c
            \sum_{m=1}^{M} [\hat y_{m,i} = c]

    Ties go to the **largest** class id, as in the released code of Hooker
    et al. (``pandas.Series.mode().max()``).

    References
    ----------
    Hooker, Courville, Clark, Dauphin, Frome (2019), "What Do Compressed
    Deep Neural Networks Forget?" (modal label of a population).

    Examples
    --------
    >>> modal_labels([[0, 1, 2], [1, 1, 0], [1, 0, 0]], 3)
    array([1, 1, 0])
    >>> modal_labels([[0], [2]], 3)  # a tie: the largest class wins
    array([2])
    """
    n_classes = v.check_positive_int(n_classes, "n_classes")
    arr = _check_population(preds, n_classes, "preds")
    with threads_for(arr.size):
        return _modal_kernel(arr, n_classes)


def pie_mask(base_preds, comp_preds, n_classes, *, definition="modal", pairs=None):
    r"""Pruning (compression) identified exemplars.

    Parameters
    ----------
    base_preds : array-like of int, shape (M, n_examples)
        Predictions of the baseline population.
    comp_preds : array-like of int, shape (M', n_examples)
        Predictions of the compressed population on the same examples.
    n_classes : int
        Number of classes.
    definition : {"modal", "unanimous"}, default="modal"
        ``modal`` (Hooker et al. 2019): the two populations' modal labels
        differ. ``unanimous``: every compressed model disagrees with its
        teacher, the baseline it was compressed from (``pairs``), or, without
        lineage, with the baseline population's modal label.
    pairs : sequence of int, optional
        For ``unanimous``: the row of each compressed model's own baseline in
        ``base_preds``.

    Returns
    -------
    mask : ndarray of bool, shape (n_examples,)
        True where the example is a PIE (the "modal CIE").

    Notes
    -----
    .. math::

        \mathrm{PIE}^{modal}_i = [\hat y^{M}_{i,\mathrm{base}} \neq
                          \hat y^{M'}_{i,\mathrm{comp}}], \qquad
        \mathrm{PIE}^{unan}_i = \prod_{s} [\hat y_{i,s} \neq \hat y_{i,b(s)}]

    with the modal labels of :func:`modal_labels` (ties to the largest
    class id). The true label plays no part. ``unanimous`` counts the
    examples on which compression changed the answer of every model, the
    reading of "pruning changes the behaviour" that compares each pruned
    model with its own original, as Blakeney et al. (Simon Says) compare
    each pruned student with its teacher. With one pair it is simply the
    examples whose prediction changed.

    References
    ----------
    Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?".

    Examples
    --------
    >>> pie_mask([[0, 1], [0, 1]], [[0, 2], [1, 2]], 3)
    array([ True,  True])
    """
    base, comp, n_classes = _check_two_populations(base_preds, comp_preds, n_classes)
    if definition == "modal":
        with threads_for(base.size + comp.size):
            return _modal_kernel(base, n_classes) != _modal_kernel(comp, n_classes)
    if definition != "unanimous":
        raise ValueError(f"definition must be 'modal' or 'unanimous', got {definition!r}")
    if pairs is None:
        with threads_for(base.size):
            teacher = np.broadcast_to(_modal_kernel(base, n_classes), comp.shape)
    else:
        idx = np.asarray(pairs)
        if idx.shape != (comp.shape[0],) or not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any() or (idx >= base.shape[0]).any():
            raise ValueError(f"pairs must give, for every compressed model, the row of its baseline in base_preds (an int in [0, {base.shape[0]}))")
        teacher = base[idx]
    return (comp != teacher).all(axis=0)


def cie_scores(base_preds, comp_preds, n_classes):
    r"""Per-example CIE score: taxicab distance of the two populations' votes.

    Parameters
    ----------
    base_preds : array-like of int, shape (M, n_examples)
        Predictions of the baseline population.
    comp_preds : array-like of int, shape (M', n_examples)
        Predictions of the compressed population on the same examples.
    n_classes : int
        Number of classes.

    Returns
    -------
    scores : ndarray of float64, shape (n_examples,)
        In ``[0, 2]``; 0 when both populations vote identically.

    Notes
    -----
    With :math:`n_{c,i}` (:math:`n'_{c,i}`) the number of baseline
    (compressed) models predicting class :math:`c` for example :math:`i`,

    .. math::

        s_i = \sum_{c} \left\lvert \frac{n_{c,i}}{M} - \frac{n'_{c,i}}{M'}
              \right\rvert
            = \frac{\sum_c \lvert n_{c,i} M' - n'_{c,i} M \rvert}{M M'}

    The integer numerator is computed exactly and divided once, so equal
    scores are exactly equal and ties in :func:`cie_mask` are reliable.

    References
    ----------
    Hooker, Moorosi, Clark, Bengio, Denton (2020), "Characterising Bias in
    Compressed Models", section 3 (CIE).

    Examples
    --------
    >>> cie_scores([[0, 1], [0, 1]], [[0, 2], [1, 2]], 3)
    array([1., 2.])
    """
    base, comp, n_classes = _check_two_populations(base_preds, comp_preds, n_classes)
    with threads_for(base.size + comp.size):
        num = _cie_kernel(base, comp, n_classes)
    return num / float(base.shape[0] * comp.shape[0])


@dataclass(frozen=True)
class CIECut:
    """Where the CIE set's cut falls, and how many tied scores it splits.

    Attributes
    ----------
    k : int
        Size of the CIE set, ``ceil(q * N)``.
    score_at_cut : float
        The ``k``-th largest score (the lowest score in the set).
    n_above : int
        Examples scoring strictly above ``score_at_cut`` (all in the set).
    tied_block : int
        Examples scoring exactly ``score_at_cut``; ``k - n_above`` of them
        are in the set. The set is determined by the scores alone only when
        ``tied_block == k - n_above``.
    """

    k: int
    score_at_cut: float
    n_above: int
    tied_block: int

    @property
    def taken_from_block(self) -> int:
        """How many of the tied examples the set takes (``k - n_above``)."""
        return self.k - self.n_above

    @property
    def ambiguous(self) -> bool:
        """True when the cut splits a block of equal scores (which members are chosen is then a tie-break)."""
        return self.tied_block > self.taken_from_block


def _cie_size(n: int, q: float) -> int:
    return min(n, math.ceil(round(q * n, 9)))


def cie_cut(scores, top_fraction=0.01) -> CIECut:
    r"""The score at the CIE set's cut and the size of the block of equal scores there.

    Parameters
    ----------
    scores : array-like of float, shape (n_examples,)
    top_fraction : float, default=0.01

    Returns
    -------
    CIECut

    Notes
    -----
    CIE scores take few distinct values when populations are small (two
    populations of 5 binary classifiers give 6), so the cut of the top
    ``q`` often falls inside a block of tied scores; which tied examples
    enter the set is then a tie-break, not a property of the models.
    Report ``score_at_cut`` and ``tied_block`` beside any statistic of the
    set, and prefer ``cie_mask(..., tie_break="random")`` over several seeds
    to the order tie-break.

    Examples
    --------
    >>> c = cie_cut([0.5, 1.0, 1.0, 0.0, 0.5, 0.5], top_fraction=0.5)
    >>> c.k, c.score_at_cut, c.n_above, c.tied_block, c.ambiguous
    (3, 0.5, 2, 3, True)
    """
    s = v.check_float(scores, "scores", allow_nan=False, ndims=(1,))
    q = v.check_fraction(top_fraction, "top_fraction")
    k = _cie_size(s.shape[0], q)
    cut = float(np.sort(s)[::-1][k - 1]) if k else float("nan")
    return CIECut(k=k, score_at_cut=cut, n_above=int((s > cut).sum()), tied_block=int((s == cut).sum()))


def cie_mask(scores, top_fraction=0.01, *, tie_break="order", seed=None):
    r"""The CIE set: the ``ceil(q * N)`` examples with the highest scores.

    Parameters
    ----------
    scores : array-like of float, shape (n_examples,)
        Scores from :func:`cie_scores` (any finite values work).
    top_fraction : float, default=0.01
        The fraction ``q`` in ``(0, 1]`` of examples to select.
    tie_break : {"order", "random"}, default="order"
        How examples tied at the cut are chosen: the earlier examples first
        (the default, as Hooker et al.'s code ranks a stable sort), or a
        uniform random draw among the tied block seeded by ``seed``.
    seed : int, optional
        Seed of the ``random`` tie-break (required with it).

    Returns
    -------
    mask : ndarray of bool, shape (n_examples,)
        Exactly ``ceil(q * N)`` entries are True.

    Notes
    -----
    With examples sorted by decreasing score, :math:`s_{(1)} \ge s_{(2)}
    \ge \dots`,

    .. math::

        \mathrm{CIE} = \{(1), \dots, (k)\}, \qquad k = \lceil qN \rceil

    Examples are ranked by decreasing score; equal scores are ranked by
    example order (the earlier example first), so the set always has
    exactly :math:`\lceil qN \rceil` members even with ties at the cut.
    ``q * N`` is rounded to 9 decimals before the ceiling so that floating
    point noise (``0.07 * 100 = 7.000000000000001``) does not add an
    example.

    References
    ----------
    Hooker et al. (2020), "Characterising Bias in Compressed Models".

    Examples
    --------
    >>> cie_mask([0.5, 1.0, 1.0, 0.0], top_fraction=0.25)
    array([False,  True, False, False])
    """
    s = v.check_float(scores, "scores", allow_nan=False, ndims=(1,))
    q = v.check_fraction(top_fraction, "top_fraction")
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'order' or 'random', got {tie_break!r}")
    n = s.shape[0]
    k = _cie_size(n, q)
    order = np.argsort(-s, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    if tie_break == "random" and k:
        if seed is None:
            raise ValueError("tie_break='random' needs a seed (an int), so that the set can be reproduced")
        cut = s[order[k - 1]]
        block = np.flatnonzero(s == cut)
        take = k - int((s > cut).sum())
        mask[block] = False
        mask[np.random.default_rng(seed).choice(block, size=take, replace=False)] = True
    return mask

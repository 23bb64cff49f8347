"""Modal labels, Pruning/Compression Identified Exemplars (Hooker et al.)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._numba import threads_for_labels
from compbias.metrics._validation import as_label_ids, raise_first_out_of_range
from compbias.metrics._vote_kernels import votes_kernel, votes_kernel_parallel

__all__ = ["CIECut", "cie_cut", "cie_mask", "cie_scores", "modal_labels", "pie_mask"]

ERR_POPULATION = (
    "{name} must have shape (n_models, n_examples) with at least one model; "
    "got shape {shape}."
)
ERR_EXAMPLES_MISMATCH = (
    "base_preds has {n1} examples but comp_preds has {n2}; both populations "
    "must be evaluated on the same test examples in the same order."
)


def _check_population(preds, name):
    arr = as_label_ids(preds, name, ndims=(2,))
    if arr.shape[0] < 1:
        raise ValueError(ERR_POPULATION.format(name=name, shape=arr.shape))
    return arr


def _check_two_populations(base_preds, comp_preds, n_classes):
    n_classes = v.check_positive_int(n_classes, "n_classes")
    base = _check_population(base_preds, "base_preds")
    comp = _check_population(comp_preds, "comp_preds")
    if base.shape[1] != comp.shape[1]:
        raise ValueError(ERR_EXAMPLES_MISMATCH.format(n1=base.shape[1], n2=comp.shape[1]))
    return base, comp, n_classes


def _modal(preds, n_classes, name):
    """Modal labels of a validated population, its labels range checked in the counting pass."""
    n_threads = threads_for_labels(preds.size)
    run = votes_kernel if n_threads == 1 else votes_kernel_parallel
    labels, bad = run(preds, preds, n_classes, False, n_threads)
    if bad:
        raise_first_out_of_range([(preds, n_classes, name, "n_classes")])
    return labels


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

    One numba pass counts the votes of each block of examples (reading each
    model's labels of the block contiguously, in their own integer dtype)
    and checks every label's range in the same pass; an id outside
    ``[0, n_classes)`` raises the validators' ValueError naming the first
    one.

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
    return _modal(_check_population(preds, "preds"), n_classes, "preds")


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
        return _modal(base, n_classes, "base_preds") != _modal(comp, n_classes, "comp_preds")
    if definition != "unanimous":
        raise ValueError(f"definition must be 'modal' or 'unanimous', got {definition!r}")
    v.check_range(base, n_classes, "base_preds", "n_classes")
    v.check_range(comp, n_classes, "comp_preds", "n_classes")
    if pairs is None:
        teacher = np.broadcast_to(_modal(base, n_classes, "base_preds"), comp.shape)
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
    scores are exactly equal and ties in :func:`cie_mask` are reliable. It
    is accumulated vote by vote in one pass over the labels (range checked
    in the same pass): after the :math:`M` baseline votes it is
    :math:`M M'`, and a compressed vote for :math:`c` adds
    :math:`\lvert n_c M' - (n'_c + 1) M \rvert - \lvert n_c M' - n'_c M \rvert`.

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
    n_threads = threads_for_labels(base.size + comp.size)
    run = votes_kernel if n_threads == 1 else votes_kernel_parallel
    num, bad = run(base, comp, n_classes, True, n_threads)
    if bad:
        raise_first_out_of_range([(base, n_classes, "base_preds", "n_classes"),
                                  (comp, n_classes, "comp_preds", "n_classes")])
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

"""Disproportionate harm: how much more compression raised a cell's error rate than the model's overall.

A *cell* is any subset of the test examples: the examples of one true class,
of one group value (``sex=male``), or of an intersection. For each compressed
model ``s`` paired with its own baseline (the model it was compressed from),
and each example ``i``, the paired change in error is

.. math::

    d_{si} = [\\hat y^{c}_{si} \\ne y_i] - [\\hat y^{b}_{si} \\ne y_i] \\in \\{-1, 0, 1\\}

(or, without lineage, the compressed model's error minus the baseline
population's mean error on that example). The error-rate change of cell
``C`` and of the whole test set are ``D_{C,s} = mean_{i in C} d_si`` and
``D_s = mean_i d_si``; the *excess harm* of the cell is their difference,
averaged over the population of ``S`` pairs,

.. math::

    E_C = \\frac{1}{S} \\sum_s (D_{C,s} - D_s),

in percentage points. ``E_C > 0``: compression hurt that cell more than the
model as a whole (Hooker et al. 2020 compare subgroup error changes with the
overall one in the same way; the default audit gate of ``docs/audit.md``
fails a population whose interval for some cell lies above a tolerance).

Intervals come from a two-level (hierarchical) bootstrap: each resample
draws ``S`` pairs with replacement (each compressed model stays with its
own baseline: seed-to-seed variation of the training procedure) and,
independently, ``N`` test examples with replacement, the same examples for
every model (sampling variation of the test set); the percentile interval
of the resampled ``E_C`` is reported (Davison & Hinkley 1997, sec. 3.8,
"multistage sampling"; Ren et al. 2010, "Nonparametric bootstrapping for
hierarchical data"). With one pair only the example level varies.

A cell with fewer than ``min_count`` examples is *not estimable*: its
estimate and interval are NaN and ``estimable`` is False, never a number
with a degenerate interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compbias.metrics import _validation as v

__all__ = ["ChangeDifference", "ExcessHarm", "change_difference", "excess_harm", "paired_error_changes"]

ERR_PAIRS = "pairs must give, for every compressed model, the row of its baseline in base_preds (an int in [0, {m}))"


@dataclass(frozen=True)
class ExcessHarm:
    """Excess error increase per cell, with two-level bootstrap intervals (all in percentage points).

    Attributes
    ----------
    n : numpy.ndarray of int64, shape (K,)
        Examples per cell.
    estimable : numpy.ndarray of bool, shape (K,)
        ``n >= min_count``.
    cell_change : numpy.ndarray, shape (K,)
        Mean over pairs of the cell's error-rate change ``D_{C,s}`` (pp).
    overall_change : float
        Mean over pairs of the overall error-rate change ``D_s`` (pp).
    excess : numpy.ndarray, shape (K,)
        ``E_C = cell_change - overall_change`` (pp); NaN where not estimable.
    ci_low, ci_high : numpy.ndarray, shape (K,)
        Percentile interval of ``excess`` (NaN where not estimable or with
        ``n_resamples=0``).
    overall_ci : tuple of float
        Percentile interval of ``overall_change`` from the same resamples
        (NaN with ``n_resamples=0``).
    n_pairs, n_resamples : int
    confidence : float
    """

    n: np.ndarray
    estimable: np.ndarray
    cell_change: np.ndarray
    overall_change: float
    excess: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    overall_ci: tuple[float, float]
    n_pairs: int
    n_resamples: int
    confidence: float


def paired_error_changes(y_true, base_preds, comp_preds, pairs=None) -> np.ndarray:
    """Per compressed model and example, the change in error against its own baseline.

    Parameters
    ----------
    y_true : array of int, shape (N,)
    base_preds : array of int, shape (M_b, N)
        Baseline population's predictions.
    comp_preds : array of int, shape (S, N)
        Compressed population's predictions.
    pairs : sequence of int or None, length S
        Row of each compressed model's own baseline in ``base_preds``. With
        ``None`` (no lineage) each compressed model is compared with the
        baseline population's mean error on each example.

    Returns
    -------
    numpy.ndarray of float64, shape (S, N)
        ``d_si`` of the module docstring (values in {-1, 0, 1} when paired).

    Examples
    --------
    >>> paired_error_changes([0, 1, 1], [[0, 1, 0]], [[1, 1, 1]], pairs=[0]).tolist()
    [[1.0, 0.0, -1.0]]
    """
    y = v.as_array(y_true, "y_true").astype(np.int64).ravel()
    base = np.atleast_2d(v.as_array(base_preds, "base_preds"))
    comp = np.atleast_2d(v.as_array(comp_preds, "comp_preds"))
    if base.shape[1] != y.size or comp.shape[1] != y.size:
        raise ValueError(f"base_preds {base.shape} and comp_preds {comp.shape} must have one column per example of y_true ({y.size})")
    base_err = (base != y).astype(np.float64)
    comp_err = (comp != y).astype(np.float64)
    if pairs is None:
        return comp_err - base_err.mean(axis=0)
    idx = np.asarray(pairs)
    if idx.shape != (comp.shape[0],) or not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any() or (idx >= base.shape[0]).any():
        raise ValueError(ERR_PAIRS.format(m=base.shape[0]))
    return comp_err - base_err[idx]


def excess_harm(changes, cells, *, min_count: int = 10, n_resamples: int = 1000, confidence: float = 0.95,
                seed: int = 0, resample_pairs: bool = True, chunk: int = 64) -> ExcessHarm:
    """Excess error increase of each cell over the overall one, with a two-level bootstrap interval.

    .. math::

        E_C = \\frac{1}{S} \\sum_s \\Big( \\frac{1}{|C|} \\sum_{i \\in C} d_{si}
              - \\frac{1}{N} \\sum_i d_{si} \\Big) \\times 100

    Parameters
    ----------
    changes : array of float, shape (S, N)
        ``d_si`` from :func:`paired_error_changes`.
    cells : array of bool, shape (K, N)
        Membership of each example in each cell.
    min_count : int, default 10
        Cells with fewer examples are not estimable (NaN, ``estimable`` False).
    n_resamples : int, default 1000
        Two-level bootstrap resamples (pairs and examples); 0 gives no interval.
    confidence : float, default 0.95
    seed : int, default 0
    resample_pairs : bool, default True
        False resamples test examples only, with the models fixed: an
        interval for these particular models, not for the training
        procedure (it under-covers when models vary from seed to seed).
    chunk : int, default 64
        Resamples computed at once (memory ``chunk * N`` floats).

    Returns
    -------
    ExcessHarm

    Notes
    -----
    A resample in which a cell draws no example has no value for that cell;
    the interval uses the resamples where it has one (with
    ``min_count >= 10`` this happens with probability below ``e^-10``).

    References
    ----------
    Hooker, Moorosi, Clark, Bengio, Denton (2020), "Characterising Bias in
    Compressed Models", arXiv:2010.03058. Davison & Hinkley (1997),
    *Bootstrap Methods and their Application*, sec. 3.8.

    Examples
    --------
    >>> d = [[1.0, 0.0, 0.0, 0.0]]               # one pair: example 0 became wrong
    >>> cells = [[True, True, False, False], [False, False, True, True]]
    >>> r = excess_harm(d, cells, min_count=1, n_resamples=0)
    >>> r.cell_change.tolist(), r.overall_change, r.excess.tolist()
    ([50.0, 0.0], 25.0, [25.0, -25.0])
    """
    d = np.atleast_2d(np.asarray(changes, dtype=np.float64))
    member = np.atleast_2d(np.asarray(cells, dtype=bool))
    if d.ndim != 2 or member.ndim != 2 or member.shape[1] != d.shape[1]:
        raise ValueError(f"changes (S, N) and cells (K, N) must share N; got {d.shape} and {member.shape}")
    if not np.isfinite(d).all():
        raise ValueError("changes must be finite")
    min_count = v.check_positive_int(min_count, "min_count")
    n_resamples = int(n_resamples)
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    confidence = v.check_fraction(confidence, "confidence", high_open=True)
    S, N = d.shape
    A = member.astype(np.float64).T  # (N, K)
    n = member.sum(axis=1).astype(np.int64)
    estimable = n >= min_count
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = (d @ A) / n  # (S, K): D_{C,s}
    overall_pairs = d.mean(axis=1)  # (S,)
    cell_change = per_pair.mean(axis=0) * 100.0
    overall = float(overall_pairs.mean() * 100.0)
    excess = np.where(estimable, cell_change - overall, np.nan)
    cell_change = np.where(n > 0, cell_change, np.nan)
    lo = np.full(member.shape[0], np.nan)
    hi = np.full(member.shape[0], np.nan)
    overall_ci = (np.nan, np.nan)
    if n_resamples:
        A_est = A[:, estimable]
        draws = np.empty((n_resamples, int(estimable.sum())))
        overall_draws = np.empty(n_resamples)
        rng = np.random.default_rng(seed)
        done = 0
        while done < n_resamples:
            b = min(chunk, n_resamples - done)
            # level 1: pairs (seeds) with replacement; level 2: the same examples for every model
            seeds = rng.integers(0, S, size=(b, S)) if resample_pairs else np.broadcast_to(np.arange(S), (b, S))
            drawn = rng.integers(0, N, size=(b, N)) + (np.arange(b) * N)[:, None]
            weights = np.bincount(drawn.ravel(), minlength=b * N).reshape(b, N).astype(np.float64)  # example counts
            counts = weights @ A_est  # (b, K)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.zeros((b, A_est.shape[1]))
                total = np.zeros(b)
                for j in range(S):
                    dj = d[seeds[:, j]]  # (b, N): the j-th drawn pair of each resample
                    wd = weights * dj
                    whole = wd.sum(axis=1) / N
                    out += wd @ A_est / counts - whole[:, None]
                    total += whole
            draws[done : done + b] = out / S * 100.0
            overall_draws[done : done + b] = total / S * 100.0
            done += b
        alpha = (1.0 - confidence) / 2.0
        if draws.shape[1]:
            q = np.nanquantile(draws, [alpha, 1.0 - alpha], axis=0)
            lo[estimable], hi[estimable] = q[0], q[1]
        oq = np.quantile(overall_draws, [alpha, 1.0 - alpha])
        overall_ci = (float(oq[0]), float(oq[1]))
    return ExcessHarm(n=n, estimable=estimable, cell_change=cell_change, overall_change=overall, excess=excess,
                      ci_low=lo, ci_high=hi, overall_ci=overall_ci, n_pairs=S, n_resamples=n_resamples, confidence=confidence)


@dataclass(frozen=True)
class ChangeDifference:
    """Difference of two cells' error-rate changes, with a two-level bootstrap interval (pp).

    Attributes
    ----------
    change_a, change_b : float
        Mean over pairs of each cell's error-rate change ``D_{A,s}``, ``D_{B,s}`` (pp).
    difference : float
        ``change_a - change_b`` (pp).
    ci_low, ci_high : float
        Percentile interval of ``difference`` (NaN with ``n_resamples=0``).
    n_a, n_b, n_pairs, n_resamples : int
    confidence : float
    """

    change_a: float
    change_b: float
    difference: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    n_pairs: int
    n_resamples: int
    confidence: float


def change_difference(changes, cell_a, cell_b, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                      resample_pairs: bool = True) -> ChangeDifference:
    """Is cell A hurt more than cell B? The difference of their error-rate changes, with an interval.

    .. math::

        \\Delta_{A-B} = \\frac{1}{S} \\sum_s \\Big( \\frac{1}{|A|} \\sum_{i \\in A} d_{si}
              - \\frac{1}{|B|} \\sum_{i \\in B} d_{si} \\Big) \\times 100

    With A = "men whose true label is not blond" and B = the same for women,
    ``d`` counts false positives only, so :math:`\\Delta_{A-B}` is the men-minus-
    women change in the positive class's false-positive rate (Hooker et al.
    2020 compare the two changes; this gives the interval of their
    difference, which two separate intervals do not). The interval is the
    two-level bootstrap of :func:`excess_harm` (pairs, then the same test
    examples for every model).

    Parameters
    ----------
    changes : array of float, shape (S, N)
        ``d_si`` from :func:`paired_error_changes`.
    cell_a, cell_b : array of bool, shape (N,)
        Membership; each must hold at least one example.
    n_resamples : int, default 1000
    confidence : float, default 0.95
    seed : int, default 0
    resample_pairs : bool, default True
        False: examples only (an interval for these particular models).

    Returns
    -------
    ChangeDifference

    Notes
    -----
    Resamples in which a cell draws no example are left out of the interval.

    References
    ----------
    Hooker et al. (2020), arXiv:2010.03058; Davison & Hinkley (1997), sec. 3.8.

    Examples
    --------
    >>> d = [[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]
    >>> r = change_difference(d, [True, True, False, False], [False, False, True, True], n_resamples=0)
    >>> r.change_a, r.change_b, r.difference
    (25.0, -25.0, 50.0)
    """
    d = np.atleast_2d(np.asarray(changes, dtype=np.float64))
    a = np.asarray(cell_a, dtype=bool).ravel()
    b = np.asarray(cell_b, dtype=bool).ravel()
    if d.ndim != 2 or a.shape != (d.shape[1],) or b.shape != (d.shape[1],):
        raise ValueError(f"changes (S, N) and both cells (N,) must share N; got {d.shape}, {a.shape}, {b.shape}")
    if not np.isfinite(d).all():
        raise ValueError("changes must be finite")
    if not a.any() or not b.any():
        raise ValueError(f"each cell needs at least one example (cell_a has {int(a.sum())}, cell_b {int(b.sum())})")
    n_resamples = int(n_resamples)
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    confidence = v.check_fraction(confidence, "confidence", high_open=True)
    S, N = d.shape
    ca = float((d[:, a].mean(axis=1)).mean() * 100.0)
    cb = float((d[:, b].mean(axis=1)).mean() * 100.0)
    lo = hi = float("nan")
    if n_resamples:
        rng = np.random.default_rng(seed)
        draws = np.empty(n_resamples)
        A = np.stack([a, b], axis=1).astype(np.float64)  # (N, 2)
        for r in range(n_resamples):
            seeds = rng.integers(0, S, size=S) if resample_pairs else np.arange(S)
            w = np.bincount(rng.integers(0, N, size=N), minlength=N).astype(np.float64)
            counts = w @ A
            if (counts == 0).any():
                draws[r] = np.nan
                continue
            per = ((d[seeds] * w) @ A) / counts  # (S, 2)
            draws[r] = (per[:, 0] - per[:, 1]).mean() * 100.0
        alpha = (1.0 - confidence) / 2.0
        lo, hi = (float(x) for x in np.nanquantile(draws, [alpha, 1.0 - alpha]))
    return ChangeDifference(change_a=ca, change_b=cb, difference=ca - cb, ci_low=lo, ci_high=hi, n_a=int(a.sum()),
                            n_b=int(b.sum()), n_pairs=S, n_resamples=n_resamples, confidence=confidence)

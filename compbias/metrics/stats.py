"""Uncertainty: bootstrap confidence intervals and Welch's t-test per class."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import numba
import numpy as np
import scipy.stats

from compbias.metrics import _validation as v
from compbias.metrics._numba import kernel, threads_for
from compbias.metrics.bias import ERR_NO_DEFINED_CLASS, cev_sde_rows, validate_populations
from compbias.metrics.confusion import ClassRates, ovr_rates, validate_groups
from compbias.metrics.bias import normalized_change

__all__ = [
    "BootstrapResult",
    "WelchResult",
    "bootstrap_ci",
    "bootstrap_indices",
    "mean_rate_change",
    "welch_ttest",
]

ERR_STATISTIC = (
    "statistic must be 'cev', 'sde' or a callable (base_rates, comp_rates) -> "
    "float or array; got {value!r}."
)
ERR_STAT_GROUPS = (
    "statistic={value!r} is computed over classes and ignores groups; pass "
    "a callable (e.g. mean_rate_change('fpr')) to bootstrap per-group rates."
)
ERR_SEED = "seed must be an integer in [0, 2**63), got {value!r}."
ERR_ALL_UNDEFINED = (
    "the statistic was undefined (NaN) on every one of the {n} resamples; "
    "no interval can be formed."
)
ERR_RATE = "rate must be 'fpr', 'fnr' or 'recall', got {value!r}."
ERR_TTEST_CLASSES = (
    "base_values has {c1} columns (classes) but comp_values has {c2}; both "
    "must be (n_models, n_classes) over the same classes."
)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------
# counter-based random numbers: resample b of seed s is the same on every
# machine and thread count
# --------------------------------------------------------------------------
@kernel()
def _mix64(z):  # pragma: no cover - numba
    """splitmix64 finaliser (Steele, Lea, Flood 2014)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@kernel()
def _draw_indices(seed, b, n, out):  # pragma: no cover - numba
    """Fill ``out`` with uniform indices in [0, n) for resample ``b``.

    splitmix64 stream, unbiased bounded integers by Lemire's
    multiply-and-reject method on the top 32 bits (n < 2**32).
    """
    state = _mix64(_mix64(np.uint64(seed) + _GOLDEN) + np.uint64(b) * _GOLDEN)
    nn = np.uint64(n)
    mask32 = np.uint64(0xFFFFFFFF)
    threshold = (np.uint64(1 << 32) - nn) % nn
    for j in range(out.shape[0]):
        while True:
            state += _GOLDEN
            x = _mix64(state) >> np.uint64(32)
            m = x * nn
            if (m & mask32) >= threshold:
                out[j] = np.int64(m >> np.uint64(32))
                break


@kernel()
def _resample_weights(seed, b, n):  # pragma: no cover - numba
    idx = np.empty(n, np.int64)
    _draw_indices(seed, b, n, idx)
    w = np.zeros(n, np.int64)
    for j in range(n):
        w[idx[j]] += 1
    return w


@kernel(parallel=True)
def _indices_kernel(seed, n_resamples, n):  # pragma: no cover - numba
    out = np.empty((n_resamples, n), np.int64)
    for b in numba.prange(n_resamples):
        _draw_indices(seed, b, n, out[b])
    return out


@kernel()
def _resample_compact(seed, b, y_true):  # pragma: no cover - numba
    """Resample ``b`` as (distinct example, multiplicity, true label) triples."""
    n = y_true.shape[0]
    w = _resample_weights(seed, b, n)
    k = 0
    for i in range(n):
        if w[i] > 0:
            k += 1
    idx = np.empty(k, np.int64)
    wts = np.empty(k, np.int64)
    ys = np.empty(k, np.int64)
    k = 0
    for i in range(n):
        if w[i] > 0:
            idx[k] = i
            wts[k] = w[i]
            ys[k] = y_true[i]
            k += 1
    return idx, wts, ys


@kernel()
def _recount(row, idx, wts, off, ys, n_cells, table):  # pragma: no cover - numba
    """One model's weighted counts on a resample, one increment per resampled example.

    ``table`` (2 * n_cells, zeroed) gets, for every distinct resampled
    example ``k`` with prediction ``p = row[idx[k]]``, ``wts[k]`` added at
    ``off[k] + p`` when ``p`` is wrong and at ``n_cells + off[k] + p`` when
    it is right (``p == ys[k]``): predictions per cell are the sum of the
    two halves, true positives the second half. ``off[k]``: the example's
    group offset ``g * C`` (or 0). One read-modify-write per example where
    separate predicted and true-positive arrays took two (1.3x faster here;
    unsigned indices, which speed up the confusion kernel, made this
    gather 2x slower).
    """
    for k in range(idx.shape[0]):
        p = np.int64(row[idx[k]])
        table[(p == ys[k]) * n_cells + off[k] + p] += wts[k]


@kernel()
def _mean_rates(preds, idx, wts, ys, n_classes, tc, n_total, smoothing):  # pragma: no cover - numba
    """Mean over models of per-class FPR and FNR (NaN where undefined).

    ``idx``/``wts``/``ys``: the distinct resampled examples, how often each
    was drawn, and their true labels; ``tc``: weighted true-class counts.
    Each model's counts come from :func:`_recount` (one increment per
    resampled example).
    """
    n_models = preds.shape[0]
    table = np.zeros(2 * n_classes, np.int64)
    off = np.zeros(idx.shape[0], np.int64)
    sum_fpr = np.zeros(n_classes)
    sum_fnr = np.zeros(n_classes)
    for m in range(n_models):
        table[:] = 0
        _recount(preds[m], idx, wts, off, ys, n_classes, table)
        for c in range(n_classes):
            tp = table[n_classes + c]
            fp = table[c]
            fn = tc[c] - tp
            tn = n_total - tp - fp - fn
            d1 = fp + tn + 2.0 * smoothing
            d2 = fn + tp + 2.0 * smoothing
            sum_fpr[c] += (fp + smoothing) / d1 if d1 > 0 else np.nan
            sum_fnr[c] += (fn + smoothing) / d2 if d2 > 0 else np.nan
    return sum_fpr / n_models, sum_fnr / n_models


@kernel()
def _bias_stat(base, comp, idx, wts, ys, n_classes, smoothing, which):  # pragma: no cover - numba
    tc = np.zeros(n_classes, np.int64)
    n_total = 0
    for k in range(idx.shape[0]):
        tc[ys[k]] += wts[k]
        n_total += wts[k]
    bf, bn = _mean_rates(base, idx, wts, ys, n_classes, tc, n_total, smoothing)
    cf, cn = _mean_rates(comp, idx, wts, ys, n_classes, tc, n_total, smoothing)
    dfpr = np.empty((1, n_classes))
    dfnr = np.empty((1, n_classes))
    for c in range(n_classes):
        dfpr[0, c] = (cf[c] - bf[c]) * 100.0 / bf[c] if bf[c] != 0 else np.nan
        dfnr[0, c] = (cn[c] - bn[c]) * 100.0 / bn[c] if bn[c] != 0 else np.nan
    cev, sde, _ = cev_sde_rows(dfpr, dfnr)
    return cev[0] if which == 0 else sde[0]


@kernel(parallel=True)
def _bootstrap_bias_kernel(y_true, base, comp, n_classes, n_resamples, seed, smoothing, which):  # pragma: no cover - numba
    out = np.empty(n_resamples)
    for b in numba.prange(n_resamples):
        idx, wts, ys = _resample_compact(seed, b, y_true)
        out[b] = _bias_stat(base, comp, idx, wts, ys, n_classes, smoothing, which)
    return out


@kernel(parallel=True)
def _ovr_resampled_kernel(y_true, preds, groups, has_groups, n_groups, n_classes, seed, first, count):  # pragma: no cover - numba
    """One-vs-rest counts of every model on resamples ``first .. first+count-1``.

    Returns true positives and predicted counts (count, M, G, C) and the
    true-class counts (count, G, C); resamples run in parallel.
    """
    n_models = preds.shape[0]
    tp = np.zeros((count, n_models, n_groups, n_classes), np.int64)
    pc = np.zeros((count, n_models, n_groups, n_classes), np.int64)
    tc = np.zeros((count, n_groups, n_classes), np.int64)
    for j in numba.prange(count):
        idx, wts, ys = _resample_compact(seed, first + j, y_true)
        # offset of each resampled example's group in a (G * C) block
        off = np.zeros(idx.shape[0], np.int64)
        if has_groups:
            for k in range(idx.shape[0]):
                off[k] = groups[idx[k]] * n_classes
        tcj = tc[j].reshape(-1)
        for k in range(idx.shape[0]):
            tcj[off[k] + ys[k]] += wts[k]
        cells = n_groups * n_classes
        table = np.zeros(2 * cells, np.int64)
        for m in range(n_models):
            table[:] = 0
            _recount(preds[m], idx, wts, off, ys, cells, table)
            pcm = pc[j, m].reshape(-1)
            tpm = tp[j, m].reshape(-1)
            for q in range(cells):
                tpm[q] = table[cells + q]
                pcm[q] = table[q] + table[cells + q]
    return tp, pc, tc


_BATCH = 64  # resamples per parallel batch of the callable path


def _compact_labels(preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Predictions as int16 (int32 beyond 32,767 classes): less memory traffic per resample."""
    return np.ascontiguousarray(preds, dtype=np.int16 if n_classes <= np.iinfo(np.int16).max else np.int32)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(ERR_SEED.format(value=seed))
    return int(seed)


def bootstrap_indices(n_examples, n_resamples, *, seed=0):
    r"""The example indices that :func:`bootstrap_ci` draws, for inspection.

    Parameters
    ----------
    n_examples : int
        Number of test examples ``N``.
    n_resamples : int
        Number of resamples ``B``.
    seed : int, default=0
        The seed given to :func:`bootstrap_ci`.

    Returns
    -------
    indices : ndarray of int64, shape (B, N)
        Row ``b`` holds the ``N`` indices, drawn uniformly with
        replacement, of resample ``b``. Resample ``b`` depends only on
        ``(seed, b)``, not on the number of threads or resamples.

    Notes
    -----
    Index :math:`j` of resample :math:`b` is
    :math:`\lfloor u_{b,j} N / 2^{32} \rfloor` with :math:`u_{b,j}` the top
    32 bits of the splitmix64 stream started at
    :math:`\mathrm{mix}(\mathrm{mix}(s + \gamma) + b\gamma)`, draws whose
    low product bits fall below :math:`2^{32} \bmod N` rejected (Lemire's
    unbiased bounded integers):

    .. math::

        P(\text{index} = i) = 1/N \quad \text{for every } i

    Examples
    --------
    >>> idx = bootstrap_indices(5, 2, seed=0)
    >>> idx.shape, bool(((idx >= 0) & (idx < 5)).all())
    ((2, 5), True)
    """
    n = v.check_positive_int(n_examples, "n_examples")
    b = v.check_positive_int(n_resamples, "n_resamples")
    return _indices_kernel(_check_seed(seed), b, n)


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap percentile confidence interval.

    Attributes
    ----------
    estimate : float or ndarray
        The statistic on the full test set.
    low, high : float or ndarray
        Percentile interval bounds (same shape as ``estimate``).
    samples : ndarray of shape (n_resamples, ...)
        The statistic on every resample (NaN where undefined).
    confidence : float
        Nominal coverage, e.g. 0.95.
    n_undefined : int or ndarray
        Resamples where the statistic was NaN (left out of the interval).
    """

    estimate: Union[float, np.ndarray]
    low: Union[float, np.ndarray]
    high: Union[float, np.ndarray]
    samples: np.ndarray
    confidence: float
    n_undefined: Union[int, np.ndarray]


def mean_rate_change(rate="fpr", *, positive_class=None):
    r"""A bootstrap statistic: normalised change of population-mean rates.

    Parameters
    ----------
    rate : {'fpr', 'fnr', 'recall'}, default='fpr'
        The rate to compare.
    positive_class : int, default=None
        Keep only this class (binary tasks); default all classes.

    Returns
    -------
    statistic : callable
        ``statistic(base_rates, comp_rates)`` returning
        :math:`100(\bar X^{comp} - \bar X^{base}) / \bar X^{base}` with the
        mean over the model axis (axis 0), of shape ``([G,] C)`` or
        ``([G])`` with ``positive_class``.

    Notes
    -----
    .. math::

        \delta X_{g,c} = 100\,\frac{\frac{1}{M'}\sum_{m'} X^{comp}_{m',g,c}
            - \frac{1}{M}\sum_m X^{base}_{m,g,c}}{\frac{1}{M}\sum_m X^{base}_{m,g,c}}

    NaN where the baseline mean is 0 (see :func:`normalized_change`).

    Examples
    --------
    >>> stat = mean_rate_change("fpr", positive_class=1)
    >>> stat.__name__
    'mean_fpr_change'
    """
    if rate not in ("fpr", "fnr", "recall"):
        raise ValueError(ERR_RATE.format(value=rate))

    def statistic(base_rates: ClassRates, comp_rates: ClassRates) -> np.ndarray:
        b = getattr(base_rates, rate)
        c = getattr(comp_rates, rate)
        if positive_class is not None:
            b, c = b[..., positive_class], c[..., positive_class]
        return normalized_change(c.mean(axis=0), b.mean(axis=0))

    statistic.__name__ = f"mean_{rate}_change"
    return statistic


def bootstrap_ci(y_true, base_preds, comp_preds, n_classes, *, statistic="cev",
                 n_resamples=1000, confidence=0.95, seed=0, groups=None, n_groups=None,
                 smoothing=0.0):
    r"""Bootstrap confidence interval of a population-level bias statistic.

    Test examples are resampled with replacement; on every resample the
    confusion counts of **all** models of both populations are recounted on
    the resampled examples and the statistic recomputed, so the interval
    reflects the finite test set (the populations are held fixed).

    Parameters
    ----------
    y_true : array-like of shape (n_examples,)
        True class ids.
    base_preds : array-like of shape (M, n_examples)
        Predictions of the baseline population.
    comp_preds : array-like of shape (M', n_examples)
        Predictions of the compressed population.
    n_classes : int
        Number of classes.
    statistic : {'cev', 'sde'} or callable, default='cev'
        ``'cev'``/``'sde'``: CEV/SDE of the compressed population's mean
        per-class FPR/FNR against the baseline's mean (as
        :func:`population_bias` computes ``.cev``/``.sde``); runs entirely
        in a parallel numba kernel. A callable receives
        ``(base_rates, comp_rates)``, two :class:`ClassRates` of shape
        ``(M, [G,] C)`` / ``(M', [G,] C)``, and returns a float or an
        array (e.g. :func:`mean_rate_change`).
    n_resamples : int, default=1000
        Number of bootstrap resamples.
    confidence : float, default=0.95
        Coverage of the interval, in (0, 1).
    seed : int, default=0
        Resample ``b`` is a function of ``(seed, b)`` only (a counter-based
        splitmix64 stream), so results do not depend on thread count; see
        :func:`bootstrap_indices`.
    groups : array-like of shape (n_examples,), default=None
        Integer group codes; adds a group axis to the rates the callable
        receives. Not allowed with ``'cev'``/``'sde'``.
    n_groups : int, default=None
        Number of groups (default ``groups.max() + 1``).
    smoothing : float, default=0.0
        Additive smoothing of every rate, see :func:`class_rates`.

    Returns
    -------
    result : BootstrapResult
        ``.estimate``, ``.low``, ``.high``, ``.samples``, ``.n_undefined``.

    Raises
    ------
    ValueError
        If the statistic is undefined on the full test set (e.g. no class
        with a defined CEV) or on every resample.

    Notes
    -----
    Percentile interval over the :math:`B` resampled values
    :math:`\theta^*_b` that are defined (not NaN):

    .. math::

        [\,Q_{\alpha/2}(\theta^*),\; Q_{1-\alpha/2}(\theta^*)\,],
        \qquad \alpha = 1 - \mathrm{confidence}

    with ``numpy.nanquantile``'s linear interpolation. A resample can
    leave a class without examples; that class is then dropped from CEV/SDE
    for that resample, as :func:`cev` does.

    References
    ----------
    Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 200)
    >>> base = np.where(rng.random((4, 200)) < 0.8, y, rng.integers(0, 3, (4, 200)))
    >>> comp = np.where(rng.random((4, 200)) < 0.6, y, rng.integers(0, 3, (4, 200)))
    >>> r = bootstrap_ci(y, base, comp, 3, n_resamples=200, seed=1)
    >>> bool(r.low <= r.estimate <= r.high)
    True
    """
    y_true, base, comp, n_classes = validate_populations(y_true, base_preds, comp_preds, n_classes)
    n_resamples = v.check_positive_int(n_resamples, "n_resamples")
    confidence = v.check_fraction(confidence, "confidence", high_open=True)
    seed = _check_seed(seed)
    smoothing = v.check_nonnegative(smoothing, "smoothing")
    n = y_true.shape[0]
    if isinstance(statistic, str):
        if statistic not in ("cev", "sde"):
            raise ValueError(ERR_STATISTIC.format(value=statistic))
        if groups is not None:
            raise ValueError(ERR_STAT_GROUPS.format(value=statistic))
        which = 0 if statistic == "cev" else 1
        base16, comp16 = _compact_labels(base, n_classes), _compact_labels(comp, n_classes)
        everything = np.arange(n, dtype=np.int64)
        estimate = _bias_stat(base16, comp16, everything, np.ones(n, np.int64), y_true, n_classes,
                              smoothing, which)
        if np.isnan(estimate):
            raise ValueError(ERR_NO_DEFINED_CLASS.format(metric=statistic.upper(), n=n_classes))
        with threads_for(n_resamples * (base.size + comp.size)):
            samples = _bootstrap_bias_kernel(y_true, base16, comp16, n_classes, n_resamples, seed,
                                             smoothing, which)
    elif callable(statistic):
        g, has_g, n_g = validate_groups(groups, n_groups, n)
        base16, comp16 = _compact_labels(base, n_classes), _compact_labels(comp, n_classes)

        def rates_of(tp, pc, tc):
            size = tc.sum(axis=-1, keepdims=True)
            r = ClassRates._from_ovr(tp, pc, tc[None], size[None], smoothing)
            if has_g:
                return r
            return ClassRates(tp=r.tp[:, 0], fp=r.fp[:, 0], fn=r.fn[:, 0], tn=r.tn[:, 0],
                              fpr=r.fpr[:, 0], fnr=r.fnr[:, 0], smoothing=r.smoothing)

        full = [ovr_rates(y_true, p, g, has_g, n_g, n_classes, smoothing=smoothing) for p in (base, comp)]
        if not has_g:
            full = [ClassRates(tp=r.tp[:, 0], fp=r.fp[:, 0], fn=r.fn[:, 0], tn=r.tn[:, 0],
                               fpr=r.fpr[:, 0], fnr=r.fnr[:, 0], smoothing=r.smoothing) for r in full]
        estimate = np.asarray(statistic(*full), dtype=np.float64)
        samples = np.empty((n_resamples, *estimate.shape))
        for first in range(0, n_resamples, _BATCH):
            count = min(_BATCH, n_resamples - first)
            with threads_for(count * (base.size + comp.size)):
                btp, bpc, btc = _ovr_resampled_kernel(y_true, base16, g, has_g, n_g, n_classes, seed, first, count)
                ctp, cpc, _ = _ovr_resampled_kernel(y_true, comp16, g, has_g, n_g, n_classes, seed, first, count)
            for j in range(count):
                samples[first + j] = statistic(rates_of(btp[j], bpc[j], btc[j]), rates_of(ctp[j], cpc[j], btc[j]))
    else:
        raise ValueError(ERR_STATISTIC.format(value=statistic))

    undefined = np.isnan(samples).sum(axis=0)
    if np.all(undefined == n_resamples):
        raise ValueError(ERR_ALL_UNDEFINED.format(n=n_resamples))
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN bounds
            low = np.nanquantile(samples, alpha / 2, axis=0)
            high = np.nanquantile(samples, 1 - alpha / 2, axis=0)

    def scalar(x):
        return float(x) if np.ndim(x) == 0 else x

    return BootstrapResult(estimate=scalar(estimate), low=scalar(low), high=scalar(high),
                           samples=samples, confidence=confidence,
                           n_undefined=int(undefined) if np.ndim(undefined) == 0 else undefined)


@dataclass(frozen=True)
class WelchResult:
    """Welch's t-test per class.

    Attributes
    ----------
    statistic, pvalue, df : ndarray of shape (n_classes,)
        t statistic (positive when the baseline mean is larger), two-sided
        p-value and Welch-Satterthwaite degrees of freedom; NaN where the
        test is undefined.
    n_base, n_comp : ndarray of int64, shape (n_classes,)
        Models with a defined (non-NaN) value, per class.
    """

    statistic: np.ndarray
    pvalue: np.ndarray
    df: np.ndarray
    n_base: np.ndarray
    n_comp: np.ndarray

    def significant(self, alpha: float = 0.05) -> np.ndarray:
        """Classes whose p-value is below ``alpha`` (NaN counts as not significant)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.pvalue < alpha)


def welch_ttest(base_values, comp_values):
    r"""Welch's two-sample t-test per class between two populations.

    Parameters
    ----------
    base_values : array-like of shape (M, n_classes)
        A per-model, per-class value of the baseline population, e.g.
        ``population_rates(...).recall`` (class-level accuracy).
    comp_values : array-like of shape (M', n_classes)
        The same for the compressed population.

    Returns
    -------
    result : WelchResult

    Notes
    -----
    For each class, with sample means :math:`\bar a, \bar b`, sample
    variances (``ddof=1``) :math:`s_a^2, s_b^2` and sizes :math:`n_a, n_b`,

    .. math::

        t = \frac{\bar a - \bar b}{\sqrt{s_a^2/n_a + s_b^2/n_b}}

    with the Welch-Satterthwaite degrees of freedom and a two-sided p-value,
    as ``scipy.stats.ttest_ind(a, b, equal_var=False)`` computes it.

    NaN handling: NaN values (e.g. the recall of a class absent from the test
    set) are left out per class (``nan_policy='omit'``); a class with fewer
    than 2 defined values in either population gets NaN statistic, p-value
    and df. When both populations are constant the denominator is 0 and the
    test is undefined: scipy returns NaN (equal means) or +-inf with
    p-value 0 (different means); these are passed through.

    References
    ----------
    Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?",
    section 3: classes whose accuracy the compressed population changes
    significantly (two-tailed Welch's t-test, p < 0.05).

    Examples
    --------
    >>> r = welch_ttest([[0.9, 0.5], [0.8, 0.6], [0.85, 0.55]],
    ...                 [[0.5, 0.5], [0.6, 0.6], [0.55, 0.6]])
    >>> r.significant(0.05)
    array([ True, False])
    """
    a = v.check_float(base_values, "base_values", allow_nan=True, ndims=(2,))
    b = v.check_float(comp_values, "comp_values", allow_nan=True, ndims=(2,))
    if a.shape[1] != b.shape[1]:
        raise ValueError(ERR_TTEST_CLASSES.format(c1=a.shape[1], c2=b.shape[1]))
    n_a = np.sum(~np.isnan(a), axis=0)
    n_b = np.sum(~np.isnan(b), axis=0)
    c = a.shape[1]
    stat = np.full(c, np.nan)
    pval = np.full(c, np.nan)
    df = np.full(c, np.nan)
    ok = (n_a >= 2) & (n_b >= 2)
    complete = ok & (n_a == a.shape[0]) & (n_b == b.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if complete.any():
                r = scipy.stats.ttest_ind(a[:, complete], b[:, complete], axis=0, equal_var=False)
                stat[complete], pval[complete], df[complete] = r.statistic, r.pvalue, r.df
            for j in np.flatnonzero(ok & ~complete):
                aj, bj = a[:, j], b[:, j]
                r = scipy.stats.ttest_ind(aj[~np.isnan(aj)], bj[~np.isnan(bj)], equal_var=False)
                stat[j], pval[j], df[j] = r.statistic, r.pvalue, r.df
    return WelchResult(statistic=stat, pvalue=pval, df=df,
                       n_base=n_a.astype(np.int64), n_comp=n_b.astype(np.int64))

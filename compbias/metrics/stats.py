"""Uncertainty: bootstrap confidence intervals (and Welch's t-test per class, re-exported from :mod:`compbias.metrics.welch`).

The resampling kernels are in :mod:`compbias.metrics._resampling`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._numba import threads_for
from compbias.metrics._resampling import (
    bias_stat,
    bootstrap_bias_kernel,
    indices_kernel,
    ovr_resampled_kernel,
)
from compbias.metrics._validation import validate_groups
from compbias.metrics.bias import ERR_NO_DEFINED_CLASS, normalized_change, validate_populations
from compbias.metrics.rates import ClassRates, ovr_rates
from compbias.metrics.welch import ERR_TTEST_CLASSES, WelchResult, welch_ttest  # noqa: F401  (re-exported)

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
    return indices_kernel(_check_seed(seed), b, n)


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
        estimate = bias_stat(base16, comp16, everything, np.ones(n, np.int64), y_true, n_classes,
                              smoothing, which)
        if np.isnan(estimate):
            raise ValueError(ERR_NO_DEFINED_CLASS.format(metric=statistic.upper(), n=n_classes))
        with threads_for(n_resamples * (base.size + comp.size)):
            samples = bootstrap_bias_kernel(y_true, base16, comp16, n_classes, n_resamples, seed,
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
                btp, bpc, btc = ovr_resampled_kernel(y_true, base16, g, has_g, n_g, n_classes, seed, first, count)
                ctp, cpc, _ = ovr_resampled_kernel(y_true, comp16, g, has_g, n_g, n_classes, seed, first, count)
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

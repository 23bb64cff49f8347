"""Welch's t-test per class between two populations (:func:`welch_ttest`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats

from compbias.metrics import _validation as v

__all__ = ["WelchResult", "welch_ttest"]

ERR_TTEST_CLASSES = (
    "base_values has {c1} columns (classes) but comp_values has {c2}; both "
    "must be (n_models, n_classes) over the same classes."
)



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

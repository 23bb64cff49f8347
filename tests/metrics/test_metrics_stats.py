"""bootstrap_ci, bootstrap_indices, mean_rate_change, welch_ttest."""

import re

import numpy as np
import pytest
import scipy.stats

from compbias.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    cev,
    class_rates,
    confusion_counts,
    mean_rate_change,
    normalized_change,
    population_bias,
    sde,
    welch_ttest,
)
from compbias.metrics import stats as stats_mod


@pytest.fixture(scope="module")
def populations():
    rng = np.random.default_rng(0)
    n, c = 400, 5
    y = rng.integers(0, c, n)
    base = np.where(rng.random((4, n)) < 0.8, y, rng.integers(0, c, (4, n)))
    comp = np.where(rng.random((3, n)) < 0.6, y, rng.integers(0, c, (3, n)))
    groups = rng.integers(0, 2, n)
    return y, base, comp, c, groups


def _cev_from_counts(y, base, comp, c, idx):
    """CEV of a resample, computed the slow way from sklearn-style confusion matrices."""
    rb = class_rates(confusion_counts(y[idx], base[:, idx], c))
    rc = class_rates(confusion_counts(y[idx], comp[:, idx], c))
    with np.errstate(invalid="ignore"):
        d1 = normalized_change(rc.fpr.mean(0), rb.fpr.mean(0))
        d2 = normalized_change(rc.fnr.mean(0), rb.fnr.mean(0))
    return cev(d1, d2).value


def test_indices_are_reproducible_and_uniform():
    a = bootstrap_indices(1000, 20, seed=7)
    np.testing.assert_array_equal(a, bootstrap_indices(1000, 20, seed=7))
    np.testing.assert_array_equal(a[:5], bootstrap_indices(1000, 5, seed=7))  # resample b depends on (seed, b) only
    assert not np.array_equal(a, bootstrap_indices(1000, 20, seed=8))
    assert a.min() >= 0 and a.max() < 1000
    counts = np.bincount(bootstrap_indices(10, 2000, seed=1).ravel(), minlength=10)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4


def test_cev_samples_equal_recomputation_on_the_drawn_indices(populations):
    y, base, comp, c, _ = populations
    r = bootstrap_ci(y, base, comp, c, n_resamples=30, seed=3)
    idx = bootstrap_indices(len(y), 30, seed=3)
    expected = [_cev_from_counts(y, base, comp, c, idx[b]) for b in range(30)]
    np.testing.assert_allclose(r.samples, expected, rtol=1e-9)
    assert r.estimate == pytest.approx(population_bias(y, base, comp, c).cev.value, rel=1e-12)
    assert r.low == pytest.approx(np.quantile(r.samples, 0.025))
    assert r.high == pytest.approx(np.quantile(r.samples, 0.975))
    assert r.n_undefined == 0 and r.confidence == 0.95


def test_sde_and_callable_statistics_use_the_same_resamples(populations):
    y, base, comp, c, _ = populations
    fast = bootstrap_ci(y, base, comp, c, statistic="sde", n_resamples=20, seed=5, smoothing=0.5)

    def my_sde(rb, rc):
        return sde(normalized_change(rc.fpr.mean(0), rb.fpr.mean(0)),
                   normalized_change(rc.fnr.mean(0), rb.fnr.mean(0))).value

    slow = bootstrap_ci(y, base, comp, c, statistic=my_sde, n_resamples=20, seed=5, smoothing=0.5)
    np.testing.assert_allclose(fast.samples, slow.samples, rtol=1e-9)
    assert fast.estimate == pytest.approx(slow.estimate, rel=1e-12)


def test_per_group_rate_change_interval(populations):
    y, base, comp, c, groups = populations
    stat = mean_rate_change("fpr", positive_class=1)
    r = bootstrap_ci(y, base, comp, c, statistic=stat, groups=groups, n_resamples=50, seed=0, confidence=0.9)
    assert r.samples.shape == (50, 2) and r.low.shape == (2,)
    assert np.all(r.low <= r.high)
    # estimate: change of the mean FPR of class 1 inside each group
    for g in (0, 1):
        sel = groups == g
        fb = class_rates(confusion_counts(y[sel], base[:, sel], c)).fpr[:, 1].mean()
        fc = class_rates(confusion_counts(y[sel], comp[:, sel], c)).fpr[:, 1].mean()
        assert r.estimate[g] == pytest.approx((fc - fb) / fb * 100)
    # each sample: the same statistic recounted on the drawn examples (with repeats)
    indices = bootstrap_indices(len(y), 50, seed=0)
    for b in (0, 17, 49):
        idx = indices[b]
        yb, gb = y[idx], groups[idx]
        for g in (0, 1):
            sel = gb == g
            fb = class_rates(confusion_counts(yb[sel], base[:, idx][:, sel], c)).fpr[:, 1].mean()
            fc = class_rates(confusion_counts(yb[sel], comp[:, idx][:, sel], c)).fpr[:, 1].mean()
            assert r.samples[b, g] == pytest.approx((fc - fb) / fb * 100, rel=1e-12)


def test_bootstrap_errors(populations):
    y, base, comp, c, groups = populations
    with pytest.raises(ValueError, match=re.escape(stats_mod.ERR_STATISTIC.format(value="var"))):
        bootstrap_ci(y, base, comp, c, statistic="var")
    with pytest.raises(ValueError, match=re.escape(stats_mod.ERR_STAT_GROUPS.format(value="cev"))):
        bootstrap_ci(y, base, comp, c, groups=groups)
    with pytest.raises(ValueError, match=re.escape(stats_mod.ERR_SEED.format(value=-1))):
        bootstrap_ci(y, base, comp, c, seed=-1)
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_ci(y, base, comp, c, confidence=1.0)
    perfect = np.tile(y, (2, 1))
    with pytest.raises(ValueError, match="CEV is undefined"):
        bootstrap_ci(y, perfect, comp, c, n_resamples=5)


def test_welch_matches_scipy_per_class():
    rng = np.random.default_rng(6)
    a = rng.normal(0.8, 0.05, size=(30, 4))
    b = rng.normal(0.75, 0.1, size=(25, 4))
    r = welch_ttest(a, b)
    for j in range(4):
        ref = scipy.stats.ttest_ind(a[:, j], b[:, j], equal_var=False)
        assert r.statistic[j] == pytest.approx(ref.statistic, rel=1e-12)
        assert r.pvalue[j] == pytest.approx(ref.pvalue, rel=1e-12)
        assert r.df[j] == pytest.approx(ref.df, rel=1e-12)


def test_welch_hand_computed_and_nan_handling():
    a = np.array([[1.0, np.nan, 1.0], [3.0, 2.0, np.nan], [np.nan, 4.0, 2.0]])
    b = np.array([[0.0, 1.0, 5.0], [2.0, np.nan, 6.0], [4.0, 3.0, 7.0]])
    r = welch_ttest(a, b)
    # class 0: a = (1, 3) mean 2 var 2; b = (0, 2, 4) mean 2 -> t = 0
    assert r.statistic[0] == 0.0 and r.pvalue[0] == pytest.approx(1.0)
    # class 1: a = (2, 4), b = (1, 3): means 3 and 2, variances 2 and 2 -> t = 1 / sqrt(2/2 + 2/2)
    assert r.statistic[1] == pytest.approx(1 / np.sqrt(2.0))
    np.testing.assert_array_equal(r.n_base, [2, 2, 2])
    np.testing.assert_array_equal(r.n_comp, [3, 2, 3])
    # fewer than 2 defined values -> NaN, never significant
    r2 = welch_ttest([[1.0], [np.nan]], [[1.0], [2.0]])
    assert np.isnan(r2.pvalue[0]) and not r2.significant()[0]
    with pytest.raises(ValueError, match=re.escape(stats_mod.ERR_TTEST_CLASSES.format(c1=3, c2=2))):
        welch_ttest(np.ones((3, 3)), np.ones((3, 2)))

"""normalized_change, cev, sde, population_bias."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compbias.metrics import cev, class_rates, confusion_counts, normalized_change, population_bias, sde
from compbias.metrics import bias as bias_mod
from compbias.metrics import _validation as v


def test_normalized_change_hand_computed_and_zero_baseline():
    out = normalized_change([0.2, 0.1, 0.3, np.nan], [0.1, 0.1, 0.0, 0.2])
    np.testing.assert_array_equal(out[:2], [100.0, 0.0])
    assert np.isnan(out[2]) and np.isnan(out[3])  # zero baseline, NaN rate -> NaN, never inf
    # broadcasting: per-model rates (M, C) against a baseline mean (C,)
    np.testing.assert_allclose(normalized_change([[0.1, 0.4], [0.3, 0.2]], [0.2, 0.2]), [[-50, 100], [50, 0]])
    with pytest.raises(ValueError, match="must match"):
        normalized_change([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=re.escape("compressed contains inf")):
        normalized_change([np.inf], [1.0])


def test_cev_sde_hand_computed():
    dfpr = [10.0, -10.0, 30.0]
    dfnr = [0.0, 20.0, 10.0]
    # means 10 and 10; var(dfpr) = (0 + 400 + 400)/3, var(dfnr) = (100 + 100 + 0)/3
    assert cev(dfpr, dfnr).value == pytest.approx((800 / 3 + 200 / 3) / 2)
    # |10|, |-30|, |20| -> mean 20 / sqrt 2
    assert sde(dfpr, dfnr).value == pytest.approx(20 / math.sqrt(2))
    r = cev(dfpr, dfnr)
    assert r.n_used == 3 and r.dropped.size == 0 and r.n_classes == 3 and float(r) == r.value


def test_cev_is_half_the_mean_squared_distance_to_the_centroid_ddof0():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    pts = np.column_stack([x, y])
    msd = np.mean(np.sum((pts - pts.mean(0)) ** 2, axis=1))
    assert cev(x, y).value == pytest.approx(msd / 2)
    assert cev(x, y).value == pytest.approx((np.var(x) + np.var(y)) / 2)  # numpy var is ddof=0


def test_undefined_classes_are_dropped_and_reported():
    r = sde([10.0, np.nan, 0.0, 5.0], [0.0, 1.0, np.nan, 5.0])
    np.testing.assert_array_equal(r.dropped, [1, 2])
    assert r.n_used == 2 and r.value == pytest.approx((10 / math.sqrt(2) + 0) / 2)


def test_perfect_baseline_drops_every_class_and_raises():
    # the baseline makes no mistake: all its rates are 0, every change undefined
    y = np.array([0, 1, 2, 0, 1, 2])
    base = class_rates(confusion_counts(y, y, 3))
    comp = class_rates(confusion_counts(y, [0, 1, 1, 0, 2, 2], 3))
    dfpr, dfnr = normalized_change(comp.fpr, base.fpr), normalized_change(comp.fnr, base.fnr)
    assert np.isnan(dfpr).all()
    msg = bias_mod.ERR_NO_DEFINED_CLASS.format(metric="CEV", n=3)
    with pytest.raises(ValueError, match=re.escape(msg)):
        cev(dfpr, dfnr)
    # additive smoothing keeps every class
    base_s = class_rates(confusion_counts(y, y, 3), smoothing=0.5)
    comp_s = class_rates(confusion_counts(y, [0, 1, 1, 0, 2, 2], 3), smoothing=0.5)
    r = cev(normalized_change(comp_s.fpr, base_s.fpr), normalized_change(comp_s.fnr, base_s.fnr))
    assert r.n_used == 3 and r.value > 0


def test_bad_deltas():
    with pytest.raises(ValueError, match="a normalised change is never inf"):
        cev([np.inf, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=re.escape(v.ERR_SHAPE_MISMATCH.format(
            name1="delta_fpr", shape1=(2,), name2="delta_fnr", shape2=(3,)))):
        sde([1.0, 2.0], [1.0, 2.0, 3.0])


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-1e4, 1e4)),
       st.randoms(use_true_random=False))
def test_cev_sde_nonnegative_and_shift_invariance(x, rnd):
    y = np.array([rnd.uniform(-1e4, 1e4) for _ in x])
    c = cev(x, y).value
    assert c >= 0 and sde(x, y).value >= 0
    # CEV is a variance: adding the same change to every class leaves it unchanged
    assert cev(x + 50.0, y - 20.0).value == pytest.approx(c, rel=1e-6, abs=1e-6)


def test_population_bias_hand_computed():
    y = np.array([0, 0, 1, 1])
    base = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])  # FPR: m0 (0, .5), m1 (.5, 0); FNR: m0 (.5, 0), m1 (0, .5)
    comp = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])  # FPR: m0 (0, 1), m1 (1, 0); FNR: m0 (1, 0), m1 (0, 1)
    r = population_bias(y, base, comp, 2)
    # means: base FPR (.25, .25), FNR (.25, .25); comp (.5, .5) each -> +100 % everywhere
    np.testing.assert_allclose(r.delta_fpr, [100, 100])
    np.testing.assert_allclose(r.delta_fnr, [100, 100])
    assert r.cev.value == 0.0 and r.sde.value == 0.0
    # per model: m0 FPR (0, 1) vs (.25, .25) -> (-100, 300); FNR (1, 0) -> (300, -100)
    np.testing.assert_allclose(r.model_delta_fpr[0], [-100, 300])
    np.testing.assert_allclose(r.model_delta_fnr[0], [300, -100])
    assert r.model_cev[0] == pytest.approx((np.var([-100, 300]) + np.var([300, -100])) / 2)
    assert r.model_sde[0] == pytest.approx(400 / math.sqrt(2))
    np.testing.assert_array_equal(r.model_n_used, [2, 2])


def test_population_bias_class_absent_from_test_set_is_dropped():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)  # class 3 never occurs
    base = np.where(rng.random((3, 300)) < 0.7, y, rng.integers(0, 4, (3, 300)))
    comp = np.where(rng.random((3, 300)) < 0.5, y, rng.integers(0, 4, (3, 300)))
    r = population_bias(y, base, comp, 4)
    np.testing.assert_array_equal(r.cev.dropped, [3])
    assert r.cev.n_used == 3
    expected = cev(r.delta_fpr, r.delta_fnr).value
    assert r.cev.value == expected
    # the per-model values are the same function applied row by row
    for m in range(3):
        assert r.model_cev[m] == pytest.approx(cev(r.model_delta_fpr[m], r.model_delta_fnr[m]).value, rel=1e-12)
        assert r.model_sde[m] == pytest.approx(sde(r.model_delta_fpr[m], r.model_delta_fnr[m]).value, rel=1e-12)

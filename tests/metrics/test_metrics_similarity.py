"""cca_correlations (against google/svcca numbers), svcca, linear_cka."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compbias.metrics import cca_correlations, linear_cka, svcca
from compbias.metrics import similarity as sim_mod


def _reference_inputs():
    rng = np.random.default_rng(12345)
    a = rng.normal(size=(6, 200)) * np.arange(1, 7)[:, None]
    b = rng.normal(size=(4, 6)) @ a + 5.0 * rng.normal(size=(4, 200))
    a_const = a.copy()
    a_const[5] = 2.0 + 1e-9 * rng.normal(size=200)
    return a, a_const, b


# Obtained by running google/svcca cca_core.py (commit 1f3fbf1, copied to /tmp,
# not committed) on the inputs of _reference_inputs():
#   cca_core.get_cca_similarity(x, b, epsilon=eps, verbose=False)["cca_coef1"]
# with numpy 2.4.6; printed with 12 decimals.
REFERENCE_PLAIN_EPS0 = [0.928890825761, 0.911779854341, 0.663711268586, 0.216051633962]
REFERENCE_NEAR_CONSTANT_EPS1E6 = [0.911789013715, 0.664275811713, 0.48186093213, 0.089781485916]


def test_matches_google_svcca_reference():
    a, a_const, b = _reference_inputs()
    np.testing.assert_allclose(cca_correlations(a, b), REFERENCE_PLAIN_EPS0, rtol=0, atol=1e-6)
    # the near-constant neuron is removed by epsilon, exactly as the reference does
    np.testing.assert_allclose(cca_correlations(a_const, b, epsilon=1e-6), REFERENCE_NEAR_CONSTANT_EPS1E6,
                               rtol=0, atol=1e-6)


def test_cca_hand_computed_single_pair_is_pearson_correlation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 300))
    y = 0.5 * x + rng.normal(size=(1, 300))
    r = cca_correlations(x, y)
    assert r.shape == (1,)
    assert r[0] == pytest.approx(abs(np.corrcoef(x[0], y[0])[0, 1]), abs=1e-12)


def test_cca_matches_scipy_free_qr_formulation():
    # canonical correlations = singular values of Qx^T Qy (orthonormal bases of the centred data)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 400))
    y = rng.normal(size=(3, 5)) @ x + rng.normal(size=(3, 400))
    qx, _ = np.linalg.qr((x - x.mean(1, keepdims=True)).T)
    qy, _ = np.linalg.qr((y - y.mean(1, keepdims=True)).T)
    expected = np.linalg.svd(qx.T @ qy, compute_uv=False)
    np.testing.assert_allclose(cca_correlations(x, y), expected, atol=1e-9)


def test_cca_errors():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_DATAPOINTS.format(n1=50, n2=40))):
        cca_correlations(rng.normal(size=(3, 50)), rng.normal(size=(3, 40)))
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_TOO_FEW_DATAPOINTS.format(
            name="acts1", neurons=50, points=3))):
        cca_correlations(rng.normal(size=(50, 3)), rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_ALL_CONSTANT.format(name="acts2", epsilon=0.0))):
        cca_correlations(rng.normal(size=(3, 50)), np.ones((2, 50)))
    with pytest.raises(ValueError, match="acts1 contains NaN"):
        cca_correlations(np.full((2, 10), np.nan), np.ones((2, 10)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6))
def test_svcca_identity_and_invertible_linear_map(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 300))
    assert svcca(x, x).similarity == pytest.approx(1.0, abs=1e-6)
    a = rng.normal(size=(n, n)) + 3 * np.eye(n)  # invertible
    y = rng.normal(size=(n, n)) @ x + rng.normal(size=(n, 300))
    base = svcca(x, y, keep_variance=1.0)
    mapped = svcca(a @ x, y, keep_variance=1.0)
    assert base.dims == (n, n)
    np.testing.assert_allclose(mapped.correlations, base.correlations, atol=1e-6)
    assert base.distance == pytest.approx(1 - base.similarity)


def test_svcca_keeps_99_percent_of_variance():
    rng = np.random.default_rng(3)
    # 3 strong directions, 5 tiny ones: 99% of variance is in the first 3
    x = np.vstack([rng.normal(size=(3, 500)) * 10, rng.normal(size=(5, 500)) * 0.01])
    x = np.linalg.qr(rng.normal(size=(8, 8)))[0] @ x  # rotate: neurons mix the directions
    r = svcca(x, x)
    assert r.dims == (3, 3) and r.correlations.shape == (3,)
    assert svcca(x, x, keep_dims=5).dims == (5, 5)
    # matches the tutorial recipe: SVD of centred acts, keep top k, then CCA
    xc = x - x.mean(1, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    y = rng.normal(size=(4, 8)) @ x + rng.normal(size=(4, 500))
    yc = y - y.mean(1, keepdims=True)
    uy, sy, vty = np.linalg.svd(yc, full_matrices=False)
    np.testing.assert_allclose(svcca(x, y, keep_dims=3).correlations,
                               cca_correlations(s[:3, None] * vt[:3], sy[:3, None] * vty[:3]), atol=1e-9)


def test_svcca_conv_maps_and_pooling():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 3, 4, 4))
    flat = np.moveaxis(a, 1, 0).reshape(3, -1)  # C x (N*H*W)
    np.testing.assert_allclose(svcca(a, flat, keep_variance=1.0).similarity, 1.0, atol=1e-6)
    pooled = svcca(a, a.reshape(10, 3, 2, 2, 2, 2).mean(axis=(3, 5)).transpose(1, 0, 2, 3).reshape(3, -1),
                   pool=2, keep_variance=1.0)
    assert pooled.similarity == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_DATAPOINTS.format(n1=160, n2=40))):
        svcca(a, rng.normal(size=(10, 3, 2, 2)))
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_POOL.format(value=0))):
        svcca(a, a, pool=0)
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_ACTS_NDIM.format(name="acts1", shape=(2, 2, 2)))):
        svcca(np.ones((2, 2, 2)), a)


def test_linear_cka_hand_computed():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = np.array([[1.0], [0.0], [-1.0], [0.0]])
    # X^T X = 2 I, Y^T Y = [2], Y^T X = [2, 0] -> 4 / (sqrt(8) * 2)
    assert linear_cka(x, y) == pytest.approx(4 / (np.sqrt(8) * 2))
    # the Gram form (more features than datapoints) gives the same number
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 30))
    ac, bc = a - a.mean(0), b - b.mean(0)
    feat = np.sum((bc.T @ ac) ** 2) / (np.linalg.norm(ac.T @ ac) * np.linalg.norm(bc.T @ bc))
    assert linear_cka(a, b) == pytest.approx(feat, rel=1e-10)
    with pytest.raises(ValueError, match=re.escape(sim_mod.ERR_CKA_CONSTANT.format(name="y"))):
        linear_cka(a, np.ones((6, 2)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_linear_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 4)) + rng.normal(size=(50, 4))
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    base = linear_cka(x, y)
    assert 0 <= base <= 1 + 1e-12
    assert linear_cka(scale * x @ q, y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, rel=1e-9)


def test_cca_covariance_and_whitening_paths_agree():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(4, 300))
    b = rng.normal(size=(3, 4)) @ a + rng.normal(size=(3, 300))
    base = cca_correlations(a, b)
    # shifted activations: a moderate offset uses the uncentred-product path,
    # a huge one (mean^2 / var = 1e12) the explicitly centred one; same result
    np.testing.assert_allclose(cca_correlations(a + 300.0, b - 50.0), base, atol=1e-9)
    np.testing.assert_allclose(cca_correlations(a + 1e6, b), base, atol=1e-6)
    # a duplicated neuron makes Sxx singular: the pseudo-inverse (eigen) path
    # gives the same correlations plus a zero, as the reference's pinv does
    dup = cca_correlations(np.vstack([a[:2], a[:1]]), b)
    np.testing.assert_allclose(dup[:2], cca_correlations(a[:2], b), atol=1e-8)
    assert dup.shape == (3,) and abs(dup[2]) < 1e-6

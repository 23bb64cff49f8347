"""confusion_counts, class_rates, population_rates: hand-computed cases and sklearn agreement."""

import re

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from compbias.metrics import class_rates, confusion_counts, population_rates
from compbias.metrics import _validation as v
from compbias.metrics import _confusion_kernels as kernels_mod
from compbias.metrics import confusion as confusion_mod


def test_single_model_hand_computed():
    # true:  0 0 1 1 2 2 2 ; pred: 0 1 1 1 2 0 2
    counts = confusion_counts([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 3)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 2, 0], [1, 0, 2]])


def test_population_and_groups_shapes_and_values():
    y = np.array([0, 1, 1, 0])
    preds = np.array([[0, 1, 0, 0], [1, 1, 1, 1]])
    groups = np.array([0, 0, 1, 1])
    counts = confusion_counts(y, preds, 2, groups=groups)
    assert counts.shape == (2, 2, 2, 2)
    # model 0, group 0: (0->0), (1->1)
    np.testing.assert_array_equal(counts[0, 0], [[1, 0], [0, 1]])
    # model 0, group 1: (1->0), (0->0)
    np.testing.assert_array_equal(counts[0, 1], [[1, 0], [1, 0]])
    # model 1 predicts 1 everywhere
    np.testing.assert_array_equal(counts[1, 1], [[0, 1], [0, 1]])
    assert confusion_counts(y, preds[0], 2, groups=groups).shape == (2, 2, 2)
    assert confusion_counts(y, preds, 2).shape == (2, 2, 2)


def test_empty_group_and_absent_class_are_zero():
    counts = confusion_counts([0, 0, 1], [0, 1, 1], 4, groups=[0, 0, 2], n_groups=4)
    assert counts.shape == (4, 4, 4)
    assert counts[1].sum() == 0 and counts[3].sum() == 0  # empty groups
    assert counts[:, 2:, :].sum() == 0 and counts[:, :, 2:].sum() == 0  # classes 2, 3 absent
    rates = class_rates(counts)
    assert np.isnan(rates.fpr[1]).all() and np.isnan(rates.fnr[1]).all()  # empty group: undefined
    assert np.isnan(rates.fnr[0, 2])  # absent class: FNR undefined
    assert rates.fpr[0, 2] == 0.0  # ... but FPR defined (never predicted)


def test_matches_sklearn_per_model_and_group():
    rng = np.random.default_rng(3)
    n, c, m, g = 500, 7, 3, 4
    y = rng.integers(0, c, n)
    preds = rng.integers(0, c, (m, n))
    groups = rng.integers(0, g, n)
    counts = confusion_counts(y, preds, c, groups=groups, n_groups=g)
    for i in range(m):
        np.testing.assert_array_equal(
            confusion_counts(y, preds[i], c), confusion_matrix(y, preds[i], labels=np.arange(c)))
        for k in range(g):
            sel = groups == k
            expected = confusion_matrix(y[sel], preds[i, sel], labels=np.arange(c))
            np.testing.assert_array_equal(counts[i, k], expected)


def test_chunked_kernel_equals_single_block(monkeypatch):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 3000)
    pred = rng.integers(0, 5, (1, 3000))
    groups = rng.integers(0, 3, 3000)
    whole = confusion_counts(y, pred[0], 5, groups=groups)
    # one model split over 7 blocks of examples, each with private counts
    blocks, bad = kernels_mod.confusion_kernel(y, pred, groups, True, 3, 5, 7, 2, np.empty(3000, np.int32))
    assert not bad.any()
    assert blocks.shape == (7, 3, 5, 5) and (blocks.sum(axis=(1, 2, 3)) > 0).all()
    np.testing.assert_array_equal(blocks.sum(axis=0), whole)
    # a single big model is split over the threads, many models are not
    monkeypatch.setattr(kernels_mod.numba, "get_num_threads", lambda: 4)
    assert kernels_mod.chunk_count(1, 10**7, 8) == 4
    assert kernels_mod.chunk_count(8, 10**7, 8) == 1
    assert kernels_mod.chunk_count(1, 1000, 8) == 1


def test_accepts_lists_other_int_dtypes_and_integral_floats():
    a = confusion_counts(np.array([0, 1], np.uint8), np.array([1, 1], np.int32), 2)
    b = confusion_counts([0.0, 1.0], [1, 1], 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, [[0, 1], [0, 1]])


def test_empty_input_gives_zero_counts():
    np.testing.assert_array_equal(confusion_counts(np.array([], int), np.array([], int), 2), np.zeros((2, 2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(y_true=[0, 3], y_pred=[0, 1], n_classes=3),
         v.ERR_LABEL_RANGE.format(name="y_true", value=3, index=1, n=3, n_name="n_classes")),
        (dict(y_true=[0, 1], y_pred=[-1, 1], n_classes=3),
         v.ERR_LABEL_RANGE.format(name="y_pred", value=-1, index=0, n=3, n_name="n_classes")),
        (dict(y_true=[0, 1], y_pred=[0, 1, 1], n_classes=3),
         v.ERR_LENGTH.format(name="y_pred", got=3, expected=2)),
        (dict(y_true=[0.0, np.nan], y_pred=[0, 1], n_classes=3), v.ERR_NAN.format(name="y_true", index=1)),
        (dict(y_true=[0.5, 1], y_pred=[0, 1], n_classes=3),
         v.ERR_NOT_INTEGRAL.format(name="y_true", value=0.5, index=0)),
        (dict(y_true=["a", "b"], y_pred=[0, 1], n_classes=3), v.ERR_LABEL_DTYPE.format(name="y_true", dtype="<U1")),
        (dict(y_true=[0, 1], y_pred=[0, 1], n_classes=0), v.ERR_N_CLASSES.format(name="n_classes", value=0)),
        (dict(y_true=[[0, 1]], y_pred=[0, 1], n_classes=2),
         v.ERR_NDIM.format(name="y_true", expected="1 dimension", shape=(1, 2))),
        (dict(y_true=[0, 1], y_pred=[0, 1], n_classes=2, groups=[0, 5], n_groups=2),
         v.ERR_LABEL_RANGE.format(name="groups", value=5, index=1, n=2, n_name="n_groups")),
        (dict(y_true=[0, 1], y_pred=[0, 1], n_classes=2, n_groups=2), v.ERR_GROUPS_NEED_N),
    ],
)
def test_bad_input_raises_named_message(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        confusion_counts(**kwargs)


def test_class_rates_hand_computed():
    counts = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 2]])  # N = 7
    r = class_rates(counts)
    np.testing.assert_array_equal(r.tp, [1, 2, 2])
    np.testing.assert_array_equal(r.fp, [1, 1, 0])
    np.testing.assert_array_equal(r.fn, [1, 0, 1])
    np.testing.assert_array_equal(r.tn, [4, 4, 4])
    np.testing.assert_allclose(r.fpr, [1 / 5, 1 / 5, 0 / 4])
    np.testing.assert_allclose(r.fnr, [1 / 2, 0 / 2, 1 / 3])
    np.testing.assert_array_equal(r.support, [2, 2, 3])
    assert r.accuracy == pytest.approx(5 / 7)
    np.testing.assert_allclose(r.recall, 1 - r.fnr)


def test_class_rates_smoothing_and_perfect_model():
    counts = np.diag([3, 2])  # a perfect model: all rates 0
    r = class_rates(counts)
    np.testing.assert_array_equal(r.fpr, [0, 0])
    s = class_rates(counts, smoothing=1.0)
    np.testing.assert_allclose(s.fpr, [1 / 4, 1 / 5])  # (0+1)/(0+2+2), (0+1)/(0+3+2)
    np.testing.assert_allclose(s.fnr, [1 / 5, 1 / 4])
    assert s.smoothing == 1.0


def test_class_rates_agrees_with_sklearn_multilabel_confusion_matrix():
    from sklearn.metrics import multilabel_confusion_matrix

    rng = np.random.default_rng(9)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
    r = class_rates(confusion_counts(y, p, 6))
    mcm = multilabel_confusion_matrix(y, p, labels=np.arange(6))  # [[tn, fp], [fn, tp]]
    np.testing.assert_array_equal(r.tn, mcm[:, 0, 0])
    np.testing.assert_array_equal(r.fp, mcm[:, 0, 1])
    np.testing.assert_array_equal(r.fn, mcm[:, 1, 0])
    np.testing.assert_array_equal(r.tp, mcm[:, 1, 1])


def test_class_rates_rejects_bad_counts():
    with pytest.raises(ValueError, match=re.escape(confusion_mod.ERR_COUNTS_SHAPE.format(shape=(2, 3)))):
        class_rates(np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=re.escape(confusion_mod.ERR_COUNTS_NEGATIVE.format(value=-1, index=(0, 1)))):
        class_rates([[1, -1], [0, 1]])
    with pytest.raises(ValueError, match=re.escape(v.ERR_NEGATIVE.format(name="smoothing", value=-1))):
        class_rates(np.eye(2, dtype=int), smoothing=-1)


def test_population_rates_equals_class_rates_of_counts():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 5, 400)
    preds = rng.integers(0, 5, (4, 400))
    groups = rng.integers(0, 3, 400)
    for kw in ({}, {"groups": groups}):
        fast = population_rates(y, preds, 5, smoothing=0.5, **kw)
        slow = class_rates(confusion_counts(y, preds, 5, **kw), smoothing=0.5)
        for f in ("tp", "fp", "fn", "tn", "fpr", "fnr"):
            np.testing.assert_array_equal(getattr(fast, f), getattr(slow, f))

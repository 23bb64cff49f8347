"""The single-pass counting kernels (issue 16, item 4) against numpy ``bincount`` references.

Confusion counts, modal labels, CIE numerators and the bootstrap recounts
must be *identical* to a plain numpy computation over the combined index
(``np.bincount((g * C + y) * C + p)`` per model; ``np.bincount(i * C + p)``
for the votes of each example), for every integer dtype, memory layout,
thread split and edge case, and the range checks folded into the counting
pass must raise the validators' messages for the first bad value. Speed is
measured by ``benchmarks/metrics.py``, never here.
"""

import re

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compbias.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    cie_scores,
    confusion_counts,
    modal_labels,
    pie_mask,
)
from compbias.metrics import _confusion_kernels as kernels_mod
from compbias.metrics import _numba as numba_mod
from compbias.metrics import _resampling as resampling_mod
from compbias.metrics import _validation as v
from compbias.metrics import _vote_kernels as votes_mod

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]
LAYOUTS = ["c", "strided", "fortran"]


# --------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------
def ref_confusion(y, preds, n_classes, groups=None, n_groups=1):
    y = np.asarray(y, np.int64)
    preds = np.atleast_2d(np.asarray(preds, np.int64))
    g = np.zeros_like(y) if groups is None else np.asarray(groups, np.int64)
    key = (g * n_classes + y) * n_classes
    size = n_groups * n_classes * n_classes
    counts = [np.bincount(key + p, minlength=size) for p in preds]
    return np.stack(counts).reshape(preds.shape[0], n_groups, n_classes, n_classes)


def ref_votes(preds, n_classes):
    preds = np.asarray(preds, np.int64)
    n = preds.shape[1]
    flat = (preds + n_classes * np.arange(n)).ravel()
    return np.bincount(flat, minlength=n * n_classes).reshape(n, n_classes)


def ref_modal(preds, n_classes):
    votes = ref_votes(preds, n_classes)
    return n_classes - 1 - np.argmax(votes[:, ::-1], axis=1)  # ties to the largest class


def ref_cie_numerator(base, comp, n_classes):
    m1, m2 = base.shape[0], comp.shape[0]
    return np.abs(ref_votes(base, n_classes) * m2 - ref_votes(comp, n_classes) * m1).sum(axis=1)


def laid_out(arr, layout):
    """The same values as a C-contiguous, a strided (every other column) or a Fortran-ordered array."""
    if layout == "strided":
        wide = np.repeat(arr, 2, axis=-1)
        out = wide[..., ::2]
        assert not out.flags.c_contiguous or arr.shape[-1] <= 1
        return out
    if layout == "fortran":
        return np.asfortranarray(arr)
    return np.ascontiguousarray(arr)


@pytest.fixture(params=["one thread", "split over threads"])
def split(request, monkeypatch):
    """Run the public functions unsplit, or with every input split over blocks and threads."""
    if request.param == "split over threads":
        monkeypatch.setattr(numba_mod, "PARALLEL_MIN_LABELS", 0)
        monkeypatch.setattr(kernels_mod, "PARALLEL_MIN_LABELS", 0)
        monkeypatch.setattr(kernels_mod, "_MIN_CHUNK", 3)
        previous = numba.get_num_threads()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        yield request.param
        numba.set_num_threads(previous)
    else:
        yield request.param


# --------------------------------------------------------------------------
# exact agreement on random inputs
# --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_confusion_counts_equal_bincount(data):
    n = data.draw(st.integers(1, 200), label="examples")
    n_classes = data.draw(st.integers(1, 11), label="classes")
    n_models = data.draw(st.integers(1, 4), label="models")
    n_groups = data.draw(st.integers(1, 4), label="groups")
    empty = data.draw(st.integers(0, 2), label="extra empty groups")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    y = rng.integers(0, n_classes, n)
    preds = rng.integers(0, n_classes, (n_models, n))
    groups = rng.integers(0, n_groups, n)
    expected = ref_confusion(y, preds, n_classes, groups, n_groups + empty)
    got = confusion_counts(laid_out(y.astype(dtype), layout), laid_out(preds.astype(dtype), layout),
                           n_classes, groups=laid_out(groups.astype(dtype), layout),
                           n_groups=n_groups + empty)
    assert got.dtype == np.int64 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(confusion_counts(y, preds[0].astype(dtype), n_classes),
                                  expected[0].sum(axis=0))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_modal_labels_and_cie_equal_bincount(data):
    n = data.draw(st.integers(1, 300), label="examples")
    n_classes = data.draw(st.sampled_from([1, 2, 3, 5, 40, 300]), label="classes")
    m1 = data.draw(st.integers(1, 7), label="baseline models")
    m2 = data.draw(st.integers(1, 7), label="compressed models")
    dtype = data.draw(st.sampled_from([d for d in DTYPES if np.iinfo(d).max >= n_classes]), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    few = min(n_classes, data.draw(st.sampled_from([2, 4, n_classes]), label="classes voted"))  # ties
    base = rng.integers(0, few, (m1, n))
    comp = rng.integers(0, few, (m2, n))
    b, c = laid_out(base.astype(dtype), layout), laid_out(comp.astype(dtype), layout)
    np.testing.assert_array_equal(modal_labels(b, n_classes), ref_modal(base, n_classes))
    np.testing.assert_array_equal(pie_mask(b, c, n_classes),
                                  ref_modal(base, n_classes) != ref_modal(comp, n_classes))
    scores = cie_scores(b, c, n_classes)
    np.testing.assert_array_equal(scores, ref_cie_numerator(base, comp, n_classes) / float(m1 * m2))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 7])
@pytest.mark.parametrize("n_chunks", [1, 2, 5])
def test_confusion_kernel_any_split_of_blocks_and_threads(n_threads, n_chunks, parallel):
    run = kernels_mod.confusion_kernel_parallel if parallel else kernels_mod.confusion_kernel
    rng = np.random.default_rng(n_threads * 10 + n_chunks)
    n, n_classes, n_groups = 257, 6, 3
    y = rng.integers(0, n_classes, n)
    preds = rng.integers(0, n_classes, (3, n)).astype(np.int16)
    groups = rng.integers(0, n_groups, n)
    blocks, bad = run(y, preds, groups, True, n_groups, n_classes, n_chunks, n_threads, np.empty(n, np.int32))
    assert not bad.any()
    counts = blocks.reshape(3, n_chunks, n_groups, n_classes, n_classes).sum(axis=1)
    np.testing.assert_array_equal(counts, ref_confusion(y, preds, n_classes, groups, n_groups))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n_classes", [3, 1000])  # blocks of 256 and of 8 examples
def test_vote_kernels_any_split_over_threads(n_threads, n_classes, parallel):
    run = votes_mod.votes_kernel_parallel if parallel else votes_mod.votes_kernel
    rng = np.random.default_rng(n_threads + n_classes)
    n = 1_031  # not a multiple of any block
    base = rng.integers(0, min(n_classes, 5), (5, n)).astype(np.int32)
    comp = rng.integers(0, min(n_classes, 5), (4, n)).astype(np.int64)
    labels, bad = run(base, base, n_classes, False, n_threads)
    assert not bad
    np.testing.assert_array_equal(labels, ref_modal(base, n_classes))
    num, bad = run(base, comp, n_classes, True, n_threads)
    assert not bad
    np.testing.assert_array_equal(num, ref_cie_numerator(base, comp, n_classes))


def test_public_functions_split_over_threads_equal_bincount(split):
    rng = np.random.default_rng(11)
    n, n_classes, n_groups = 2_000, 7, 3
    y = rng.integers(0, n_classes, n)
    groups = rng.integers(0, n_groups, n)
    preds = rng.integers(0, n_classes, (3, n)).astype(np.int8)
    np.testing.assert_array_equal(confusion_counts(y, preds, n_classes, groups=groups),
                                  ref_confusion(y, preds, n_classes, groups, n_groups))
    np.testing.assert_array_equal(confusion_counts(y, preds[1], n_classes, groups=groups),
                                  ref_confusion(y, preds[1], n_classes, groups, n_groups)[0])
    np.testing.assert_array_equal(modal_labels(preds, n_classes), ref_modal(preds, n_classes))
    np.testing.assert_array_equal(cie_scores(preds, preds[::-1][:2], n_classes),
                                  ref_cie_numerator(preds, preds[::-1][:2], n_classes) / 6.0)


# --------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_example_one_class(dtype):
    one = np.zeros(1, dtype)
    np.testing.assert_array_equal(confusion_counts(one, one, 1), [[1]])
    np.testing.assert_array_equal(confusion_counts(one, one[None], 1, groups=[0], n_groups=3),
                                  [[[[1]], [[0]], [[0]]]])
    np.testing.assert_array_equal(modal_labels(one[None], 1), [0])
    np.testing.assert_array_equal(cie_scores(one[None], one[None], 1), [0.0])


def test_empty_groups_and_absent_classes_are_zero_in_every_model():
    y = np.array([0, 2, 2, 0])
    preds = np.array([[0, 2, 1, 0], [2, 2, 2, 2]], np.int16)
    counts = confusion_counts(y, preds, 5, groups=np.array([1, 1, 3, 3]), n_groups=5)
    assert counts.shape == (2, 5, 5, 5)
    assert counts[:, [0, 2, 4]].sum() == 0  # empty groups
    assert counts[..., 3, :].sum() == 0 and counts[..., 4].sum() == 0  # classes nobody has or predicts
    np.testing.assert_array_equal(counts, ref_confusion(y, preds, 5, [1, 1, 3, 3], 5))


def test_booleans_and_integral_floats_count_like_ints():
    y = np.array([0, 1, 1, 0])
    preds = np.array([[False, True, False, False]])
    np.testing.assert_array_equal(confusion_counts(y, preds, 2), ref_confusion(y, preds.astype(int), 2)[:, 0])
    np.testing.assert_array_equal(confusion_counts(y.astype(float), preds.astype(float), 2),
                                  ref_confusion(y, preds.astype(int), 2)[:, 0])
    np.testing.assert_array_equal(modal_labels(np.array([[True], [True], [False]]), 2), [1])


def test_byte_swapped_input_is_read_by_value():
    y = np.array([0, 1, 2], dtype=">i4")
    preds = np.array([[0, 2, 2]], dtype=">i2")
    np.testing.assert_array_equal(confusion_counts(y, preds, 3), ref_confusion([0, 1, 2], [[0, 2, 2]], 3)[:, 0])
    np.testing.assert_array_equal(modal_labels(preds, 3), [0, 2, 2])


def test_inputs_are_not_modified():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 50)
    preds = rng.integers(0, 4, (3, 50)).astype(np.int8)
    before = preds.copy(), y.copy()
    confusion_counts(y, preds, 4)
    modal_labels(preds, 4)
    cie_scores(preds, preds[:1], 4)
    np.testing.assert_array_equal(preds, before[0])
    np.testing.assert_array_equal(y, before[1])


# --------------------------------------------------------------------------
# range checks folded into the counting pass
# --------------------------------------------------------------------------
def _range_message(name, value, index, n, n_name="n_classes"):
    return re.escape(v.ERR_LABEL_RANGE.format(name=name, value=value, index=index, n=n, n_name=n_name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_bad_prediction_is_reported_for_every_dtype(dtype, split):
    n_classes = 3
    preds = np.zeros((2, 600), dtype)
    bad_value = -1 if np.issubdtype(dtype, np.signedinteger) else 200
    preds[1, 400] = bad_value
    preds[1, 500] = 3  # a later bad value is not the one reported
    y = np.zeros(600, np.int64)
    with pytest.raises(ValueError, match=_range_message("y_pred", bad_value, (1, 400), n_classes)):
        confusion_counts(y, preds, n_classes)
    with pytest.raises(ValueError, match=_range_message("y_pred", bad_value, 400, n_classes)):
        confusion_counts(y, preds[1], n_classes)
    with pytest.raises(ValueError, match=_range_message("preds", bad_value, (1, 400), n_classes)):
        modal_labels(preds, n_classes)
    with pytest.raises(ValueError, match=_range_message("comp_preds", bad_value, (1, 400), n_classes)):
        cie_scores(np.zeros((1, 600), dtype), preds, n_classes)
    with pytest.raises(ValueError, match=_range_message("base_preds", bad_value, (1, 400), n_classes)):
        cie_scores(preds, preds, n_classes)  # the baseline is checked first
    with pytest.raises(ValueError, match=_range_message("comp_preds", bad_value, (1, 400), n_classes)):
        pie_mask(np.zeros((1, 600), dtype), preds, n_classes)


def test_true_labels_and_groups_are_checked_in_the_counting_pass(split):
    y = np.zeros(500, np.int64)
    preds = np.zeros((2, 500), np.int8)
    groups = np.zeros(500, np.int64)
    groups[300] = 4
    with pytest.raises(ValueError, match=_range_message("groups", 4, 300, 2, "n_groups")):
        confusion_counts(y, preds, 3, groups=groups, n_groups=2)
    groups[10] = -2
    with pytest.raises(ValueError, match=_range_message("groups", -2, 10, 5, "n_groups")):
        confusion_counts(y, preds, 3, groups=groups)  # n_groups inferred: max + 1
    y[250] = 7
    preds[0, 5] = 9
    # several bad inputs: y_true is reported first, then predictions, then groups, as before
    with pytest.raises(ValueError, match=_range_message("y_true", 7, 250, 3)):
        confusion_counts(y, preds, 3, groups=np.zeros(500, int) + 5, n_groups=2)
    y[250] = 0
    with pytest.raises(ValueError, match=_range_message("y_pred", 9, (0, 5), 3)):
        confusion_counts(y, preds, 3, groups=np.zeros(500, int) + 5, n_groups=2)


@pytest.mark.parametrize("n_groups, n_classes, dtype", [(2, 180, np.uint16), (2, 181, np.int32), (1, 256, np.int32)])
def test_every_key_width_counts_and_checks_like_bincount(n_groups, n_classes, dtype):
    """Row offsets up to 65,535 are uint16 (2 * 180 * 181 = 65,160), beyond that int32."""
    assert kernels_mod.key_dtype(n_groups, n_classes) == dtype
    rng = np.random.default_rng(n_classes)
    n = 3_000
    y = rng.integers(0, n_classes, n)
    groups = rng.integers(0, n_groups, n)
    preds = rng.integers(0, n_classes, (3, n)).astype(np.int16)
    np.testing.assert_array_equal(confusion_counts(y, preds, n_classes, groups=groups, n_groups=n_groups),
                                  ref_confusion(y, preds, n_classes, groups, n_groups))
    y[7] = n_classes  # the last row of the table: out of range, never counted
    with pytest.raises(ValueError, match=_range_message("y_true", n_classes, 7, n_classes)):
        confusion_counts(y, preds, n_classes, groups=groups, n_groups=n_groups)
    y[7] = 0
    groups[9] = -1
    with pytest.raises(ValueError, match=_range_message("groups", -1, 9, n_groups, "n_groups")):
        confusion_counts(y, preds, n_classes, groups=groups, n_groups=n_groups)


def test_blocks_longer_than_a_private_table_can_count_are_flushed_in_parts():
    """A thread's uint16 table is added to the int64 result every 65,535 examples: no count wraps."""
    n = 2 * kernels_mod._SUB_BLOCK + 1_000
    y = np.zeros(n, np.int64)
    y[::3] = 1
    preds = np.zeros((2, n), np.int8)
    preds[1, ::2] = 1
    counts = confusion_counts(y, preds, 2)
    np.testing.assert_array_equal(counts, ref_confusion(y, preds, 2)[:, 0])
    assert counts[0, 0, 0] > kernels_mod._SUB_BLOCK  # one cell holds more than a uint16 can
    blocks, bad = kernels_mod.confusion_kernel(y, preds, np.empty(0, np.int64), False, 1, 2, 2, 1,
                                                np.empty(n, np.uint16))  # two slices per model, still > 65,535 each
    assert not bad.any()
    np.testing.assert_array_equal(blocks.reshape(2, 2, 2, 2).sum(axis=1), ref_confusion(y, preds, 2)[:, 0])


def test_key_width_limits():
    assert kernels_mod.key_dtype(1, 1) == np.uint16
    assert kernels_mod.key_dtype(1, 46_340) == np.int32  # 46,340 * 46,341 < 2**31
    assert kernels_mod.key_dtype(1, 46_341) == np.int64


def test_range_checks_of_huge_unsigned_values():
    preds = np.array([[0, 2**63 + 5]], np.uint64)
    with pytest.raises(ValueError, match=_range_message("y_pred", 2**63 + 5, (0, 1), 2)):
        confusion_counts([0, 1], preds, 2)
    with pytest.raises(ValueError, match=_range_message("preds", 2**63 + 5, (0, 1), 2)):
        modal_labels(preds, 2)


# --------------------------------------------------------------------------
# bootstrap recounts
# --------------------------------------------------------------------------
def ref_resampled_counts(y, preds, groups, n_groups, n_classes, indices):
    """TP, predicted and true counts per resample with numpy bincount over (group, class)."""
    y = np.asarray(y, np.int64)
    g = np.zeros_like(y) if groups is None else np.asarray(groups, np.int64)
    n = y.shape[0]
    size = n_groups * n_classes
    tp, pc, tc = [], [], []
    for idx in indices:
        w = np.bincount(idx, minlength=n)
        tc.append(np.bincount(g * n_classes + y, weights=w, minlength=size))
        pc.append([np.bincount(g * n_classes + p, weights=w, minlength=size) for p in preds])
        tp.append([np.bincount(g * n_classes + p, weights=w * (p == y), minlength=size) for p in preds])
    shape = (len(indices), preds.shape[0], n_groups, n_classes)
    as_int = lambda a, s: np.rint(np.asarray(a)).astype(np.int64).reshape(s)  # noqa: E731
    return as_int(tp, shape), as_int(pc, shape), as_int(tc, (len(indices), n_groups, n_classes))


@pytest.mark.parametrize("with_groups", [False, True])
def test_bootstrap_recounts_equal_bincount_of_the_resample(with_groups):
    rng = np.random.default_rng(5)
    n, n_classes, n_groups, seed = 300, 6, 3, 17
    y = rng.integers(0, n_classes, n)
    preds = np.where(rng.random((4, n)) < 0.6, y, rng.integers(0, n_classes, (4, n))).astype(np.int16)
    groups = rng.integers(0, n_groups, n) if with_groups else np.empty(0, np.int64)
    g_n = n_groups if with_groups else 1
    first, count = 3, 5
    tp, pc, tc = resampling_mod.ovr_resampled_kernel(y, preds, groups, with_groups, g_n, n_classes, seed,
                                                 first, count)
    indices = bootstrap_indices(n, first + count, seed=seed)[first:]
    ref = ref_resampled_counts(y, preds, groups if with_groups else None, g_n, n_classes, indices)
    for got, expected in zip((tp, pc, tc), ref):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_bootstrap_cev_samples_equal_numpy_recount(dtype):
    rng = np.random.default_rng(8)
    n, n_classes, b = 400, 5, 6
    y = rng.integers(0, n_classes, n)
    base = np.where(rng.random((3, n)) < 0.8, y, rng.integers(0, n_classes, (3, n)))
    comp = np.where(rng.random((4, n)) < 0.6, y, rng.integers(0, n_classes, (4, n)))
    res = bootstrap_ci(y.astype(dtype), base.astype(dtype), comp.astype(dtype), n_classes,
                       n_resamples=b, seed=2)
    indices = bootstrap_indices(n, b, seed=2)
    expected = []
    for idx in indices[:, None]:
        rates = []
        for preds in (base, comp):
            tp, pc, tc = ref_resampled_counts(y, preds, None, 1, n_classes, idx)
            tp, pc, tc = tp[0, :, 0], pc[0, :, 0], tc[0, 0]
            fp, fn = pc - tp, tc - tp
            tn = n - tp - fp - fn
            with np.errstate(invalid="ignore", divide="ignore"):
                rates.append(((fp / (fp + tn)).mean(0), (fn / (fn + tp)).mean(0)))
        (bf, bn), (cf, cn) = rates
        with np.errstate(invalid="ignore", divide="ignore"):
            d1 = np.where(bf != 0, (cf - bf) * 100 / bf, np.nan)
            d2 = np.where(bn != 0, (cn - bn) * 100 / bn, np.nan)
        ok = ~np.isnan(d1) & ~np.isnan(d2)
        expected.append((np.var(d1[ok]) + np.var(d2[ok])) / 2 if ok.any() else np.nan)
    np.testing.assert_allclose(res.samples, expected, rtol=1e-9, atol=0)

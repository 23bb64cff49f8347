"""modal_labels, pie_mask, cie_scores, cie_mask."""

import re

import numpy as np
import pandas as pd
import pytest

import compbias.metrics as metrics
from compbias.metrics import cie_mask, cie_scores, modal_labels, pie_mask
from compbias.metrics import exemplars as ex_mod
from compbias.metrics import _validation as v


def test_modal_labels_hand_computed_with_ties_to_largest_class():
    preds = np.array([[0, 3, 2, 1],
                      [0, 1, 2, 2],
                      [1, 1, 0, 1],
                      [1, 3, 0, 2]])
    # ex0: 0 x2, 1 x2 -> 1 ; ex1: 3 x2, 1 x2 -> 3 ; ex2: 2 x2, 0 x2 -> 2 ; ex3: 1 x2, 2 x2 -> 2
    np.testing.assert_array_equal(modal_labels(preds, 4), [1, 3, 2, 2])
    np.testing.assert_array_equal(modal_labels([[5, 0, 1]], 6), [5, 0, 1])  # a single model


def test_modal_labels_match_pandas_mode_max():
    rng = np.random.default_rng(2)
    preds = rng.integers(0, 5, (6, 400))  # small populations: many ties
    long = pd.DataFrame({"example": np.tile(np.arange(400), 6), "pred": preds.ravel()})
    expected = long.groupby("example")["pred"].agg(lambda s: s.mode().max()).to_numpy()
    np.testing.assert_array_equal(modal_labels(preds, 5), expected)


def test_pie_mask_hand_computed():
    base = [[0, 1, 2], [0, 1, 2], [1, 0, 2]]
    comp = [[0, 2, 1], [1, 2, 1], [1, 0, 2]]
    # base modal 0, 1, 2 ; comp modal 1, 2, 1
    np.testing.assert_array_equal(pie_mask(base, comp, 3), [True, True, True])
    np.testing.assert_array_equal(pie_mask(base, base, 3), [False, False, False])


def test_cie_scores_hand_computed_with_different_population_sizes():
    base = np.array([[0, 1], [0, 1]])  # M = 2
    comp = np.array([[0, 1], [1, 1], [2, 1]])  # M' = 3
    # ex0: base {0: 1}, comp {0: 1/3, 1: 1/3, 2: 1/3} -> 2/3 + 1/3 + 1/3 = 4/3
    np.testing.assert_allclose(cie_scores(base, comp, 3), [4 / 3, 0.0], rtol=0, atol=1e-15)


def test_cie_scores_equal_the_fraction_formula_and_are_bounded():
    rng = np.random.default_rng(4)
    base = rng.integers(0, 6, (5, 300))
    comp = rng.integers(0, 6, (7, 300))
    fb = np.stack([(base == c).mean(0) for c in range(6)])
    fc = np.stack([(comp == c).mean(0) for c in range(6)])
    expected = np.abs(fb - fc).sum(0)
    got = cie_scores(base, comp, 6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert (got >= 0).all() and (got <= 2).all()


def test_cie_mask_exact_size_and_ties_by_example_order():
    scores = np.array([0.5, 1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(cie_mask(scores, top_fraction=0.4), [False, True, True, False, False])
    np.testing.assert_array_equal(cie_mask(scores, top_fraction=0.2), [False, True, False, False, False])
    # ceil(0.07 * 100) is 7 even though 0.07 * 100 == 7.000000000000001 in floating point
    assert cie_mask(np.zeros(100), top_fraction=0.07).sum() == 7
    assert cie_mask(np.zeros(101), top_fraction=0.01).sum() == 2  # ceil(1.01)
    assert cie_mask(np.zeros(10), top_fraction=1.0).all()
    np.testing.assert_array_equal(cie_mask(np.zeros(10), top_fraction=0.1), [True] + [False] * 9)


def test_bad_inputs():
    with pytest.raises(ValueError, match=re.escape(ex_mod.ERR_EXAMPLES_MISMATCH.format(n1=2, n2=3))):
        cie_scores([[0, 1]], [[0, 1, 1]], 2)
    with pytest.raises(ValueError, match=re.escape(ex_mod.ERR_POPULATION.format(name="preds", shape=(0, 3)))):
        modal_labels(np.zeros((0, 3), int), 2)
    with pytest.raises(ValueError, match=re.escape(v.ERR_LABEL_RANGE.format(
            name="comp_preds", value=2, index=(0, 1), n=2, n_name="n_classes"))):
        pie_mask([[0, 1]], [[0, 2]], 2)
    with pytest.raises(ValueError, match=re.escape(v.ERR_FRACTION.format(name="top_fraction", interval="(0, 1]", value=0))):
        cie_mask([0.1, 0.2], top_fraction=0)
    with pytest.raises(ValueError, match=re.escape(v.ERR_NAN.format(name="scores", index=1))):
        cie_mask([0.1, np.nan])


# -- the cut of the CIE set and ties there --------------------------------------------------------


def test_cie_cut_names_the_score_at_the_cut_and_the_tied_block():
    # 5 vs 5 binary voters give 6 score values: the cut of the top 30% of 10 examples falls inside a block of 0.4s
    scores = [0.0, 0.4, 1.2, 0.4, 0.0, 0.4, 2.0, 0.4, 0.0, 0.0]
    c = metrics.cie_cut(scores, top_fraction=0.3)
    assert (c.k, c.score_at_cut, c.n_above, c.tied_block, c.taken_from_block) == (3, 0.4, 2, 4, 1)
    assert c.ambiguous
    clean = metrics.cie_cut(scores, top_fraction=0.2)  # the top two are unique: no tie-break involved
    assert (clean.k, clean.score_at_cut, clean.n_above, clean.tied_block, clean.ambiguous) == (2, 1.2, 1, 1, False)


def test_random_tie_break_draws_only_inside_the_tied_block_and_is_seeded():
    scores = np.array([0.0, 0.4, 1.2, 0.4, 0.0, 0.4, 2.0, 0.4, 0.0, 0.0])
    order = metrics.cie_mask(scores, 0.3)
    assert np.flatnonzero(order).tolist() == [1, 2, 6]  # the earliest tied example
    drawn = {tuple(np.flatnonzero(metrics.cie_mask(scores, 0.3, tie_break="random", seed=s))) for s in range(40)}
    assert all(len(m) == 3 and {2, 6} <= set(m) and len(set(m) & {1, 3, 5, 7}) == 1 for m in drawn)
    assert len(drawn) == 4  # every member of the block can be drawn
    a = metrics.cie_mask(scores, 0.3, tie_break="random", seed=5)
    assert np.array_equal(a, metrics.cie_mask(scores, 0.3, tie_break="random", seed=5))
    with pytest.raises(ValueError, match="needs a seed"):
        metrics.cie_mask(scores, 0.3, tie_break="random")
    with pytest.raises(ValueError, match="tie_break"):
        metrics.cie_mask(scores, 0.3, tie_break="first")


def test_unanimous_pie_hand_computed():
    base = [[0, 1, 2, 1], [0, 1, 1, 1]]
    comp = [[1, 1, 2, 2], [2, 0, 1, 1]]
    # modal: base modal [0, 1, 2 (tie 1/2 -> largest), 1]; comp modal [2 (tie 1/2), 1 (tie 0/1), 2 (tie), 2 (tie 1/2)]
    assert pie_mask(base, comp, 3).tolist() == [True, False, False, True]
    # unanimous, each with its own teacher: ex 0 both differ; ex 1 model 0 agrees; ex 2 model 0 agrees (2 == 2)
    assert pie_mask(base, comp, 3, definition="unanimous", pairs=[0, 1]).tolist() == [True, False, False, False]
    # crossed lineage changes the answer: example 2 now differs for both models (2 vs 1, 1 vs 2)
    assert pie_mask(base, comp, 3, definition="unanimous", pairs=[1, 0]).tolist() == [True, False, True, False]
    # without lineage: against the baseline modal label [0, 1, 2, 1]
    assert pie_mask(base, comp, 3, definition="unanimous").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="definition"):
        pie_mask(base, comp, 3, definition="any")
    with pytest.raises(ValueError, match="row of its baseline"):
        pie_mask(base, comp, 3, definition="unanimous", pairs=[0, 5])

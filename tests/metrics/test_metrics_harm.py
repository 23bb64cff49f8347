"""excess_harm and paired_error_changes: hand-computed values, estimability, and interval coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from compbias.metrics import change_difference, excess_harm, paired_error_changes


def test_paired_changes_against_the_own_baseline_and_without_lineage():
    y = [0, 0, 0, 1, 1, 1]
    base = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]  # baseline 1 is wrong on example 3
    comp = [[1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1]]
    d = paired_error_changes(y, base, comp, pairs=[0, 1])
    assert d.tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 0, -1, 0, 0]]
    # crossed pairs: each compressed model against the other baseline
    assert paired_error_changes(y, base, comp, pairs=[1, 0]).tolist() == [[1, 1, 0, -1, 0, 0], [1, 0, 0, 0, 0, 0]]
    # no lineage: against the baseline population's mean error per example (0.5 on example 3)
    assert paired_error_changes(y, base, comp).tolist() == [[1, 1, 0, -0.5, 0, 0], [1, 0, 0, -0.5, 0, 0]]
    with pytest.raises(ValueError, match="row of its baseline"):
        paired_error_changes(y, base, comp, pairs=[0, 2])


def test_excess_harm_hand_computed():
    # pair 1: D_class0 = 2/3, D_class1 = 0, D = 1/3; pair 2: 1/3, -1/3, 0 (see the test above)
    d = [[1, 1, 0, 0, 0, 0], [1, 0, 0, -1, 0, 0]]
    cells = [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    r = excess_harm(d, cells, min_count=3, n_resamples=0)
    assert r.cell_change == pytest.approx([50.0, -100 / 6])
    assert r.overall_change == pytest.approx(100 / 6)
    assert r.excess == pytest.approx([100 / 3, -100 / 3])
    assert r.n.tolist() == [3, 3] and r.estimable.all() and r.n_pairs == 2
    assert np.isnan(r.ci_low).all() and np.isnan(r.ci_high).all()  # no resamples, no interval


def test_a_cell_below_the_minimum_count_is_not_estimable():
    d = np.zeros((2, 30))
    d[:, :7] = 1  # the 7 examples of the small cell all became wrong
    cells = np.zeros((2, 30), bool)
    cells[0, :7] = True
    cells[1, 7:] = True
    r = excess_harm(d, cells, min_count=10, n_resamples=200)
    assert r.estimable.tolist() == [False, True] and r.n.tolist() == [7, 23]
    assert np.isnan(r.excess[0]) and np.isnan(r.ci_low[0]) and np.isnan(r.ci_high[0])  # never a number with a degenerate interval
    assert r.cell_change[0] == pytest.approx(100.0)  # the raw change is still reported
    assert r.ci_low[1] <= r.excess[1] <= r.ci_high[1]


def test_intervals_are_seeded_and_contain_the_estimate():
    rng = np.random.default_rng(3)
    d = (rng.random((4, 300)) < 0.1).astype(float)
    cells = np.stack([np.arange(300) < 100, np.arange(300) >= 100])
    a = excess_harm(d, cells, n_resamples=300, seed=7)
    b = excess_harm(d, cells, n_resamples=300, seed=7)
    assert np.array_equal(a.ci_low, b.ci_low) and np.array_equal(a.ci_high, b.ci_high)
    assert ((a.ci_low <= a.excess) & (a.excess <= a.ci_high)).all()
    with pytest.raises(ValueError, match="share N"):
        excess_harm(d, cells[:, :10])


def test_two_level_intervals_cover_the_truth_when_models_vary_from_seed_to_seed():
    """400 simulated studies of 5 seeds: 95% two-level intervals cover the true excess harm 93-97% of the time.

    Each study draws a fresh test set of 400 examples (30% in the cell) and 5
    compressed models whose flip probabilities vary from seed to seed
    (cell: 0.10 + N(0, 0.04); elsewhere: 0.05 + N(0, 0.02), clipped to
    [0, 1]). The truth is the expectation over seeds and test sets,
    (1 - f)(E[p_cell] - E[p_rest]), computed by Monte Carlo. Intervals that
    resample test examples only (the models fixed) describe these five
    models, not the procedure, and under-cover (about 70% here).
    """
    rng = np.random.default_rng(1)
    f, mu_c, mu_r, sd_c, sd_r = 0.3, 0.10, 0.05, 0.04, 0.02
    draws = rng.standard_normal(2_000_000)
    truth = (1 - f) * (np.clip(mu_c + sd_c * draws, 0, 1).mean() - np.clip(mu_r + sd_r * draws, 0, 1).mean()) * 100
    seeds, n, studies = 5, 400, 400
    covered = {"two-level": 0, "examples only": 0}
    for k in range(studies):
        cell = rng.random(n) < f
        p_c = np.clip(mu_c + sd_c * rng.standard_normal(seeds), 0, 1)
        p_r = np.clip(mu_r + sd_r * rng.standard_normal(seeds), 0, 1)
        d = (rng.random((seeds, n)) < np.where(cell, p_c[:, None], p_r[:, None])).astype(float)
        for name, both in (("two-level", True), ("examples only", False)):
            r = excess_harm(d, cell[None, :], n_resamples=400, seed=k, resample_pairs=both)
            covered[name] += bool(r.ci_low[0] <= truth <= r.ci_high[0])
    coverage = {k: v / studies for k, v in covered.items()}
    print(f"coverage of 95% intervals over {studies} studies (truth {truth:.2f} pp): {coverage}")
    assert 0.93 <= coverage["two-level"] <= 0.97, coverage
    assert coverage["examples only"] < 0.85, coverage


def test_change_difference_hand_computed():
    """Two pairs, four examples; A = {0, 1}, B = {2, 3}.

    Pair 1: d = (1, 0, 0, -1): A's change +50 pp, B's -50 pp. Pair 2: all 0.
    Means over pairs: A +25 pp, B -25 pp, difference +50 pp.
    """
    d = [[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]
    r = change_difference(d, [True, True, False, False], [False, False, True, True], n_resamples=0)
    assert (r.change_a, r.change_b, r.difference) == (25.0, -25.0, 50.0)
    assert (r.n_a, r.n_b, r.n_pairs) == (2, 2, 2) and np.isnan(r.ci_low) and np.isnan(r.ci_high)


def test_change_difference_interval_is_seeded_contains_the_estimate_and_widens_with_seed_variation():
    rng = np.random.default_rng(3)
    n = 600
    a = rng.random(n) < 0.5
    d_same = (rng.random((5, n)) < np.where(a, 0.10, 0.04)).astype(float)
    r1 = change_difference(d_same, a, ~a, n_resamples=300, seed=7)
    r2 = change_difference(d_same, a, ~a, n_resamples=300, seed=7)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)
    assert r1.ci_low <= r1.difference <= r1.ci_high and r1.ci_low > 0
    examples_only = change_difference(d_same, a, ~a, n_resamples=300, seed=7, resample_pairs=False)
    assert examples_only.difference == r1.difference
    # models that disagree from seed to seed: the two-level interval is wider than the example-only one
    p = np.clip(0.07 + 0.06 * rng.standard_normal(5), 0, 1)
    d_vary = (rng.random((5, n)) < np.where(a, p[:, None], 0.04)).astype(float)
    wide = change_difference(d_vary, a, ~a, n_resamples=300, seed=1)
    narrow = change_difference(d_vary, a, ~a, n_resamples=300, seed=1, resample_pairs=False)
    assert wide.ci_high - wide.ci_low > narrow.ci_high - narrow.ci_low


def test_change_difference_rejects_an_empty_cell_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least one example"):
        change_difference([[0.0, 1.0]], [False, False], [True, True])
    with pytest.raises(ValueError, match="share N"):
        change_difference([[0.0, 1.0]], [True], [False, True])

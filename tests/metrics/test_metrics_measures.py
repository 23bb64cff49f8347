"""recall_intensification, worst_group_accuracy_change, vote_margin, margin_auroc: hand-computed values and a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from compbias.metrics import margin_auroc, recall_intensification, vote_margin, worst_group_accuracy_change


def test_intensification_hand_computed():
    # mean baseline recall 0.8: classes 0 and 1 below it (-50%, -10%), classes 2 and 3 above (-5%, 0%)
    r = recall_intensification([0.6, 0.7, 1.0, 0.9], [0.3, 0.63, 0.95, 0.9])
    assert (r.n_below, r.n_above) == (2, 2)
    assert r.below == pytest.approx(-30.0) and r.above == pytest.approx(-2.5)
    assert r.intensification == pytest.approx(-27.5)  # the weaker classes lose relatively more


def test_intensification_leaves_out_undefined_classes_and_says_when_it_cannot():
    r = recall_intensification([0.0, np.nan, 0.5, 1.0], [0.2, 0.5, 0.25, 1.0])  # only classes 2 and 3 count
    assert (r.n_below, r.n_above) == (1, 1) and r.intensification == pytest.approx(-50.0)
    equal = recall_intensification([0.8, 0.8], [0.4, 0.8])
    assert equal.n_below == 0 and math.isnan(equal.intensification)
    with pytest.raises(ValueError, match="at least two classes"):
        recall_intensification([0.0, 0.5], [0.1, 0.4])


def test_worst_group_accuracy_change_hand_computed():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    g = ["a", "a", "a", "a", "b", "b", "b", "c"]
    base = [0, 0, 0, 1, 1, 1, 0, 1]  # a: 3/4, b: 2/3, c: 1/1 -> worst b 0.667
    comp = [0, 0, 1, 1, 1, 1, 1, 0]  # a: 2/4, b: 3/3, c: 0/1 -> worst c 0.0
    wb, wc, change = worst_group_accuracy_change(y, base, comp, g)
    assert wb == pytest.approx(2 / 3) and wc == 0.0 and change == pytest.approx(-200 / 3)
    # the one-example group left out: the worst group is now a (0.5)
    wb, wc, change = worst_group_accuracy_change(y, base, comp, g, min_count=2)
    assert wb == pytest.approx(2 / 3) and wc == 0.5 and change == pytest.approx((0.5 - 2 / 3) * 100)


def test_vote_margin_and_its_auroc_against_sklearn():
    preds = np.array([[0, 1, 2, 1], [0, 1, 1, 1], [0, 2, 0, 1], [0, 2, 2, 0]])
    assert vote_margin(preds, 3).tolist() == [1.0, 0.0, 0.25, 0.5]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, size=(7, 500))
    margin = vote_margin(base, 4)
    members = (margin <= 0.15) ^ (rng.random(500) < 0.1)  # low margins, with 10% of labels flipped
    assert margin_auroc(margin, members) == pytest.approx(roc_auc_score(members, -margin))  # ties count one half
    assert margin_auroc(margin, members) > 0.7
    assert math.isnan(margin_auroc(margin, np.zeros(500, bool)))
    with pytest.raises(ValueError, match="n_classes"):
        vote_margin([[0, 5]], 3)


def test_cluster_bootstrap_correlation_resamples_whole_clusters():
    from compbias.metrics import pearson_cluster_ci

    rng = np.random.default_rng(0)
    # 5 seeds x 4 versions: a shared seed effect on both variables makes versions of one seed move together
    seed_effect = rng.normal(size=5)
    clusters = np.repeat(np.arange(5), 4)
    x = seed_effect[clusters] + 0.1 * rng.normal(size=20)
    y = seed_effect[clusters] + 0.1 * rng.normal(size=20)
    r = pearson_cluster_ci(x, y, clusters, n_resamples=500, seed=1)
    assert r.r == pytest.approx(np.corrcoef(x, y)[0, 1]) and (r.n_points, r.n_clusters) == (20, 5)
    assert r.ci_low <= r.r <= r.ci_high
    # the same 20 points taken as independent clusters give a narrower interval than 5 seeds do
    independent = pearson_cluster_ci(x, y, np.arange(20), n_resamples=500, seed=1)
    assert (independent.ci_high - independent.ci_low) < (r.ci_high - r.ci_low)
    two = pearson_cluster_ci(x[:8], y[:8], clusters[:8], n_resamples=100)
    assert math.isnan(two.ci_low) and math.isnan(two.ci_high)  # fewer than 3 clusters: no interval

"""group_rates: per-group and intersectional rates, fairlearn-style views."""

import re

import numpy as np
import pandas as pd
import pytest

from compbias.metrics import group_rates
from compbias.metrics import confusion as confusion_mod


@pytest.fixture
def celeba_like():
    # binary task (1 = blond); attributes sex and age
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    p = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    attrs = pd.DataFrame({"sex": ["f", "f", "f", "f", "m", "m", "m", "m"],
                          "young": [1, 1, 0, 0, 1, 1, 1, 1]})
    return y, p, attrs


def test_hand_computed_groups_and_intersections(celeba_like):
    y, p, attrs = celeba_like
    r = group_rates(y, p, attrs, 2, positive_class=1)
    t = r.table.set_index("group")
    assert list(t.index) == ["sex=f", "sex=m", "young=0", "young=1",
                             "sex=f&young=0", "sex=f&young=1", "sex=m&young=0", "sex=m&young=1"]
    # women: y 1 0 0 1, p 1 1 0 0 -> TP 1, FP 1, FN 1, TN 1
    assert t.loc["sex=f", ["tp", "fp", "fn", "tn", "size"]].tolist() == [1, 1, 1, 1, 4]
    assert t.loc["sex=f", "fpr"] == 0.5 and t.loc["sex=f", "fnr"] == 0.5
    # men: y 0 0 1 0, p 0 1 1 0 -> TP 1, FP 1, TN 2, FN 0
    assert t.loc["sex=m", "fpr"] == pytest.approx(1 / 3) and t.loc["sex=m", "fnr"] == 0.0
    # the empty intersection (old men) is kept with size 0 and NaN rates
    assert t.loc["sex=m&young=0", "size"] == 0
    assert np.isnan(t.loc["sex=m&young=0", "fpr"]) and np.isnan(t.loc["sex=m&young=0", "accuracy"])
    assert t.loc["sex=f&young=1", "accuracy"] == 0.5
    assert r.overall.fpr == pytest.approx(2 / 5) and r.overall.fnr == pytest.approx(1 / 3)
    assert r.overall_accuracy == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match=re.escape(confusion_mod.ERR_NO_CLASS_AXIS)):
        r.rates.accuracy  # one class selected: accuracy lives on GroupRates


def test_difference_and_ratio(celeba_like):
    y, p, attrs = celeba_like
    r = group_rates(y, p, attrs, 2, positive_class=1)
    assert r.groupings == ["sex", "young", "sex&young"]
    assert r.difference("fpr", grouping="sex") == pytest.approx(0.5 - 1 / 3)
    assert r.ratio("fpr", grouping="sex") == pytest.approx((1 / 3) / 0.5)
    assert r.difference("fpr", grouping="sex", method="to_overall") == pytest.approx(0.1)
    assert r.ratio("fpr", grouping="sex", method="to_overall") == pytest.approx(min(0.4 / 0.5, (1 / 3) / 0.4))
    # default grouping = the full intersection; NaN (empty) groups ignored
    vals = r.table.set_index("group").loc[["sex=f&young=0", "sex=f&young=1", "sex=m&young=1"], "fpr"]
    assert r.difference("fpr") == pytest.approx(np.nanmax(vals) - np.nanmin(vals))
    with pytest.raises(ValueError, match=re.escape(confusion_mod.ERR_METHOD.format(value="max"))):
        r.difference("fpr", method="max")
    with pytest.raises(ValueError, match="grouping 'age'"):
        r.ratio("fpr", grouping="age")


def test_multiclass_population_table_and_by_group():
    y = np.array([0, 1, 2, 0, 1, 2])
    preds = np.array([[0, 1, 2, 0, 1, 2], [1, 1, 2, 0, 0, 2]])
    r = group_rates(y, preds, np.array([0, 0, 0, 1, 1, 1]), 3)
    assert r.rates.fpr.shape == (2, 2, 3)
    t = r.table
    assert len(t) == 2 * 2 * 3 and {"model", "group", "class", "fpr", "fnr", "size"} <= set(t.columns)
    row = t[(t.model == 1) & (t.group == "attr0=0") & (t["class"] == 0)].iloc[0]
    assert row.fn == 1 and row.fnr == 1.0
    assert r.by_group.loc[(1, "attr0=1", 0), "fp"] == 1  # y=1 predicted 0
    np.testing.assert_allclose(r.difference("accuracy"), [0.0, 2 / 3 - 2 / 3])


def test_groups_as_dict_array_and_2d_array_agree(celeba_like):
    y, p, attrs = celeba_like
    a = group_rates(y, p, {"sex": attrs.sex.to_numpy(), "young": attrs.young.to_numpy()}, 2, positive_class=1)
    b = group_rates(y, p, attrs, 2, positive_class=1)
    pd.testing.assert_frame_equal(a.table, b.table)
    c = group_rates(y, p, np.column_stack([attrs.sex, attrs.young]), 2, positive_class=1, intersections=False)
    assert c.groupings == ["attr0", "attr1"]
    np.testing.assert_array_equal(c.table.fpr, b.table.fpr[:4])


def test_missing_attribute_and_bad_positive_class(celeba_like):
    y, p, attrs = celeba_like
    bad = attrs.copy()
    bad.loc[3, "sex"] = None
    msg = confusion_mod.ERR_GROUP_MISSING.format(name="sex", count=1, index=3)
    with pytest.raises(ValueError, match=re.escape(msg)):
        group_rates(y, p, bad, 2)
    with pytest.raises(ValueError, match=re.escape(confusion_mod.ERR_POSITIVE_CLASS.format(n=2, value=2))):
        group_rates(y, p, attrs, 2, positive_class=2)

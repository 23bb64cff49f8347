"""The estimability rule and absolute changes: rates with small denominators are "not estimable (n=...)"; pp beside %."""

from __future__ import annotations

import numpy as np
import pytest

from compbias.platform.audit.compute import AuditSettings, audit_study
from tests.platform.audit.test_gate import _study


def test_rates_carry_their_denominator_and_small_ones_are_not_estimable():
    data, records = _study(bias=0.6)
    y = data.labels
    ink = data.group_codes[:, 0]
    n_ink1 = int((ink == 1).sum())
    out = audit_study(data, records, AuditSettings(bootstrap=100, min_count=n_ink1 + 1))
    rates = out.tables["rates"]
    cls = rates[(rates["scope"] == "class") & (rates["method"] == "magnitude")]
    for _, r in cls.iterrows():
        c = int(r["name"])
        assert r["n"] == (int((y == c).sum()) if r["metric"] == "fnr" else int((y != c).sum()))
    grp = rates[(rates["scope"] == "group") & (rates["method"] == "magnitude")]
    small = grp[grp["name"] == "ink=1"]
    assert len(small) == 3 and (small["n"] == n_ink1).all()
    assert (small["estimable"] == f"not estimable (n={n_ink1})").all()
    assert small["mean"].isna().all() and small["ci_low"].isna().all() and small["change_pp"].isna().all()
    big = grp[grp["name"] == "ink=0"]
    assert (big["estimable"] == True).all() and big["mean"].notna().all()  # noqa: E712 (object column)


def test_absolute_changes_in_pp_beside_relative_ones_with_intervals():
    data, records = _study(bias=0.6)
    out = audit_study(data, records, AuditSettings(bootstrap=200))
    rates = out.tables["rates"]
    comp = rates[rates["method"] == "magnitude"]
    assert comp["change_pp"].notna().all() and comp["change_pct"].notna().any()
    for _, r in comp.iterrows():
        assert r["change_pp"] == pytest.approx((r["mean"] - r["baseline_mean"]) * 100)
        if np.isfinite(r["change_pct"]) and r["baseline_mean"] > 0:
            assert r["change_pct"] == pytest.approx((r["mean"] - r["baseline_mean"]) / r["baseline_mean"] * 100)
        assert r["change_pp_ci_low"] <= r["change_pp"] + 1e-9 and r["change_pp"] - 1e-9 <= r["change_pp_ci_high"]
    victim = comp[(comp["scope"] == "class") & (comp["name"] == "3") & (comp["metric"] == "fnr")].iloc[0]
    assert victim["change_pp_ci_low"] > 10  # the victim class's miss rate rose by tens of points


def test_per_model_cev_and_sde_against_the_models_own_baseline():
    import compbias.metrics as M

    data, records = _study(bias=0.6)
    out = audit_study(data, records, AuditSettings(bootstrap=0))
    base, pop = data.baseline, data.compressed[("magnitude", "0.9")]
    y, C = data.labels, data.n_classes
    models = out.tables["models"].set_index("version")
    for i, r in enumerate(pop.records):
        b = int(r.baseline_version) - 1  # the baselines are versions 1..3 (seeds 0..2)
        rate = lambda p: M.class_rates(M.confusion_counts(y, p, C))
        cr, br = rate(pop.preds[i]), rate(base.preds[b])
        dfpr, dfnr = M.normalized_change(cr.fpr, br.fpr), M.normalized_change(cr.fnr, br.fnr)
        row = models.loc[r.key]
        assert row["baseline_version"] == base.records[b].key
        assert row["cev_paired"] == pytest.approx(M.cev(dfpr, dfnr).value)
        assert row["sde_paired"] == pytest.approx(M.sde(dfpr, dfnr).value)
    bias = out.tables["bias"].iloc[0]
    assert bias["worst_class"] == 3 and bias["worst_class_recall_change_pp"] < -10  # the victim class, never dropped
    assert isinstance(bias["cev_dropped_classes"], str)


def test_two_level_intervals_are_the_default_and_wider_than_example_only_when_seeds_differ():
    data, records = _study(bias=0.6, seeds=5)
    two = audit_study(data, records, AuditSettings(bootstrap=300))
    ex = audit_study(data, records, AuditSettings(bootstrap=300, intervals="examples"))
    assert AuditSettings().intervals == "two_level"

    def width(out, scope, name, metric, col="change_pp"):
        t = out.tables["rates"]
        r = t[(t["method"] == "magnitude") & (t["scope"] == scope) & (t["name"] == name) & (t["metric"] == metric)].iloc[0]
        return r[f"{col}_ci_high"] - r[f"{col}_ci_low"]

    # the victim class's miss rate varies from seed to seed in the synthetic study: resampling seeds widens its interval
    assert width(two, "class", "3", "fnr") > width(ex, "class", "3", "fnr")
    b2, be = two.tables["bias"].iloc[0], ex.tables["bias"].iloc[0]
    assert b2["cev_ci_low"] <= b2["cev"] <= b2["cev_ci_high"] and be["cev_ci_low"] <= be["cev"] <= be["cev_ci_high"]
    # the point estimates do not depend on the interval method
    assert b2["cev"] == be["cev"] and b2["acc"] == be["acc"]

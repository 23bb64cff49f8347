"""The default gate (no thresholds set): fails a population that hurts a class or group beyond the tolerance, passes one that does not."""

from __future__ import annotations

import pytest

from compbias.platform.audit import tags as T
from compbias.platform.audit.compute import AuditSettings, audit_study
from compbias.platform.audit.population import build_study_data
from compbias.platform.audit.fetch import Fetched
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.audit.synthetic import SyntheticStudy, make_predictions
from compbias.platform.config import GateSpec


def _study(bias: float, seeds: int = 3, lineage: bool = True):
    spec = SyntheticStudy(n_examples=600, seeds=seeds, bias=bias, methods={"magnitude": ["0.9"]})
    fetched, v = [], 0
    for seed in range(seeds):
        v += 1
        fetched.append(Fetched(VersionRecord("m", str(v), f"r{v}", {T.STUDY: "s", T.ROLE: "baseline", T.SEED: str(seed)}),
                               make_predictions(spec, seed)))
    for seed in range(seeds):
        v += 1
        tags = {T.STUDY: "s", T.ROLE: "compressed", T.METHOD: "magnitude", T.LEVEL: "0.9"}
        if lineage:  # without it (neither baseline version nor seed) each model is compared with the baseline mean
            tags.update({T.SEED: str(seed), T.BASELINE_VERSION: str(seed + 1)})
        fetched.append(Fetched(VersionRecord("m", str(v), f"r{v}", tags), make_predictions(spec, seed, "magnitude", "0.9")))
    return build_study_data(fetched, declared_groups=["ink"]), [f.record for f in fetched]


def test_no_compression_harm_passes_the_default_gate():
    data, records = _study(bias=0.0)
    out = audit_study(data, records, AuditSettings(bootstrap=200))
    assert {o.status for o in out.versions.values()} == {"pass"}
    gate = out.tables["gate"]
    assert set(gate["cell"]) == {"class", "group", "overall"} and not gate["fails"].any()
    assert len(gate) == 10 + 2 + 1  # ten classes, the two values of ink, all examples


@pytest.mark.parametrize("lineage", [True, False])
def test_a_harmed_class_fails_the_default_gate_and_the_reason_names_it(lineage):
    data, records = _study(bias=0.6, lineage=lineage)
    out = audit_study(data, records, AuditSettings(bootstrap=200))
    compressed = [r.key for r in records if r.role == "compressed"]
    assert all(out.versions[k].status == "fail" for k in compressed)
    assert all(out.versions[r.key].status == "pass" for r in records if r.is_baseline)
    reason = out.versions[compressed[0]].reason
    assert reason.startswith("default gate: class 3 (n=") and "> tolerance 2 pp" in reason  # the victim class
    assert ("each with its own baseline" in reason) is lineage
    gate = out.tables["gate"]
    row = gate[(gate["cell"] == "class") & (gate["name"] == "3")].iloc[0]
    assert row["fails"] and row["excess_ci_low"] > 2.0
    assert row["excess_pp"] == pytest.approx(row["error_change_pp"] - row["overall_change_pp"])


def test_the_tolerance_and_thresholds_decide_instead():
    data, records = _study(bias=0.6)
    lenient = audit_study(data, records, AuditSettings(bootstrap=200, gate=GateSpec(tolerance_pp=95.0, overall_tolerance_pp=95.0)))
    assert {o.status for o in lenient.versions.values()} == {"pass"}
    # the overall check alone: the victim class costs the whole model several points of accuracy
    overall = audit_study(data, records, AuditSettings(bootstrap=200, gate=GateSpec(tolerance_pp=95.0)))
    reason = next(o.reason for o in overall.versions.values() if o.status == "fail")
    assert reason.startswith("default gate: overall error +") and "> tolerance 2 pp" in reason
    # any threshold set: the thresholds decide, not the default gate
    by_threshold = audit_study(data, records, AuditSettings(bootstrap=200, thresholds={"acc_drop": 50.0}))
    assert {o.status for o in by_threshold.versions.values()} == {"pass"}


def test_small_cells_are_not_estimable_and_never_fail():
    data, records = _study(bias=0.6)
    out = audit_study(data, records, AuditSettings(bootstrap=200, min_count=1000, gate=GateSpec(overall_tolerance_pp=95.0)))
    gate = out.tables["gate"]
    cells = gate[gate["cell"] != "overall"]
    assert cells["estimable"].astype(str).str.startswith("not estimable (n=").all() and not gate["fails"].any()
    assert {o.status for o in out.versions.values()} == {"pass"}


def test_field_measures_in_the_audit_equal_the_metrics_computed_directly():
    import numpy as np

    import compbias.metrics as M

    data, records = _study(bias=0.6)
    out = audit_study(data, records, AuditSettings(bootstrap=0))
    base, pop = data.baseline, data.compressed[("magnitude", "0.9")]
    y, C = data.labels, data.n_classes
    row = out.tables["bias"].iloc[0]
    pairs = [int(r.baseline_version) - 1 for r in pop.records]  # versions 1..3 are the baselines of seeds 0..2
    assert row["pie_unanimous"] == int(M.pie_mask(base.preds, pop.preds, C, definition="unanimous", pairs=pairs).sum())
    recall = lambda preds: np.array([[(p[y == c] == c).mean() for c in range(C)] for p in preds]).mean(axis=0)
    assert row["recall_intensification"] == pytest.approx(M.recall_intensification(recall(base.preds), recall(pop.preds)).intensification)
    ink = data.group_codes[:, 0]
    wga = lambda p: min((p[ink == g] == y[ink == g]).mean() for g in np.unique(ink))
    expected = np.mean([wga(pop.preds[s]) - wga(base.preds[pairs[s]]) for s in range(pop.size)]) * 100
    assert row["worst_group_acc_change_pp"] == pytest.approx(expected)
    scores = M.cie_scores(base.preds, pop.preds, C)
    for _, c in out.tables["cie"].iterrows():
        cut = M.cie_cut(scores, c["fraction"])
        assert (c["score_at_cut"], c["tied_block"], c["taken_from_block"]) == (cut.score_at_cut, cut.tied_block, cut.taken_from_block)
        assert c["margin_auroc"] == pytest.approx(M.margin_auroc(M.vote_margin(base.preds, C), M.cie_mask(scores, c["fraction"])))
        if cut.ambiguous:  # accuracy over random draws of the tied block brackets a range, not one number
            assert 0 <= c["comp_acc_on_draws_low"] <= c["comp_acc_on_draws_high"] <= 1
        else:
            assert c["comp_acc_on_draws_low"] is None or np.isnan(c["comp_acc_on_draws_low"])

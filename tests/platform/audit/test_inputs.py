"""Selection specs, the predictions contract, and population line-up errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from compbias.platform.audit import tags as T
from compbias.platform.audit.compute import AuditSettings, audit_study, key_part, pct_name, verdict
from compbias.platform.audit.fetch import ArtifactError, Fetched, validate_predictions
from compbias.platform.audit.population import PopulationError, build_study_data
from compbias.platform.audit.selection import Selection, VersionRecord, parse_version_spec, select_targets
from compbias.platform.audit.synthetic import SyntheticStudy, make_predictions


def rec(v, role="compressed", method="magnitude", level="0.9", **tags):
    return VersionRecord("m", str(v), f"r{v}", {T.STUDY: "s", T.ROLE: role, T.METHOD: method, T.LEVEL: level, **tags})


def test_parse_version_spec():
    assert parse_version_spec("compbias-digits/3") == ("compbias-digits", "3")
    assert parse_version_spec("models:/a.b/12") == ("a.b", "12")
    for bad in ("nope", "m/x", "/3"):
        with pytest.raises(ValueError, match="NAME/VERSION"):
            parse_version_spec(bad)


def test_select_targets_incremental_skips_audited_and_partial_is_not_audited():
    mv = "1+audit1"
    done = rec(1, **{T.STATUS: "pass", T.METRICS_VERSION: mv})
    old = rec(2, **{T.STATUS: "pass", T.METRICS_VERSION: "0+audit1"})
    partial = rec(3, **{T.METRICS_VERSION: mv, "compbias.audit.cev": "1"})
    fresh = rec(4)
    got = select_targets([done, old, partial, fresh], Selection(), mv)
    assert [r.version for r in got] == ["2", "3", "4"]
    assert T.is_partial(partial.tags) and not T.is_partial(done.tags)
    assert [r.version for r in select_targets([done, fresh], Selection(registered_model="m", force=True), mv)] == ["1", "4"]


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"example_id": [0, 1], "label": [0, 1]}), "lacks the column"),
        (pd.DataFrame({"example_id": [0, 1], "label": [0, 1], "pred": [0.5, 1.0]}), "must hold integers"),
        (pd.DataFrame({"example_id": [0, 0], "label": [0, 1], "pred": [0, 1]}), "duplicated example_id"),
        (pd.DataFrame({"example_id": [0, 1], "label": [0, -1], "pred": [0, 1]}), "negative"),
        (pd.DataFrame({"example_id": [0, 1], "label": [0, None], "pred": [0, 1]}), "missing values"),
        (pd.DataFrame({"example_id": [], "label": [], "pred": []}), "no rows"),
    ],
)
def test_predictions_contract(frame, message):
    with pytest.raises(ArtifactError, match=message):
        validate_predictions(frame)


def test_validate_sorts_by_example_id():
    f = validate_predictions(pd.DataFrame({"example_id": [2, 0, 1], "label": [2, 0, 1], "pred": [2, 0, 0]}))
    assert f["example_id"].tolist() == [0, 1, 2] and f["pred"].tolist() == [0, 0, 2]


def test_versions_that_do_not_line_up_are_errors_and_no_baseline_is_fatal():
    spec = SyntheticStudy(n_examples=200, seeds=2)
    b = Fetched(rec(1, role="baseline"), make_predictions(spec, 0))
    ok = Fetched(rec(2), make_predictions(spec, 0, "magnitude", "0.9"))
    short = Fetched(rec(3), make_predictions(spec, 1, "magnitude", "0.9").iloc[:150])
    relabel = make_predictions(spec, 1, "magnitude", "0.9")
    relabel.loc[0, "label"] = (relabel.loc[0, "label"] + 1) % 10
    wrong = Fetched(rec(4), relabel)
    data = build_study_data([b, ok, short, wrong], declared_groups=["ink"])
    assert set(data.errors) == {"m/3", "m/4"}
    assert "same test examples" in data.errors["m/3"] and "labels disagree" in data.errors["m/4"]
    assert data.compressed[("magnitude", "0.9")].size == 1
    out = audit_study(data, [ok.record, short.record], AuditSettings(bootstrap=0), errors=data.errors)
    assert out.versions["m/3"].status == "error" and out.versions["m/2"].status == "fail"  # the default gate (victim class 3)
    assert out.versions["m/2"].reason.startswith("default gate: class 3 ")
    # one baseline on 200 examples: every class has a zero baseline FPR or FNR, so CEV is undefined;
    # the audit says so (and a CEV threshold cannot be checked) instead of crashing ...
    assert "CEV is undefined" in " ".join(out.notes) and "cev" not in out.versions["m/2"].values
    strict = audit_study(data, [ok.record], AuditSettings(bootstrap=0, thresholds={"cev": 10}), errors=data.errors)
    assert strict.versions["m/2"].status == "error" and "undefined" in strict.versions["m/2"].reason
    # ... and additive smoothing defines it
    smooth = audit_study(data, [ok.record], AuditSettings(bootstrap=0, smoothing=1.0), errors=data.errors)
    assert smooth.metrics["cev/magnitude/0.9"] > 0 and not smooth.notes
    with pytest.raises(PopulationError, match="no baseline"):
        build_study_data([ok])


def test_verdict_and_key_names():
    assert verdict({"cev": 10.0, "acc_drop": 1.0}, {"cev": 20, "acc_drop": 2}) == ("pass", None)
    status, reason = verdict({"cev": 30.0, "acc_drop": 3.0}, {"cev": 20, "acc_drop": 2, "sde": None})
    assert status == "fail" and reason == "cev 30 > 20; acc_drop 3 > 2"
    assert verdict({"cev": float("nan")}, {"cev": 1})[0] == "error"
    assert key_part("structured+at_kd") == "structured_at_kd" and key_part("int8_static") == "int8_static"
    assert pct_name(0.01) == "top1pct" and pct_name(0.005) == "top0.5pct"


def test_bootstrap_intervals_cover_the_estimates():
    spec = SyntheticStudy(n_examples=300, seeds=3)
    fetched = [Fetched(rec(s * 2 + 1, role="baseline"), make_predictions(spec, s)) for s in range(3)]
    fetched += [Fetched(rec(s * 2 + 2), make_predictions(spec, s, "magnitude", "0.9")) for s in range(3)]
    data = build_study_data(fetched, declared_groups=["ink"])
    out = audit_study(data, [f.record for f in fetched], AuditSettings(bootstrap=60))
    m = out.metrics
    assert m["cev/magnitude/0.9/ci_low"] <= m["cev/magnitude/0.9"] <= m["cev/magnitude/0.9/ci_high"]
    assert m["acc/baseline/ci_low"] <= m["acc/baseline"] <= m["acc/baseline/ci_high"]
    rates = out.tables["rates"]
    g = rates[(rates["scope"] == "group") & (rates["method"] == "magnitude") & (rates["metric"] == "fpr")]
    assert len(g) == 2 and (g["change_ci_low"] <= g["change_pct"]).all() and (g["change_pct"] <= g["change_ci_high"]).all()
    models = out.tables["models"].dropna(subset=["cev_ci_low"])
    assert len(models) == 3 and (models["cev_ci_low"] <= models["cev"]).all() and (models["cev"] <= models["cev_ci_high"]).all()
    assert np.isfinite(out.tables["bias"]["sde_ci_high"]).all()

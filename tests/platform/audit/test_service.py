"""The audit end to end on a synthetic study registered in a temporary SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from compbias.platform.audit import AuditOptions, Selection, current_metrics_version, run_audit
from compbias.platform.audit import tags as T
from compbias.platform.audit.synthetic import register_synthetic_study
from compbias.platform.audit.selection import list_versions


def audit_runs(client):
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.RUN_KIND}` = 'audit'")
    return runs


def vtags(client, name, version):
    return dict(client.get_model_version(name, version).tags)


def test_audit_writes_metrics_tables_figures_report_and_tags(client, registered, spec, options):
    results = run_audit(client, options=options)
    assert len(results) == 1
    res = results[0]
    run = client.get_run(res.run_id)
    assert run.data.tags[T.RUN_KIND] == "audit"
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    # metric keys line up per population; the injected bias shows: more pruning, more CEV; KD mitigates
    for pk in ("magnitude/0.5", "magnitude/0.9", "magnitude_kd/0.9"):
        for key in ("cev", "sde", "pie", "cie/acc_top1pct", "acc", "acc_drop", "worst_group_fpr_change"):
            assert f"{key}/{pk}" in m, key
        assert m[f"cev/{pk}/ci_low"] <= m[f"cev/{pk}"] <= m[f"cev/{pk}/ci_high"]
    assert m["cev/magnitude/0.9"] > m["cev/magnitude/0.5"] > 0
    assert m["cev/magnitude_kd/0.9"] < m["cev/magnitude/0.9"]
    assert m["sde/magnitude/0.9"] > m["sde/magnitude_kd/0.9"]
    # the compressed population is much worse than the baselines on its CIE set, not off it
    assert m["cie/acc_top1pct/magnitude/0.9"] < m["cie/base_acc_top1pct/magnitude/0.9"] - 0.5
    assert m["cie/acc_off_top1pct/magnitude/0.9"] > 0.7
    # class 3 is the victim: Welch's test finds it
    art = Path(run.info.artifact_uri.replace("file://", ""))
    tt = pd.read_parquet(art / "tables" / "ttest.parquet")
    row = tt[(tt["method"] == "magnitude") & (tt["level"] == "0.9") & (tt["class"] == spec.victim_class)].iloc[0]
    assert row["p"] < 0.05 and row["base_mean"] > row["comp_mean"]
    # the worst group is the one the synthetic models were biased against
    assert res.summary["worst_group"]["group"] == "ink=1"
    for name in ("bias", "rates", "models", "ttest", "cie", "cie_composition", "cie_list", "versions"):
        assert (art / "tables" / f"{name}.parquet").is_file()
        assert (art / "tables" / f"{name}.html").is_file()
    for name in ("class_changes", "level_curves", "group_changes"):
        assert (art / "figures" / f"{name}.png").stat().st_size > 5000
    comp = pd.read_parquet(art / "tables" / "cie_composition.parquet")
    share = comp[(comp["method"] == "magnitude") & (comp["level"] == "0.9") & (comp["fraction"] == 0.05) & (comp["value"] == 1)]
    assert share["share_cie"].iloc[0] > share["share_test"].iloc[0]  # ink=1 over-represented among CIEs
    cie_csv = pd.read_csv(art / "cie.csv")
    assert {"example_id", "label", "cie_score", "baseline_modal_pred", "compressed_modal_pred", "annotation"} <= set(cie_csv.columns)
    report = (art / "report.html").read_text()
    assert res.report_path == str(art / "report.html")
    assert report.count("data:image/png;base64,") >= 3 and "src='http" not in report
    assert "magnitude" in report and "CEV" in report
    summary = json.loads((art / "summary.json").read_text())
    assert len(summary["versions"]) == 12
    # every version carries the outcome
    mv = current_metrics_version()
    for (seed, method, level), version in registered.items():
        t = vtags(client, spec.registered_model, version)
        if method == "baseline":
            assert t[T.STATUS] == "pass", (method, level, t.get(T.REASON))
        else:  # no thresholds in the study file: the default gate fails the populations the synthetic bias hurts
            assert t[T.STATUS] == "fail", (method, level, t.get(T.REASON))
            assert t[T.REASON].startswith(("default gate: class 3 ", "default gate: group ink=1 ")), t[T.REASON]
        assert t[T.RUN_ID] == res.run_id and t[T.METRICS_VERSION] == mv
        assert "compbias.audit.acc" in t
        if method != "baseline":
            assert float(t["compbias.audit.cev"]) > 0 and "compbias.audit.worst_group" in t


def test_second_audit_with_nothing_new_logs_nothing(client, registered, options):
    assert len(run_audit(client, options=options)) == 1
    before = {r.info.run_id for r in audit_runs(client)}
    assert run_audit(client, options=options) == []
    assert {r.info.run_id for r in audit_runs(client)} == before


def test_new_version_is_audited_alone(client, registered, spec, options):
    first = run_audit(client, options=options)[0]
    baselines = {seed: registered[(seed, "baseline", "none")] for seed in range(spec.seeds)}
    new = register_synthetic_study(client, spec, seeds=[1], methods={"magnitude": ["0.9"]}, baseline_versions=baselines)
    (new_version,) = new.values()
    results = run_audit(client, options=options)
    assert len(results) == 1
    res = results[0]
    assert list(res.statuses) == [f"{spec.registered_model}/{new_version}"]
    # the new version got the new run id; the others kept the first audit's
    assert vtags(client, spec.registered_model, new_version)[T.RUN_ID] == res.run_id
    for version in registered.values():
        assert vtags(client, spec.registered_model, version)[T.RUN_ID] == first.run_id
    # its population now has four models, and only that population was recomputed
    m = client.get_run(res.run_id).data.metrics
    assert "cev/magnitude/0.9" in m and "cev/magnitude/0.5" not in m
    assert json.loads(client.get_run(res.run_id).data.params["n_targets"]) == 1


def test_corrupt_artifact_is_an_error_and_the_rest_is_audited(client, registered, spec, store, options):
    bad = registered[(2, "magnitude", "0.5")]
    run_id = client.get_model_version(spec.registered_model, bad).run_id
    path = Path(client.get_run(run_id).info.artifact_uri.replace("file://", "")) / "predictions.parquet"
    path.write_bytes(b"this is not parquet")
    missing = registered[(1, "magnitude+kd", "0.9")]
    rid2 = client.get_model_version(spec.registered_model, missing).run_id
    (Path(client.get_run(rid2).info.artifact_uri.replace("file://", "")) / "predictions.parquet").unlink()
    opts = AuditOptions(**{**options.__dict__, "thresholds": {"cev": 2.5e5}})
    res = run_audit(client, options=opts)[0]
    t = vtags(client, spec.registered_model, bad)
    assert t[T.STATUS] == "error" and "not a readable parquet" in t[T.REASON]
    t2 = vtags(client, spec.registered_model, missing)
    assert t2[T.STATUS] == "error" and "predictions.parquet" in t2[T.REASON]
    others = {k: v for k, v in registered.items() if v not in (bad, missing)}
    statuses = {k: vtags(client, spec.registered_model, v)[T.STATUS] for k, v in others.items()}
    assert set(statuses.values()) <= {"pass", "fail"}
    assert "fail" in statuses.values() and "pass" in statuses.values()
    assert res.statuses[f"{spec.registered_model}/{bad}"] == "error"
    # the population kept the two good models of magnitude/0.5
    bias = pd.read_parquet(Path(client.get_run(res.run_id).info.artifact_uri.replace("file://", "")) / "tables" / "bias.parquet")
    assert int(bias[(bias["method"] == "magnitude") & (bias["level"] == "0.5")]["n_models"].iloc[0]) == 2


def test_thresholds_decide_status_and_alias(client, registered, spec, options):
    # CEV threshold between the distilled (~3e4) and plain 0.9 (~3e5) populations; acc drop rules out 0.9 too
    opts = AuditOptions(**{**options.__dict__, "thresholds": {"cev": 2.0e5, "acc_drop": 10.0}, "alias": "audited"})
    run_audit(client, options=opts)
    status = {k: vtags(client, spec.registered_model, v)[T.STATUS] for k, v in registered.items()}
    for (seed, method, level), s in status.items():
        if (method, level) == ("magnitude", "0.9"):
            assert s == "fail"
            reason = vtags(client, spec.registered_model, registered[(seed, method, level)])[T.REASON]
            assert "cev" in reason and "acc_drop" in reason
        else:
            assert s == "pass"
    alias = client.get_model_version_by_alias(spec.registered_model, "audited")
    passing = [v for k, v in registered.items() if status[k] == "pass" and k[1] != "baseline"]
    assert str(alias.version) == str(max(int(v) for v in passing))
    assert status[next(k for k, v in registered.items() if v == str(alias.version))] == "pass"
    # a stricter re-audit of everything moves the alias off failing versions, and removes it when none passes
    strict = AuditOptions(**{**options.__dict__, "thresholds": {"cev": 1.0}, "alias": "audited"})
    run_audit(client, Selection(registered_model=spec.registered_model, force=True), strict)
    with pytest.raises(Exception):
        client.get_model_version_by_alias(spec.registered_model, "audited")


def test_explicit_selection_and_bad_names(client, registered, spec, options):
    v = registered[(0, "magnitude", "0.5")]
    res = run_audit(client, Selection(versions=(f"{spec.registered_model}/{v}",)), options)[0]
    assert list(res.statuses) == [f"{spec.registered_model}/{v}"]
    with pytest.raises(ValueError, match="not a registered compbias version"):
        run_audit(client, Selection(versions=(f"{spec.registered_model}/999",)), options)
    with pytest.raises(ValueError, match="known studies"):
        run_audit(client, Selection(study="nope"), options)


def test_no_baseline_population_errors_every_target(client, store, spec, options):
    register_synthetic_study(client, spec, seeds=[0], methods={}, artifact_location=store["artifacts"])
    versions = list_versions(client)
    rid = versions[0].run_id
    (Path(client.get_run(rid).info.artifact_uri.replace("file://", "")) / "predictions.parquet").write_text("junk")
    res = run_audit(client, options=options)[0]
    assert set(res.statuses.values()) == {"error"}


def test_new_baseline_alone_is_audited_as_the_reference(client, registered, spec, options):
    run_audit(client, options=options)
    new = register_synthetic_study(client, spec, seeds=[3], methods={})
    (version,) = new.values()
    (res,) = run_audit(client, options=options)
    assert res.statuses == {f"{spec.registered_model}/{version}": "pass"}
    tags = vtags(client, spec.registered_model, version)
    assert "reference" in tags[T.REASON] and float(tags["compbias.audit.acc"]) > 0.9
    m = client.get_run(res.run_id).data.metrics
    assert "acc/baseline" in m and not any(k.startswith("cev/") for k in m)

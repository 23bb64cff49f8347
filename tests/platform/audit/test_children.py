"""What an audit run gives the MLflow UI: a child run per population, CSV twins, the evaluation set as input.

The compare view charts a metric key against a param across runs; that works
only when every population's child carries the same keys (``cev``, not
``cev/magnitude/0.9``) and the level is a param. These tests run the audit on
the synthetic study (tests/platform/audit/conftest.py) and read back what
MLflow stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow.data
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from compbias.contract import metric_key
from compbias.platform.audit import AuditOptions, run_audit
from compbias.platform.audit import tags as T
from compbias.platform.audit import synthetic
from compbias.platform.audit.synthetic import register_synthetic_study
from compbias.platform.audit.writer import RUN_KIND_AUDIT_POPULATION

REPO = Path(__file__).resolve().parents[3]

#: keys every child must carry in this study (no SVCCA: synthetic versions have no weights)
EXPECTED_KEYS = {
    "acc", "acc_ci_low", "acc_ci_high", "acc_drop", "acc_baseline", "cev", "cev_ci_low", "cev_ci_high",
    "sde", "sde_ci_low", "sde_ci_high", "pie", "pie_fraction", "pie_unanimous", "worst_group_fpr_change", "ttest_n_classes_p05",
    "recall_intensification", "worst_group_acc_change_pp",
    "cie_acc_top1pct", "cie_base_acc_top1pct", "cie_acc_off_top1pct", "cie_base_acc_off_top1pct",
    "cie_acc_top5pct", "cie_base_acc_top5pct", "cie_acc_off_top5pct", "cie_base_acc_off_top5pct",
    "gate_overall_change_pp", "gate_overall_ci_low", "gate_overall_ci_high", "gate_worst_excess_pp",
    "gate_worst_excess_ci_low", "gate_worst_excess_ci_high", "gate_fail", "gate_n_failing_cells",
    "n_models", "n_pass", "n_fail", "n_error",
}


def children_of(client, run_id):
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=100)


def every_run(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000)


def artifact_dir(client, run_id) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))


@pytest.fixture
def with_quantized(client, registered, spec):
    """The synthetic study plus a quantized population (level ``int8_static``: no sparsity)."""
    baselines = {seed: registered[(seed, "baseline", "none")] for seed in range(spec.seeds)}
    return register_synthetic_study(client, spec, methods={"quantize": ["int8_static"]}, baseline_versions=baselines)


def test_one_child_per_population_with_the_same_keys_as_the_parent_values(client, registered, with_quantized, spec, options):
    res = run_audit(client, options=options)[0]
    parent = client.get_run(res.run_id)
    kids = {r.info.run_name: r for r in children_of(client, res.run_id)}
    assert set(kids) == {"magnitude@0.5", "magnitude@0.9", "magnitude+kd@0.9", "quantize@int8_static"}
    for name, kid in kids.items():
        assert kid.info.status == "FINISHED" and kid.info.end_time >= kid.info.start_time, name
        assert kid.info.experiment_id == parent.info.experiment_id  # the UI nests only within an experiment
        assert kid.data.tags[T.RUN_KIND] == RUN_KIND_AUDIT_POPULATION and kid.data.tags[T.STUDY] == spec.name
        assert kid.data.params["method"] + "@" + kid.data.params["level"] == name
        assert int(kid.data.params["n_models"]) == spec.seeds == kid.data.metrics["n_models"]
        assert kid.data.params["worst_group"] == "ink=1"  # the group the synthetic models were biased against
    # the same keys in every child (the compare view's axes); sparsity only where the level is one
    assert set(kids["quantize@int8_static"].data.metrics) == EXPECTED_KEYS
    assert "sparsity" not in kids["quantize@int8_static"].data.params
    for name in ("magnitude@0.5", "magnitude@0.9", "magnitude+kd@0.9"):
        assert set(kids[name].data.metrics) == EXPECTED_KEYS | {"sparsity"}, name
        assert kids[name].data.metrics["sparsity"] == float(kids[name].data.params["level"])
    # each child's value is the parent's folded one (dashboards on either agree)
    pm = parent.data.metrics
    for name, kid in kids.items():
        method, level = name.split("@")
        pk = f"{metric_key(method)}/{metric_key(level)}"
        m = kid.data.metrics
        for key, folded in (("cev", f"cev/{pk}"), ("sde_ci_high", f"sde/{pk}/ci_high"), ("acc", f"acc/{pk}"),
                            ("acc_drop", f"acc_drop/{pk}"), ("pie", f"pie/{pk}"), ("cie_acc_top1pct", f"cie/acc_top1pct/{pk}"),
                            ("worst_group_fpr_change", f"worst_group_fpr_change/{pk}"), ("acc_baseline", "acc/baseline")):
            assert m[key] == pytest.approx(pm[folded]), (name, key)
        assert m["cev_ci_low"] <= m["cev"] <= m["cev_ci_high"]
        assert m["gate_overall_ci_low"] <= m["gate_overall_change_pp"] <= m["gate_overall_ci_high"]
    # what a chart of CEV against sparsity shows: more pruning, more CEV; distillation mitigates
    mag = kids["magnitude@0.9"].data.metrics
    assert mag["cev"] > kids["magnitude@0.5"].data.metrics["cev"] > 0
    assert kids["magnitude+kd@0.9"].data.metrics["cev"] < mag["cev"]
    # the default gate's numbers are the gate table's: worst cell = the largest lower bound of the excess harm
    gate = pd.read_parquet(artifact_dir(client, res.run_id) / "tables" / "gate.parquet")
    g = gate[(gate["method"] == "magnitude") & (gate["level"] == "0.9")]
    cells = g[(g["cell"] != "overall") & g["excess_ci_low"].notna()]
    worst = cells.loc[cells["excess_ci_low"].astype(float).idxmax()]
    assert mag["gate_worst_excess_pp"] == pytest.approx(worst["excess_pp"])
    assert mag["gate_worst_excess_ci_low"] == pytest.approx(worst["excess_ci_low"])
    assert kids["magnitude@0.9"].data.params["gate_worst_cell"].startswith(f"{worst['cell']} {worst['name']} (n=")
    assert mag["gate_overall_change_pp"] == pytest.approx(g[g["cell"] == "overall"]["overall_change_pp"].iloc[0])
    # verdicts on the population's versions: the default gate fails the biased populations
    assert mag["gate_fail"] == 1.0 and mag["n_fail"] == spec.seeds and mag["n_pass"] == 0
    # the parent keeps the verdicts, the report and its folded keys
    assert "cev/magnitude/0.9" in pm and (artifact_dir(client, res.run_id) / "report.html").is_file()
    assert not any(k in pm for k in ("cev", "gate_fail"))


def test_tables_have_csv_twins_in_one_upload(client, registered, options, monkeypatch):
    uploads = []
    for name in ("log_artifacts", "log_artifact"):
        real = getattr(MlflowClient, name)

        def counting(self, *a, _real=real, _name=name, **k):
            uploads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(MlflowClient, name, counting)
    res = run_audit(client, options=options)[0]
    assert uploads == ["log_artifacts"]  # every artifact, CSV twins included, in one call
    tables = artifact_dir(client, res.run_id) / "tables"
    stems = sorted(p.stem for p in tables.glob("*.parquet"))
    assert {"bias", "gate", "models", "rates", "versions", "cie", "cie_list"} <= set(stems)
    for stem in stems:
        pq = pd.read_parquet(tables / f"{stem}.parquet")
        csv = pd.read_csv(tables / f"{stem}.csv", dtype={"level": str}) if len(pq.columns) else pd.DataFrame()
        assert list(csv.columns) == list(pq.columns) and len(csv) == len(pq), stem
        for col in pq.columns:  # the numbers a reader sees in the UI are the machine's
            if pd.api.types.is_float_dtype(pq[col]):
                pd.testing.assert_series_equal(csv[col].astype(float), pq[col], check_names=False, rtol=1e-12)
    bias = pd.read_csv(tables / "bias.csv", dtype={"level": str})
    assert set(zip(bias["method"], bias["level"])) == {("magnitude", "0.5"), ("magnitude", "0.9"), ("magnitude+kd", "0.9")}


def test_audit_run_logs_the_evaluation_set_it_audited(client, registered, spec, options):
    res = run_audit(client, options=options)[0]
    inputs = client.get_run(res.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    (di,) = inputs
    assert {t.key: t.value for t in di.tags} == {"mlflow.data.context": "evaluation"}
    assert di.dataset.name == "digits-test"  # the study file's dataset kind, as the model runs name theirs
    # the digest is MLflow's hash of the frame: it is the test set the models were evaluated on, not just its shape
    expected = mlflow.data.from_pandas(synthetic.test_set(spec)[["example_id", "label", "ink"]], targets="label")
    assert di.dataset.digest == expected.digest
    assert '"name": "ink"' in di.dataset.schema and '"num_rows": 500' in di.dataset.profile
    # a different test set (one label changed) would not have that digest
    other = synthetic.test_set(spec)[["example_id", "label", "ink"]].copy()
    other.loc[0, "label"] = (other.loc[0, "label"] + 1) % spec.n_classes
    assert mlflow.data.from_pandas(other, targets="label").digest != di.dataset.digest


@pytest.mark.parametrize("fail_at", ["second child", "artifact upload"])
def test_an_audit_failing_midway_leaves_no_running_run(client, registered, options, monkeypatch, fail_at):
    real_batch, real_upload = MlflowClient.log_batch, MlflowClient.log_artifacts
    seen = []

    def log_batch(self, run_id, *a, **k):
        if self.get_run(run_id).data.tags.get(T.RUN_KIND) == RUN_KIND_AUDIT_POPULATION:
            seen.append(run_id)
            if fail_at == "second child" and len(seen) == 2:
                raise ConnectionError("tracking server went away")
        return real_batch(self, run_id, *a, **k)

    def log_artifacts(self, *a, **k):
        if fail_at == "artifact upload":
            raise ConnectionError("artifact store went away")
        return real_upload(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(MlflowClient, "log_artifacts", log_artifacts)
    with pytest.raises(ConnectionError):
        run_audit(client, options=options)
    monkeypatch.undo()
    runs = every_run(client)
    audits = [r for r in runs if r.data.tags.get(T.RUN_KIND) == T.RUN_KIND_AUDIT]
    kids = [r for r in runs if r.data.tags.get(T.RUN_KIND) == RUN_KIND_AUDIT_POPULATION]
    assert len(audits) == 1 and audits[0].info.status == "FAILED"
    assert len(kids) == (2 if fail_at == "second child" else 3)  # none created after the failure
    for kid in kids:  # finished or not, the children of a failed audit are not FINISHED
        assert kid.info.status == "FAILED", kid.info.run_name
        assert kid.data.tags["mlflow.parentRunId"] == audits[0].info.run_id
        assert "compbias.audit.incomplete" in kid.data.tags
    assert "RUNNING" not in {r.info.status for r in runs}
    # no version points at the failed audit; the next audit does the work
    res = run_audit(client, options=options)[0]
    assert {r.info.status for r in children_of(client, res.run_id)} == {"FINISHED"}


KILLER = textwrap.dedent(
    """\
    import os, sys
    from mlflow.tracking import MlflowClient
    from compbias.platform.audit import AuditOptions, run_audit
    from compbias.platform.audit.writer import RUN_KIND_AUDIT_POPULATION

    real = MlflowClient.log_batch

    def log_batch(self, run_id, *a, **k):
        if self.get_run(run_id).data.tags.get("compbias.run_kind") == RUN_KIND_AUDIT_POPULATION:
            os._exit(9)  # like SIGKILL: no finally, no atexit
        return real(self, run_id, *a, **k)

    MlflowClient.log_batch = log_batch
    run_audit(MlflowClient(), options=AuditOptions(cache_dir=sys.argv[1], similarity=False, gallery=False, workers=1))
    """
)


def test_auditor_killed_while_writing_children_leaves_nothing_running_after_the_next_audit(client, registered, store, options, tmp_path):
    script = tmp_path / "killed_auditor.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    killed = every_run(client)
    kids = [r for r in killed if r.data.tags.get(T.RUN_KIND) == RUN_KIND_AUDIT_POPULATION]
    (parent,) = [r for r in killed if r.data.tags.get(T.RUN_KIND) == T.RUN_KIND_AUDIT]
    assert parent.info.status == "RUNNING" and [k.info.status for k in kids] == ["RUNNING"]  # what a kill leaves
    time.sleep(1.5)  # the dead auditor's claims and runs are older than the next auditor's ttl
    opts = AuditOptions(**{**options.__dict__, "claim_ttl": 1.0})
    res = run_audit(client, options=opts)[0]
    after = {r.info.run_id: r for r in every_run(client)}
    assert "RUNNING" not in {r.info.status for r in after.values()}
    for run_id in (parent.info.run_id, kids[0].info.run_id):
        assert after[run_id].info.status == "KILLED" and "compbias.audit.abandoned" in after[run_id].data.tags
    assert len(children_of(client, res.run_id)) == 3
    versions = client.search_model_versions(f"name = '{next(iter(res.statuses)).split('/')[0]}'")
    assert {v.tags[T.RUN_ID] for v in versions} == {res.run_id}


def test_close_abandoned_runs_closes_children_of_a_dead_audit_and_stale_orphans(client, registered, spec, options):
    from compbias.platform.audit.service import close_abandoned_runs

    exp = client.get_experiment_by_name(f"compbias/{spec.name}").experiment_id
    kind = {T.RUN_KIND: RUN_KIND_AUDIT_POPULATION}
    dead = client.create_run(exp, tags={T.RUN_KIND: "audit"}, start_time=1000).info.run_id
    done_child = client.create_run(exp, tags={**kind, "mlflow.parentRunId": dead}, start_time=1000).info.run_id
    client.set_terminated(done_child, "FINISHED")
    late_child = client.create_run(exp, tags={**kind, "mlflow.parentRunId": dead}).info.run_id  # young, but its parent is dead
    live = client.create_run(exp, tags={T.RUN_KIND: "audit"}).info.run_id
    live_child = client.create_run(exp, tags={**kind, "mlflow.parentRunId": live}).info.run_id
    stale_orphan = client.create_run(exp, tags={**kind, "mlflow.parentRunId": live}, start_time=1000).info.run_id
    closed = close_abandoned_runs(client, exp, options.claim_ttl)
    assert sorted(closed) == sorted([dead, done_child, late_child, stale_orphan])
    status = {r: client.get_run(r).info.status for r in (dead, done_child, late_child, live, live_child, stale_orphan)}
    assert status == {dead: "KILLED", done_child: "KILLED", late_child: "KILLED", live: "RUNNING",
                      live_child: "RUNNING", stale_orphan: "KILLED"}

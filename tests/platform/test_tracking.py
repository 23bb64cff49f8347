"""MLflow side: metric keys, logging + registration order, resume bookkeeping.

These tests use a temporary SQLite store and hand-made task results (no
training); the end-to-end test in tests/e2e drives the real jobs through Ray.
"""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from compbias.platform import tracking
from compbias.platform.config import parse_study
from compbias.platform.plan import plan_study
from compbias.platform.tasks import TaskResult

STUDY = {
    "name": "trk",
    "population": {"seeds": 2},
    "compression": [{"method": "magnitude", "levels": [0.5]}],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d}/mlflow.db"
    old = mlflow.get_tracking_uri()
    client = tracking.configure_tracking(uri)
    yield client
    mlflow.set_tracking_uri(old)


def _result(task, *, acc_pred=None, nan_class=None):
    rng = np.random.default_rng(task.seed)
    n = 40
    labels = np.arange(n) % 4
    pred = labels.copy() if acc_pred is None else acc_pred
    predictions = pd.DataFrame(
        {"example_id": np.arange(n, dtype=np.int64), "label": labels, "pred": pred, "prob": rng.uniform(0.3, 1, n), "ink": np.arange(n) % 2}
    )
    per_class = pd.DataFrame({"class": [0, 1, 2, 3], "fpr": [0.1, 0.2, 0.0, 0.05], "fnr": [0.0, 0.3, 0.1, 0.2]})
    if nan_class is not None:
        per_class.loc[nan_class, "fnr"] = np.nan
    per_group = pd.DataFrame({"grouping": ["ink", "ink"], "group": ["ink=0", "ink=1"], "size": [20, 20], "fpr": [0.1, 0.2], "fnr": [0.3, 0.4]})
    files = {"weights.safetensors": b"\x00" * 16, "model_spec.json": json.dumps({"arch": "smallcnn", "input_shape": [1, 8, 8]}).encode()}
    return TaskResult(
        task=task,
        predictions=predictions,
        per_class=per_class,
        per_group=per_group,
        info={"sparsity": 0.5 if task.role == "compressed" else 0.0, "size_bytes": 1234, "loss": [2.0, 1.0, 0.5], "note": "x"},
        model_files=files,
        node_id="node-abc",
        seconds=1.5,
        input_shape=(1, 8, 8),
        n_classes=4,
    )


def test_metric_keys_follow_the_convention():
    spec = parse_study(STUDY)
    task = plan_study(spec)[0]
    m = tracking.model_metrics(_result(task, nan_class=2))
    assert m["acc"] == 1.0
    assert m["fpr/class/1"] == pytest.approx(0.2) and m["fnr/class/3"] == pytest.approx(0.2)
    assert "fnr/class/2" not in m  # undefined rates are not logged as NaN
    assert m["fpr/group/ink_1"] == pytest.approx(0.2) and m["fnr/group/ink_0"] == pytest.approx(0.3)
    assert m["sparsity"] == 0.0 and m["size_bytes"] == 1234
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./") for k in m)


def test_group_metric_keys_for_binary_and_multiclass_tables():
    spec = parse_study(STUDY)
    task = plan_study(spec)[0]
    r = _result(task)
    # binary task with a positive class: one row per group, the class is implied
    r.per_group = pd.DataFrame({"group": ["Male=1", "Male=1&Young=0"], "class": [1, 1], "fpr": [0.1, 0.2], "fnr": [0.3, 0.4], "accuracy": [0.9, 0.8]})
    m = tracking.model_metrics(r)
    assert m["fpr/group/Male_1"] == pytest.approx(0.1) and m["fnr/group/Male_1_Young_0"] == pytest.approx(0.4)
    assert m["acc/group/Male_1"] == pytest.approx(0.9)
    # multi-class: one row per (group, class)
    r.per_group = pd.DataFrame({"group": ["ink=0", "ink=0"], "class": [0, 1], "fpr": [0.1, 0.2], "fnr": [0.3, 0.4]})
    m = tracking.model_metrics(r)
    assert m["fpr/group/ink_0/class/0"] == pytest.approx(0.1) and m["fnr/group/ink_0/class/1"] == pytest.approx(0.4)


def test_metric_key_sanitises_group_names():
    assert tracking.metric_key("Male=1&Young=0") == "Male_1_Young_0"
    assert tracking.metric_key("a b/c") == "a_b_c"


def _log_pair(client, spec, parent):
    exp = tracking.ensure_experiment(client, spec.experiment_name)
    tracking.ensure_registered_model(client, spec)
    tasks = plan_study(spec)
    base_task = tasks[0]
    comp_task = next(t for t in tasks if t.role == "compressed" and t.seed == base_task.seed)
    base = tracking.log_model_run(client, exp, parent, spec, "name: trk\n", _result(base_task))
    comp = tracking.log_model_run(client, exp, parent, spec, "name: trk\n", _result(comp_task), baseline=base)
    return exp, base, comp


def test_logged_run_has_tags_metrics_artifacts_and_a_registered_version(store):
    spec = parse_study(STUDY)
    exp = tracking.ensure_experiment(store, spec.experiment_name)
    parent = tracking.start_parent_run(store, exp, spec, "name: trk\n")
    _, base, comp = _log_pair(store, spec, parent)

    run = store.get_run(comp.run_id)
    assert run.info.status == "FINISHED"
    t = run.data.tags
    assert t["mlflow.parentRunId"] == parent
    assert (t["compbias.run_kind"], t["compbias.study"], t["compbias.role"]) == ("model", "trk", "compressed")
    assert (t["compbias.method"], t["compbias.level"], t["compbias.seed"]) == ("magnitude", "0.5", "0")
    assert t["compbias.ray_node"] == "node-abc"
    assert t["compbias.baseline_version"] == base.version and t["compbias.baseline_run_id"] == base.run_id
    assert run.data.metrics["sparsity"] == 0.5 and "fpr/class/0" in run.data.metrics
    assert [m.value for m in store.get_metric_history(comp.run_id, "loss")] == [2.0, 1.0, 0.5]
    names = {a.path for a in store.list_artifacts(comp.run_id)} | {a.path for a in store.list_artifacts(comp.run_id, "rates")}
    assert {"predictions.parquet", "study.yaml", "rates/per_class.parquet", "rates/per_group.parquet"} <= names
    back = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=comp.run_id, artifact_path="predictions.parquet"))
    assert list(back.columns[:4]) == ["example_id", "label", "pred", "prob"] and len(back) == 40

    mv = store.get_model_version(spec.registered_model_name, comp.version)
    for key in ("compbias.study", "compbias.role", "compbias.method", "compbias.level", "compbias.seed", "compbias.baseline_version", "compbias.ray_node"):
        assert mv.tags[key] == t[key]
    assert mv.run_id == comp.run_id

    parent_run = store.get_run(parent)
    assert parent_run.data.tags["compbias.run_kind"] == "study"
    assert parent_run.data.params["compression.0.method"] == "magnitude"
    assert {a.path for a in store.list_artifacts(parent)} >= {"study.yaml", "resolved.yaml"}

    files = tracking.download_model_files(store, spec, base)
    assert files["weights.safetensors"] == b"\x00" * 16


def test_a_failure_after_registration_deletes_the_version_and_fails_the_run(store, monkeypatch):
    spec = parse_study({**STUDY, "name": "trk-fail"})
    exp = tracking.ensure_experiment(store, spec.experiment_name)
    tracking.ensure_registered_model(store, spec)
    parent = tracking.start_parent_run(store, exp, spec, "x")
    task = plan_study(spec)[0]
    real = tracking.finish_run

    def broken(client, run_id, ok):
        if ok:
            raise RuntimeError("store went away")
        real(client, run_id, ok)

    monkeypatch.setattr(tracking, "finish_run", broken)
    with pytest.raises(RuntimeError, match="store went away"):
        tracking.log_model_run(store, exp, parent, spec, "x", _result(task))
    monkeypatch.setattr(tracking, "finish_run", real)
    assert list(store.search_model_versions(f"name = '{spec.registered_model_name}'")) == []
    runs = store.search_runs([exp], "tags.`compbias.run_kind` = 'model'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "store went away" in runs[0].data.tags["compbias.error"]


def test_compressed_run_without_baseline_is_refused(store):
    spec = parse_study({**STUDY, "name": "trk-nobase"})
    exp = tracking.ensure_experiment(store, spec.experiment_name)
    task = next(t for t in plan_study(spec) if t.role == "compressed")
    with pytest.raises(ValueError, match="needs its baseline"):
        tracking.log_model_run(store, exp, "parent", spec, "x", _result(task))


def test_scan_finds_finished_models_and_cleans_up_half_done_state(store):
    spec = parse_study({**STUDY, "name": "trk-scan"})
    exp = tracking.ensure_experiment(store, spec.experiment_name)
    parent = tracking.start_parent_run(store, exp, spec, "x")
    _, base, comp = _log_pair(store, spec, parent)
    # an interrupted execution: a model run left RUNNING and a parent left RUNNING
    task1 = next(t for t in plan_study(spec) if t.seed == 1 and t.role == "baseline")
    dangling = store.create_run(exp, tags={**tracking.model_tags(spec, task1, node_id="n"), "mlflow.parentRunId": parent})
    # a version whose run failed (registration raced a crash)
    failed_run = store.create_run(exp, tags=tracking.model_tags(spec, task1, node_id="n"))
    store.set_terminated(failed_run.info.run_id, "FAILED")
    orphan = store.create_model_version(spec.registered_model_name, source=f"{failed_run.info.artifact_uri}/model", run_id=failed_run.info.run_id)

    state = tracking.scan_study(store, exp, spec)
    assert set(state.done) == {base.key, comp.key}
    assert state.done[comp.key].version == comp.version and state.done[comp.key].resumed
    assert dangling.info.run_id in state.interrupted and parent in state.interrupted
    assert store.get_run(dangling.info.run_id).info.status == "FAILED"
    assert state.deleted_versions == [str(orphan.version)]
    left = {str(v.version) for v in store.search_model_versions(f"name = '{spec.registered_model_name}'")}
    assert left == {base.version, comp.version}
    # the scan is idempotent
    again = tracking.scan_study(store, exp, spec)
    assert set(again.done) == set(state.done) and not again.interrupted and not again.deleted_versions

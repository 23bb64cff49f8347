"""MLflow side: metric keys, logging + registration order, resume bookkeeping.

These tests use a temporary SQLite store and hand-made task results (no
training); the end-to-end test in tests/e2e drives the real jobs through Ray.
"""

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus

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
    client = tracking.configure_tracking(uri)
    yield client


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
        train_split=pd.DataFrame({"example_id": np.arange(60, dtype=np.int64), "label": np.arange(60) % 4, "ink": np.arange(60) % 2}),
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


def test_logged_run_has_tags_metrics_artifacts_and_a_registered_version(store, tmp_path):
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
    assert {"predictions.csv", "rates/per_class.csv", "rates/per_group.csv"} <= names  # what MLflow's viewer previews
    assert "model" not in names  # the model lives in its LoggedModel's own artifact location
    back = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=comp.run_id, artifact_path="predictions.parquet",
                                                               tracking_uri=store.tracking_uri))
    assert list(back.columns[:4]) == ["example_id", "label", "pred", "prob"] and len(back) == 40

    mv = store.get_model_version(spec.registered_model_name, comp.version)
    for key in ("compbias.study", "compbias.role", "compbias.method", "compbias.level", "compbias.seed", "compbias.baseline_version", "compbias.ray_node"):
        assert mv.tags[key] == t[key]
    assert mv.run_id == comp.run_id
    # registered from the run's LoggedModel, whose MLmodel records the model, the run and the lineage tags
    lm = store.get_logged_model(comp.model_id)
    assert mv.source == f"models:/{comp.model_id}" and lm.source_run_id == comp.run_id and lm.status == LoggedModelStatus.READY
    assert lm.tags["compbias.baseline_version"] == base.version
    assert {m.key for m in lm.metrics} >= {"acc", "sparsity", "fpr/class/0", "loss"}
    mlmodel = yaml.safe_load(open(mlflow.artifacts.download_artifacts(f"{lm.artifact_location}/MLmodel", dst_path=str(tmp_path))))
    assert (mlmodel["model_id"], mlmodel["run_id"]) == (comp.model_id, comp.run_id)
    assert mlmodel["metadata"]["compbias"]["role"] == "compressed" and mlmodel["metadata"]["compbias"]["seed"] == "0"
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and pyfunc["model_code_path"].endswith("pyfunc_model.py")
    assert "python_model.pkl" not in json.dumps(mlmodel)  # models from code: nothing pickled
    assert json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    req_file = mlflow.artifacts.download_artifacts(f"{lm.artifact_location}/requirements.txt", dst_path=str(tmp_path / "r"))
    pinned = open(req_file).read().splitlines()
    assert any(line.startswith("torch==") for line in pinned) and any(line.startswith("safetensors==") for line in pinned)
    # the run's inputs: the two splits; the compressed model's baseline as a model input
    inputs = store.get_run(comp.run_id).inputs
    assert sorted(t.value for i in inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context") == ["evaluation", "training"]
    assert [i.model_id for i in inputs.model_inputs] == [base.model_id]

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

    monkeypatch.setattr(tracking.runs, "finish_run", broken)  # what log_model_run calls
    with pytest.raises(RuntimeError, match="store went away"):
        tracking.log_model_run(store, exp, parent, spec, "x", _result(task))
    monkeypatch.setattr(tracking.runs, "finish_run", real)
    assert list(store.search_model_versions(f"name = '{spec.registered_model_name}'")) == []
    runs = store.search_runs([exp], "tags.`compbias.run_kind` = 'model'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "store went away" in runs[0].data.tags["compbias.error"]
    models = store.search_logged_models(experiment_ids=[exp])
    assert [(m.source_run_id, m.status) for m in models] == [(runs[0].info.run_id, LoggedModelStatus.FAILED)]


def test_logging_uses_the_given_client_not_the_process_tracking_uri(store, tmp_path, monkeypatch):
    """MLflow's SQL registry resolves a models:/<model_id> source with the process's URI; the client's store must still be used."""
    spec = parse_study({**STUDY, "name": "trk-uri"})
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)  # the process's URI names another store
    exp = tracking.ensure_experiment(store, spec.experiment_name)
    tracking.ensure_registered_model(store, spec)
    parent = tracking.start_parent_run(store, exp, spec, "x")
    fm = tracking.log_model_run(store, exp, parent, spec, "x", _result(plan_study(spec)[0]))
    assert mlflow.get_tracking_uri() == other  # left as it was
    assert os.environ["MLFLOW_TRACKING_URI"] == other
    mv = store.get_model_version(spec.registered_model_name, fm.version)
    assert mv.source == f"models:/{fm.model_id}" and store.get_logged_model(fm.model_id).source_run_id == fm.run_id
    assert store.get_run(fm.run_id).info.status == "FINISHED"


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
    half_logged = store.create_logged_model(exp, name="baseline@0-s1", source_run_id=dangling.info.run_id)  # killed mid-upload
    store.log_outputs(dangling.info.run_id, [LoggedModelOutput(half_logged.model_id, 0)])
    # a version whose run failed (registration raced a crash)
    failed_run = store.create_run(exp, tags=tracking.model_tags(spec, task1, node_id="n"))
    store.set_terminated(failed_run.info.run_id, "FAILED")
    orphan = store.create_model_version(spec.registered_model_name, source=f"{failed_run.info.artifact_uri}/model", run_id=failed_run.info.run_id)

    state = tracking.scan_study(store, exp, spec)
    assert set(state.done) == {base.key, comp.key}
    assert state.done[comp.key].version == comp.version and state.done[comp.key].resumed
    assert state.done[comp.key].model_id == comp.model_id and state.done[base.key].model_id == base.model_id
    assert store.get_logged_model(half_logged.model_id).status == LoggedModelStatus.FAILED
    assert store.get_logged_model(comp.model_id).status == LoggedModelStatus.READY
    assert dangling.info.run_id in state.interrupted and parent in state.interrupted
    assert store.get_run(dangling.info.run_id).info.status == "FAILED"
    assert state.deleted_versions == [str(orphan.version)]
    left = {str(v.version) for v in store.search_model_versions(f"name = '{spec.registered_model_name}'")}
    assert left == {base.version, comp.version}
    # the scan is idempotent
    again = tracking.scan_study(store, exp, spec)
    assert set(again.done) == set(state.done) and not again.interrupted and not again.deleted_versions


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_sqlite_store_configured_by_compbias_is_in_wal_mode(tmp_path):
    import sqlite3

    import sqlalchemy

    db = tmp_path / "new" / "mlflow.db"
    db.parent.mkdir()
    tracking.configure_tracking(f"sqlite:///{db}").search_experiments()  # a new store: MLflow creates its tables
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent: every later user gets it
        assert con.execute("SELECT count(*) FROM experiments").fetchone()[0] == 1
    finally:
        con.close()
    # this process's connections to the store skip the per-commit sync; other SQLite files keep SQLite's default (FULL)
    for path, expected in ((db, 1), (tmp_path / "other.db", 2)):
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == expected, path
        engine.dispose()
    assert tracking.sqlite_store_path(f"sqlite:///{db}") == db
    assert tracking.sqlite_store_path("http://127.0.0.1:5000") is None
    assert tracking.sqlite_store_path("sqlite://") is None and tracking.sqlite_store_path("sqlite:///:memory:") is None
    assert not tracking.use_sqlite_wal(f"sqlite:///{tmp_path / 'missing-dir' / 'mlflow.db'}")  # MLflow reports that itself


_WRITER = """
import importlib.util, sys
sys.path.insert(0, {repo!r})
spec = importlib.util.spec_from_file_location("tt", {test_file!r})
tt = importlib.util.module_from_spec(spec); spec.loader.exec_module(tt)
from compbias.platform import tracking
from compbias.platform.config import parse_study
from compbias.platform.plan import plan_study
study = parse_study({{**tt.STUDY, "name": sys.argv[2], "population": {{"seeds": 3}}}})
client = tracking.configure_tracking(sys.argv[1])
exp = tracking.ensure_experiment(client, study.experiment_name)
tracking.ensure_registered_model(client, study)
parent = tracking.start_parent_run(client, exp, study, "x")
# both writers start logging together (imports take seconds and vary)
import pathlib, time
pathlib.Path(f"ready-{{sys.argv[2]}}").touch()
deadline = time.monotonic() + 120
while len(list(pathlib.Path().glob("ready-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
base = {{}}
for task in plan_study(study):
    fm = tracking.log_model_run(client, exp, parent, study, "x", tt._result(task), baseline=base.get(task.baseline_key))
    base[task.key] = fm
tracking.finish_run(client, parent, True)
print("logged", len(base))
print("scratch", tracking.scratch_dir())
"""


def test_two_processes_logging_at_once_to_one_wal_store_lose_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.configure_tracking(uri).search_experiments()  # the schema exists before the two writers start
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(repo=str(Path(__file__).resolve().parents[2]), test_file=str(Path(__file__).resolve())))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    env["COMPBIAS_ARTIFACT_ROOT"] = str(tmp_path / "artifacts")
    procs = [subprocess.Popen([sys.executable, str(script), uri, name], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("left", "right")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "logged 6" in out, out[-3000:]
        assert "database is locked" not in out, out[-3000:]
        scratch = Path(out.split("scratch ")[-1].strip())
        assert scratch.name.startswith("compbias-pyfunc-") and not scratch.exists()  # removed when the process ended
    client = MlflowClient(uri, uri)
    for name in ("left", "right"):
        exp = client.get_experiment_by_name(f"compbias/{name}").experiment_id
        runs = client.search_runs([exp], "tags.`compbias.run_kind` = 'model'")
        assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
        versions = list(client.search_model_versions(f"name = 'compbias-{name}'"))
        assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
        assert all(len(r.data.params) >= 5 and "acc" in r.data.metrics for r in runs)
        models = client.search_logged_models(experiment_ids=[exp])
        assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)
        assert sorted(v.source for v in versions) == sorted(f"models:/{m.model_id}" for m in models)


def test_models_are_still_saved_after_the_code_copy_directory_is_removed(tmp_path):
    """A temp cleaner may empty /tmp under a long-running driver: the code copy shipped with each model is made again."""
    import shutil

    from mlflow.models import Model

    files = {"weights.safetensors": b"\x01" * 32, "model_spec.json": b"{}"}
    weights = tracking.write_model_files(files, tmp_path / "w" / "weights")
    tracking.save_pyfunc(tmp_path / "m0", weights, (1, 8, 8), Model())
    shutil.rmtree(tracking.scratch_dir())
    tracking.save_pyfunc(tmp_path / "m1", weights, (1, 8, 8), Model())
    assert _tree(tmp_path / "m1").keys() == _tree(tmp_path / "m0").keys()
    assert (tmp_path / "m1" / "code" / "compbias" / "jobs" / "__init__.py").is_file()
    assert (tmp_path / "m1" / "artifacts" / "weights" / "weights.safetensors").read_bytes() == files["weights.safetensors"]
    assert Model.load(str(tmp_path / "m1" / "MLmodel")).flavors["python_function"]["artifacts"]["weights"]["path"] == "artifacts/weights"


def test_configure_tracking_sets_no_process_wide_uri(tmp_path, monkeypatch):
    """Library code hands out an explicit client; MLflow's process globals and their environment variables stay as they were."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    uri = f"sqlite:///{tmp_path}/own.db"
    client = tracking.configure_tracking(uri)
    assert (client.tracking_uri, client._registry_uri) == (uri, uri)
    assert (tracking_utils._tracking_uri, registry_utils._registry_uri) == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    with tracking.scoped_tracking_uri(client):
        assert mlflow.get_tracking_uri() == uri
    assert (tracking_utils._tracking_uri, registry_utils._registry_uri) == before
    assert "MLFLOW_TRACKING_URI" not in os.environ

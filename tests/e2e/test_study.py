"""The digits study end to end: `compbias study` on a local Ray and a temporary SQLite store.

A reduced population (2 seeds, 1 epoch, two pruning levels and int8) goes
through the real CLI path, the real jobs code and the real MLflow store; the
test then checks what the audit and a user rely on: runs, tags, metrics,
artifacts, registered versions with lineage, a served model that predicts what
was logged, and resume (second run trains nothing; an interrupted run is
failed and replaced).
"""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import yaml
from mlflow import MlflowClient

from compbias.platform import cli
from compbias.platform.orchestration import init_ray

pytestmark = pytest.mark.slow

STUDY = {
    "name": "e2e-digits",
    "dataset": {"kind": "digits", "groups": ["ink"]},
    "train": {"epochs": 1},
    "population": {"seeds": 2},
    "compression": [
        {"method": "magnitude", "schedule": "gradual", "levels": [0.5, 0.9], "finetune_epochs": 1},
        {"method": "quantize", "levels": ["int8_weight"]},
    ],
}
N_MODELS = 2 * (1 + 2 + 1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for the whole test session."""
    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_cluster):
    d = tmp_path_factory.mktemp("study")
    path = d / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    uri = f"sqlite:///{d}/mlflow.db"
    code = cli.main(["study", str(path), "--tracking-uri", uri])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    yield {"path": path, "uri": uri, "client": client, "code": code}


def _model_runs(client, exp_id, status=None):
    runs = client.search_runs([exp_id], "tags.`compbias.run_kind` = 'model'", max_results=1000)
    return [r for r in runs if status is None or r.info.status == status]


def _versions(client):
    return list(client.search_model_versions("name = 'compbias-e2e-digits'"))


def test_study_logs_one_finished_run_per_model(study):
    assert study["code"] == 0
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/e2e-digits")
    runs = _model_runs(client, exp.experiment_id)
    assert len(runs) == N_MODELS and all(r.info.status == "FINISHED" for r in runs)
    keys = {(r.data.tags["compbias.seed"], r.data.tags["compbias.method"], r.data.tags["compbias.level"]) for r in runs}
    assert keys == {(s, m, lv) for s in ("0", "1") for m, lv in [("baseline", "0"), ("magnitude", "0.5"), ("magnitude", "0.9"), ("quantize", "int8_weight")]}
    parents = client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    nodes = {n["NodeID"] for n in ray.nodes()}
    assert {r.data.tags["compbias.ray_node"] for r in runs} <= nodes


def test_metrics_reflect_the_compression(study):
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/e2e-digits")
    by_key = {(r.data.tags["compbias.seed"], r.data.tags["compbias.method"], r.data.tags["compbias.level"]): r for r in _model_runs(client, exp.experiment_id)}
    for seed in ("0", "1"):
        base = by_key[(seed, "baseline", "0")].data.metrics
        assert 0.5 < base["acc"] <= 1.0
        assert {f"fpr/class/{c}" for c in range(10)} <= set(base) and {f"fnr/class/{c}" for c in range(10)} <= set(base)
        assert any(k.startswith("fpr/group/ink_") for k in base)
        assert base["sparsity"] == pytest.approx(0.0, abs=1e-3)
        assert base["pred_ties"] == 0  # float logits do not tie
        for level in (0.5, 0.9):
            m = by_key[(seed, "magnitude", str(level))].data.metrics
            assert m["sparsity"] == pytest.approx(level, abs=0.01)
        q = by_key[(seed, "quantize", "int8_weight")].data.metrics
        assert q["size_bytes"] < 0.5 * base["size_bytes"]


def test_artifacts_line_up_across_models(study):
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/e2e-digits")
    frames = []
    for r in _model_runs(client, exp.experiment_id):
        paths = {a.path for a in client.list_artifacts(r.info.run_id)} | {a.path for a in client.list_artifacts(r.info.run_id, "rates")}
        assert {"predictions.parquet", "study.yaml", "rates/per_class.parquet", "rates/per_group.parquet"} <= paths
        p = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="predictions.parquet", tracking_uri=study["uri"]))
        frames.append(p)
        acc = float((p["pred"] == p["label"]).mean())
        assert acc == pytest.approx(r.data.metrics["acc"])
    # each model carries the study as it ran (resolved: what the audit reloads the dataset from)
    from compbias.platform.config import load_study

    run_id = _model_runs(client, exp.experiment_id)[0].info.run_id
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="study.yaml", tracking_uri=study["uri"])
    assert yaml.safe_load(Path(local).read_text()) == load_study(study["path"]).resolved()
    ids = frames[0]["example_id"].to_numpy()
    assert all(np.array_equal(f["example_id"].to_numpy(), ids) and np.array_equal(f["label"], frames[0]["label"]) for f in frames)
    assert {"example_id", "label", "pred", "prob", "ink"} <= set(frames[0].columns)


def test_every_model_is_a_registered_version_with_lineage(study):
    client = study["client"]
    versions = _versions(client)
    assert len(versions) == N_MODELS
    by_run = {v.run_id: v for v in versions}
    baselines = {v.tags["compbias.seed"]: v for v in versions if v.tags["compbias.role"] == "baseline"}
    assert set(baselines) == {"0", "1"}
    for v in versions:
        run = client.get_run(v.run_id)
        for key in ("compbias.study", "compbias.role", "compbias.method", "compbias.level", "compbias.seed", "compbias.ray_node"):
            assert v.tags[key] == run.data.tags[key]
        if v.tags["compbias.role"] == "compressed":
            base = baselines[v.tags["compbias.seed"]]
            assert v.tags["compbias.baseline_version"] == str(base.version)
            assert v.tags["compbias.baseline_run_id"] == base.run_id
    assert len(by_run) == N_MODELS


def test_registered_model_loads_with_pyfunc_and_predicts_what_was_logged(study, monkeypatch):
    from compbias.jobs import load_dataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])  # a user's mlflow.pyfunc.load_model reads the store from it

    client = study["client"]
    v = next(v for v in _versions(client) if v.tags["compbias.method"] == "quantize")
    model = mlflow.pyfunc.load_model(f"models:/compbias-e2e-digits/{v.version}")
    bundle = load_dataset("digits", groups=["ink"])
    x = (bundle.test.images[:64].float() * bundle.test.scale).numpy()
    out = model.predict(x)
    logged = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="predictions.parquet", tracking_uri=study["uri"]))
    assert np.array_equal(out["pred"].to_numpy(), logged["pred"].to_numpy()[:64])
    assert np.allclose(out["prob"].to_numpy(), logged["prob"].to_numpy()[:64], atol=1e-5)
    # the version was registered from the run's LoggedModel (MLflow 3), whose artifacts hold the model
    exp = client.get_experiment_by_name("compbias/e2e-digits").experiment_id
    lm = next(m for m in client.search_logged_models(experiment_ids=[exp]) if m.source_run_id == v.run_id)
    assert v.source == f"models:/{lm.model_id}" and "MLmodel" in {a.path for a in client.list_logged_model_artifacts(lm.model_id)}
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/compbias-e2e-digits/{v.version}", tracking_uri=study["uri"]))
    assert list(local.rglob("weights.safetensors")) and not list(local.rglob("*.pkl"))


def test_second_execution_resumes_without_training(study):
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/e2e-digits")
    before = {r.info.run_id for r in _model_runs(client, exp.experiment_id)}
    assert cli.main(["study", str(study["path"]), "--tracking-uri", study["uri"]]) == 0
    after = {r.info.run_id for r in _model_runs(client, exp.experiment_id)}
    assert after == before
    assert len(_versions(client)) == N_MODELS
    parents = client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'study'", order_by=["start_time DESC"])
    assert parents[0].data.metrics["models_trained"] == 0 and parents[0].data.metrics["models_resumed"] == N_MODELS


def test_interrupted_run_is_failed_and_replaced(study):
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/e2e-digits")
    victim = next(
        r for r in _model_runs(client, exp.experiment_id, "FINISHED")
        if r.data.tags["compbias.seed"] == "1" and r.data.tags["compbias.level"] == "0.9"
    )
    victim_version = next(v for v in _versions(client) if v.run_id == victim.info.run_id)
    # simulate a driver killed after registering the version but before finishing the run
    client.update_run(victim.info.run_id, status="RUNNING")
    assert cli.main(["study", str(study["path"]), "--tracking-uri", study["uri"]]) == 0

    assert client.get_run(victim.info.run_id).info.status == "FAILED"
    assert str(victim_version.version) not in {str(v.version) for v in _versions(client)}
    finished = _model_runs(client, exp.experiment_id, "FINISHED")
    assert len(finished) == N_MODELS
    replacement = [r for r in finished if r.data.tags["compbias.seed"] == "1" and r.data.tags["compbias.level"] == "0.9"]
    assert len(replacement) == 1 and replacement[0].info.run_id != victim.info.run_id
    versions = _versions(client)
    assert len(versions) == N_MODELS
    new_v = next(v for v in versions if v.run_id == replacement[0].info.run_id)
    base_v = next(v for v in versions if v.tags["compbias.role"] == "baseline" and v.tags["compbias.seed"] == "1")
    assert new_v.tags["compbias.baseline_version"] == str(base_v.version)
    assert replacement[0].data.metrics["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_train_then_compress_as_separate_steps(tmp_path, ray_cluster):
    """`compbias train` makes baselines only; `compbias compress` compresses them (weights from MLflow)."""
    study = dict(STUDY, name="e2e-steps", population={"seeds": 1})
    path = tmp_path / "steps.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert cli.main(["train", str(path), "--tracking-uri", uri]) == 0
    versions = list(client.search_model_versions("name = 'compbias-e2e-steps'"))
    assert [v.tags["compbias.role"] for v in versions] == ["baseline"]
    assert cli.main(["compress", str(path), "--tracking-uri", uri, "--method", "quantize"]) == 0
    versions = list(client.search_model_versions("name = 'compbias-e2e-steps'"))
    comp = [v for v in versions if v.tags["compbias.role"] == "compressed"]
    assert [(v.tags["compbias.method"], v.tags["compbias.level"]) for v in comp] == [("quantize", "int8_weight")]
    base = next(v for v in versions if v.tags["compbias.role"] == "baseline")
    assert comp[0].tags["compbias.baseline_version"] == str(base.version)
    exp = client.get_experiment_by_name("compbias/e2e-steps")
    steps = sorted(r.data.tags["compbias.step"] for r in client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'study'"))
    assert steps == ["compress", "train"]

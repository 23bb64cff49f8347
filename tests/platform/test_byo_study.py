"""A study with the user's own architecture (a factory in their module) and Torch-Pruning, through the platform.

`compbias study --executor local` trains, compresses, logs and registers into a
private SQLite store; the registered weights then reload from the factory
reference and the safetensors alone (no pickle, no compbias model class) and
predict exactly what was logged.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from compbias import jobs
from compbias.platform import cli

from tests.jobs.byo_helpers import user_module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    mp = pytest.MonkeyPatch()
    name = user_module(d, mp, on_path=False)  # the user's module sits in the working directory
    spec = {
        "name": "byo-tiny",
        "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 300, "max_test": 200},
        "model": {"factory": f"{name}:tiny", "kwargs": {"hidden": 8}},
        "train": {"epochs": 1},
        "population": {"seeds": 1},
        "compression": [{"method": "torch_pruning", "levels": [0.5], "finetune_epochs": 1}],
        "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    }
    path = d / "byo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{d}/mlflow.db"
    mp.setenv("COMPBIAS_ARTIFACT_ROOT", str(d / "artifacts"))
    try:
        code = cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local"])
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        yield {"code": code, "client": client, "dir": d, "module": name, "uri": uri}
    finally:
        mp.undo()


def test_the_study_trains_compresses_and_registers(study):
    assert study["code"] == 0
    client = study["client"]
    exp = client.get_experiment_by_name("compbias/byo-tiny").experiment_id
    runs = client.search_runs([exp], "tags.`compbias.run_kind` = 'model'")
    assert sorted(r.data.tags["compbias.method"] for r in runs) == ["baseline", "torch_pruning"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["model.arch"] for r in runs} == {f"{study['module']}:tiny"}
    pruned = next(r for r in runs if r.data.tags["compbias.method"] == "torch_pruning").data.metrics
    # physical channel removal: fewer parameters, smaller stored size, a measured latency before and after
    assert pruned["params"] < 0.5 * pruned["baseline_params"]
    assert pruned["size_bytes"] < 0.5 * pruned["baseline_size_bytes"]
    assert pruned["latency_ms"] > 0 and pruned["baseline_latency_ms"] > 0
    assert len(list(client.search_model_versions("name = 'compbias-byo-tiny'"))) == 2


def test_registered_weights_reload_from_factory_and_safetensors(study, tmp_path, monkeypatch):
    client = study["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])  # MLflow's models:/ download asks the process's registry
    bundle = jobs.load_dataset("digits", groups=["ink"], max_train=300, max_test=200)
    x = bundle.test.batch(torch.arange(len(bundle.test)))[0]
    versions = list(client.search_model_versions("name = 'compbias-byo-tiny'"))
    for v in versions:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/compbias-byo-tiny/{v.version}",
                                                    dst_path=str(tmp_path / f"v{v.version}"), tracking_uri=study["uri"])
        weights = [p for p in __import__("pathlib").Path(local).rglob("weights.safetensors")]
        assert len(weights) == 1
        model = jobs.load_weights(weights[0])  # the file alone: its header names the factory and kwargs
        assert model.compbias_spec["arch"] == f"{study['module']}:tiny"
        pred = jobs.predict_logits(model, x).argmax(axis=1)
        logged = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="predictions.parquet",
                                                                     tracking_uri=study["uri"]))
        np.testing.assert_array_equal(logged.sort_values("example_id")["pred"].to_numpy(), pred)
        if client.get_run(v.run_id).data.tags["compbias.method"] == "torch_pruning":
            assert model.features[0].out_channels == 4  # rebuilt at the pruned shapes


def test_a_factory_with_the_wrong_number_of_classes_is_refused_before_anything_trains_or_is_logged(tmp_path, monkeypatch, capsys):
    name = user_module(tmp_path, monkeypatch)
    spec = {
        "name": "byo-bad",
        "dataset": {"kind": "digits", "max_train": 100, "max_test": 50},
        "model": {"factory": f"{name}:tiny", "kwargs": {"num_classes": 4}},
        "population": {"seeds": 1},
        "compression": [{"method": "torch_pruning", "levels": [0.5]}],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("COMPBIAS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setattr(jobs, "train_model", lambda *a, **k: pytest.fail("trained a model whose outputs are wrong"))
    assert cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs shape (2, 4) on a batch of 2; the dataset has 10 classes" in err[0]
    assert "num_classes: 10" in err[0]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_experiment_by_name("compbias/byo-bad") is None  # nothing logged
    assert list(client.search_model_versions("name = 'compbias-byo-bad'")) == []

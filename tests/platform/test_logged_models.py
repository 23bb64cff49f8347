"""What a user sees of a study in MLflow 3: LoggedModels, registered versions, dataset inputs, viewable tables.

One tiny real study (digits, 1 seed, 1 epoch on 300 examples: a baseline and
one pruned model) is run through ``compbias study --executor local`` into a
private SQLite store; the tests read it back with MLflow's own client, as the
MLflow UI and a user's notebook would.
"""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from compbias import jobs
from compbias.platform import cli, tracking

STUDY = {
    "name": "lm-tiny",
    "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 300, "max_test": 200},
    "train": {"epochs": 1},
    "population": {"seeds": 1},
    "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 0}],
    "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
}
REGISTERED = "compbias-lm-tiny"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    path = d / "lm-tiny.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    uri = f"sqlite:///{d}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPBIAS_ARTIFACT_ROOT", str(d / "artifacts"))
    try:
        code = cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local"])
        assert code == 0
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name("compbias/lm-tiny").experiment_id
        runs = client.search_runs([exp], "tags.`compbias.run_kind` = 'model'")
        yield {"client": client, "exp": exp, "runs": {r.info.run_id: r for r in runs}, "uri": uri}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def bundle():
    ds = STUDY["dataset"]
    return jobs.load_dataset("digits", groups=ds["groups"], max_train=ds["max_train"], max_test=ds["max_test"])


def _models(client, exp):
    return client.search_logged_models(experiment_ids=[exp])


def test_every_model_run_has_one_ready_logged_model_with_its_metrics(study):
    client, runs = study["client"], study["runs"]
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    models = _models(client, study["exp"])
    assert len(models) == 2
    by_run = {m.source_run_id: m for m in models}
    assert set(by_run) == set(runs)  # one per run, each linked to its run
    for rid, m in by_run.items():
        run = runs[rid]
        assert m.status == LoggedModelStatus.READY
        assert m.name == run.info.run_name.replace(".", "_")  # e.g. magnitude@0_5-s0: MLflow refuses "." in model names
        assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id]  # the run lists it as its output
        metrics = {x.key: x for x in m.metrics}
        # the model carries the run's metrics, same values
        for key in ("acc", "sparsity", "size_bytes", "fpr/class/3", "acc/group/ink_1"):
            assert metrics[key].value == pytest.approx(run.data.metrics[key]), key
        assert m.tags["compbias.method"] == run.data.tags["compbias.method"]
        assert m.params["seed"] == run.data.params["seed"] == "0"
        # the evaluation metrics are linked to the test split, the model's size to no dataset
        test_input = next(i.dataset for i in run.inputs.dataset_inputs if _context(i) == "evaluation")
        assert (metrics["acc"].dataset_name, metrics["acc"].dataset_digest) == ("digits-test", test_input.digest)
        assert metrics["size_bytes"].dataset_name is None


def _context(dataset_input):
    return {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context")


def test_each_version_is_registered_from_its_logged_model(study):
    client, runs = study["client"], study["runs"]
    models = {m.source_run_id: m for m in _models(client, study["exp"])}
    versions = list(client.search_model_versions(f"name = '{REGISTERED}'"))
    assert len(versions) == 2 and {v.run_id for v in versions} == set(runs)
    for v in versions:
        m = models[v.run_id]
        assert v.source == f"models:/{m.model_id}"
        assert v.model_id in (None, m.model_id)
        assert json.loads(m.tags["mlflow.modelVersions"]) == [{"name": REGISTERED, "version": str(v.version)}]
    # lineage: the pruned model's run names its baseline's LoggedModel as a model input
    comp = next(r for r in runs.values() if r.data.tags["compbias.role"] == "compressed")
    base = next(r for r in runs.values() if r.data.tags["compbias.role"] == "baseline")
    comp_inputs = client.get_run(comp.info.run_id).inputs  # the run page (search_runs leaves model inputs out)
    assert [i.model_id for i in comp_inputs.model_inputs] == [models[base.info.run_id].model_id]
    assert client.get_run(base.info.run_id).inputs.model_inputs == []


def test_a_registered_version_loads_and_predicts_what_compbias_jobs_predicts(study, bundle, monkeypatch):
    client = study["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])  # a user's mlflow.pyfunc.load_model reads the store from it
    idx = torch.arange(0, 200, 17)
    x, _ = bundle.test.batch(idx)
    for v in client.search_model_versions(f"name = '{REGISTERED}'"):
        served = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/{v.version}")
        out = served.predict(x.numpy())
        files = tracking.version_model_files(REGISTERED, str(v.version), client=client)
        assert set(files) >= {"weights.safetensors", "model_spec.json"}
        with_jobs = jobs.predict_logits(_load(files), x).argmax(axis=1)
        np.testing.assert_array_equal(out["pred"].to_numpy(), with_jobs)
        logged = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="predictions.parquet",
                                                                     tracking_uri=study["uri"]))
        np.testing.assert_array_equal(logged.set_index("example_id").loc[idx.numpy(), "pred"].to_numpy(), with_jobs)


def _load(files):
    import tempfile

    from compbias.platform.tasks import write_model_files

    with tempfile.TemporaryDirectory() as tmp:
        loaded = jobs.load_model(write_model_files(files, tmp))
    return loaded[0] if isinstance(loaded, tuple) else loaded


def test_each_model_run_has_its_train_and_test_splits_as_dataset_inputs(study, bundle):
    for run in study["runs"].values():
        inputs = {_context(i): i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "evaluation"}
        assert inputs["training"].name == "digits-train" and inputs["evaluation"].name == "digits-test"
        assert json.loads(inputs["training"].profile)["num_rows"] == len(bundle.train_frame) == 300
        assert json.loads(inputs["evaluation"].profile)["num_rows"] == len(bundle.test_frame) == 200
        cols = [c["name"] for c in json.loads(inputs["evaluation"].schema)["mlflow_colspec"]]
        assert cols == ["example_id", "label", "ink"]  # ids, labels and groups: no predictions, no images
        assert "sklearn digits" in inputs["training"].source
    # every model of the study used the same two splits
    digests = {(i.dataset.name, i.dataset.digest) for r in study["runs"].values() for i in r.inputs.dataset_inputs}
    assert len(digests) == 2


def test_the_csv_twins_hold_the_same_tables_as_the_parquet_files(study):
    for rid in study["runs"]:
        for stem in ("predictions", "rates/per_class", "rates/per_group"):
            pq = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=f"{stem}.parquet", tracking_uri=study["uri"]))
            # text columns stay text ("0".."9" class names would otherwise be read as numbers)
            text = {c: str for c in pq.columns if pd.api.types.is_string_dtype(pq[c])}
            csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=f"{stem}.csv", tracking_uri=study["uri"]),
                              dtype=text)
            assert len(pq) > 0, stem
            assert list(csv.columns) == list(pq.columns), stem
            pd.testing.assert_frame_equal(csv, pq, check_dtype=False, check_exact=True, obj=stem)

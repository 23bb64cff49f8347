"""The study driver when tasks fail: failures are recorded, nothing half-made is registered."""

import errno

import yaml
from mlflow import MlflowClient

from compbias.platform import cli
from compbias.platform.study_outcome import storage_exhausted


def test_a_failing_dataset_fails_every_task_visibly_and_registers_nothing(tmp_path, capsys):
    empty_root = tmp_path / "images"
    empty_root.mkdir()
    study = {
        "name": "broken",
        "dataset": {"kind": "imagefolder", "root": str(empty_root)},
        "population": {"seeds": 1},
        "compression": [{"method": "quantize", "levels": ["fp16"]}],
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    assert cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local"]) == 1
    err = capsys.readouterr().err
    assert "failed: seed=0 baseline@0" in err and "failed: seed=0 quantize@fp16" in err

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("compbias/broken")
    parent = client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'study'")[0]
    assert parent.info.status == "FAILED" and parent.data.metrics["models_failed"] == 2
    runs = client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'model'")
    assert sorted(r.data.tags["compbias.method"] for r in runs) == ["baseline", "quantize"]
    assert all(r.info.status == "FAILED" and r.data.tags["compbias.error"] for r in runs)
    assert "baseline" in next(r for r in runs if r.data.tags["compbias.method"] == "quantize").data.tags["compbias.error"]
    assert list(client.search_model_versions("name = 'compbias-broken'")) == []


def test_storage_exhausted_finds_a_full_or_read_only_disk_behind_a_logging_error():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("log_artifacts failed") from exc
    except RuntimeError as wrapped:
        assert storage_exhausted(wrapped) is full  # followed through __cause__
    read_only = OSError(errno.EROFS, "Read-only file system")
    assert storage_exhausted(read_only) is read_only
    assert storage_exhausted(OSError(errno.ENOENT, "No such file")) is None  # other OS errors fail one model only
    assert storage_exhausted(RuntimeError("no OS error at all")) is None


def test_the_executor_resource_params_are_recorded_on_the_study_parent_run(tmp_path, monkeypatch):
    # what gpus_per_task: auto chose (RayExecutor.resource_params) lands on the parent run;
    # the local executor reports nothing of its own, so a fake stands in for the Ray one here
    from compbias.platform.orchestration import LocalExecutor

    monkeypatch.setattr(LocalExecutor, "resource_params",
                        lambda self: {"resources.gpu_share": "0.25", "resources.gpu_probe.device": "fake"})
    empty_root = tmp_path / "images"
    empty_root.mkdir()
    study = {"name": "shared", "dataset": {"kind": "imagefolder", "root": str(empty_root)}, "population": {"seeds": 1},
             "compression": [{"method": "quantize", "levels": ["fp16"]}]}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local"]) == 1  # the dataset fails: fast

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("compbias/shared")
    parent = client.search_runs([exp.experiment_id], "tags.`compbias.run_kind` = 'study'")[0]
    assert parent.data.params["resources.gpu_share"] == "0.25"
    assert parent.data.params["resources.gpu_probe.device"] == "fake"

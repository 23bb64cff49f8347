"""The fine-tuning learning rate of a compression entry reaches the job (issue 12: it could not be set)."""

from __future__ import annotations

import yaml

from compbias import jobs
from compbias.platform import cli


def test_a_study_files_finetune_lr_reaches_the_fine_tuning(tmp_path, monkeypatch, capsys):
    seen = []
    real = jobs.compress_model

    def spy(*args, **kwargs):
        seen.append((args[2], kwargs.get("lr")))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "compress_model", spy)
    monkeypatch.setenv("COMPBIAS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    study = {
        "name": "lr-study",
        "dataset": {"kind": "digits", "max_train": 120, "max_test": 60},
        "train": {"epochs": 1},
        "population": {"seeds": 1},
        "compression": [
            {"method": "magnitude", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 1, "finetune_lr": 0.003},
            {"method": "structured", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 1},
        ],
        "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    }
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["study", str(path), "--executor", "local", "--tracking-uri", uri]) == 0, capsys.readouterr().err
    assert sorted(seen) == [("magnitude", 0.003), ("structured", None)]  # unset: the job's own default

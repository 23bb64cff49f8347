"""Every dataset kind a study file accepts trains, registers and is audited.

A study that trains must be auditable (issue 13): for each kind not covered
elsewhere (digits: tests/e2e/test_contract_identity.py; imagefolder with a
class *name* as positive class: the same file) a tiny generated dataset in the
kind's own layout goes through ``compbias study`` and then ``compbias audit``;
every version gets a verdict (pass or fail, never error) and the audit reads
the classes, the positive class and the groups from ``member.json``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform import cli
from compbias.platform.audit import AuditOptions, Selection, run_audit
from tests.jobs.conftest import write_celeba

pytestmark = pytest.mark.slow

OPTIONS = dict(bootstrap=40, cie_fractions=(0.05,), similarity=False, gallery=False, figures=False, workers=1)


def _cifar(root: Path, kind: str, monkeypatch) -> None:
    """torchvision's python layout of CIFAR-10/100 with a learnable cue (the md5 check patched: files are generated)."""
    import torchvision

    rng = np.random.default_rng(3)
    n_classes = 10 if kind == "cifar10" else 100
    shown = 4  # only a few classes occur, so that one epoch learns something

    def batch(n):
        labels = rng.integers(0, shown, size=n)
        data = rng.integers(0, 100, size=(n, 3, 32, 32), dtype=np.uint8)
        data[np.arange(n), labels % 3] += 120  # colour channel by class
        return data.reshape(n, 3072), [int(x) for x in labels]

    if kind == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for name, n in [*[(f"data_batch_{i}", 24) for i in range(1, 6)], ("test_batch", 80)]:
            data, labels = batch(n)
            with open(base / name, "wb") as fh:
                pickle.dump({"data": data, "labels": labels}, fh)
        with open(base / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [f"c{i}" for i in range(n_classes)]}, fh)
        monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        for name, n in (("train", 120), ("test", 80)):
            data, labels = batch(n)
            with open(base / name, "wb") as fh:
                pickle.dump({"data": data, "fine_labels": labels}, fh)
        with open(base / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"f{i}" for i in range(n_classes)]}, fh)
        monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


CASES = {
    # CelebA's official layout, the label and the positive class given by *name*, a group attribute
    "celeba": ({"kind": "celeba", "target": "Blond_Hair", "groups": ["Male"], "positive_class": "Blond_Hair",
                "test_fraction": 0.5}, 2, 1, ["Male"]),
    # the same, its images left in their files and decoded per batch (a dataset too large for memory)
    "celeba-files": ({"kind": "celeba", "target": "Blond_Hair", "groups": ["Male"], "positive_class": "Blond_Hair",
                      "test_fraction": 0.5, "in_memory": False}, 2, 1, ["Male"]),
    "cifar10": ({"kind": "cifar10"}, 10, None, []),
    "cifar100": ({"kind": "cifar100"}, 100, None, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_study_of_every_dataset_kind_is_audited(case, tmp_path, monkeypatch, capsys):
    dataset, n_classes, positive, groups = CASES[case]
    kind = dataset["kind"]
    root = tmp_path / kind
    if kind == "celeba":
        write_celeba(root, n=96)
    else:
        _cifar(root, kind, monkeypatch)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root lands here
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    study = {
        "name": f"kind-{case}",
        "dataset": {**dataset, "root": str(root)},
        "model": {"arch": "smallcnn"},
        "train": {"epochs": 1, "batch_size": 32},
        "population": {"seeds": 2},
        "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 0},
                        {"method": "quantize", "levels": ["int8_static" if case == "celeba-files" else "int8_weight"]}],
        "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["study", str(path), "--executor", "local", "--tracking-uri", uri]) == 0, capsys.readouterr().err
    client = MlflowClient(uri, uri)
    name = f"compbias-kind-{case}"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 6
    run_dir = Path(client.get_run(versions[0].run_id).info.artifact_uri.replace("file://", ""))
    info = json.loads((run_dir / C.MEMBER_FILE).read_text())
    assert info["num_classes"] == n_classes and info["positive_class"] == positive
    assert info["groups"] == groups
    (res,) = run_audit(client, Selection(registered_model=name), AuditOptions(cache_dir=tmp_path / "audit", **OPTIONS))
    assert len(res.statuses) == 6 and set(res.statuses.values()) <= {"pass", "fail"}, res.reasons
    metrics = client.get_run(res.run_id).data.metrics
    level = "int8_static" if case == "celeba-files" else "int8_weight"  # int8_static calibrates on training batches
    assert {"acc/baseline", "acc/magnitude/0.5", f"acc/quantize/{level}"} <= set(metrics)

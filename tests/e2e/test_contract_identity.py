"""The population contract has two writers and one reader: they must agree.

A tiny digits population written by ``compbias study`` and the very same
predictions re-registered with ``compbias register`` (into another registered
model) are audited identically: the same status per version and the same key
numbers.  And a study whose ``positive_class`` is a class *name* (an
ImageFolder study) is audited, with and without the ``member.json`` that
carries the resolved class id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform import cli
from compbias.platform.audit import AuditOptions, Selection, run_audit

pytestmark = pytest.mark.slow

STUDY = {
    "name": "ident",
    "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 300, "max_test": 200},
    "train": {"epochs": 1},
    "population": {"seeds": 2},
    "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.9], "finetune_epochs": 0}],
    "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
}

#: what the study file would otherwise set: given to both audits alike
OPTIONS = dict(bootstrap=40, cie_fractions=(0.05,), similarity=False, gallery=False, figures=False, workers=1)

KEY_METRICS = ("acc", "acc_drop", "cev", "sde", "worst_group", "worst_group_fpr_change", "cie_acc_top1pct")


def _artifacts(client, run_id) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract-identity")
    cwd = os.getcwd()
    os.chdir(d)  # MLflow's default artifact root (./mlruns) lands here
    yield d
    os.chdir(cwd)


def _audit(client, name, cache):
    (res,) = run_audit(client, Selection(registered_model=name), AuditOptions(cache_dir=cache, **OPTIONS))
    return res


def _by_member(client, res) -> dict:
    """``(seed, population) -> (status, key figures)`` from the audited versions' tags."""
    out = {}
    for key, status in res.statuses.items():
        name, version = key.split("/")
        tags = client.get_model_version(name, version).tags
        member = C.Member.from_tags(tags)
        figures = {k: tags.get(f"{C.AUDIT_PREFIX}{k}") for k in KEY_METRICS}
        out[(member.seed, member.role, member.population if member.role == "compressed" else "baseline")] = (status, figures)
    return out


def test_a_study_population_and_its_re_registration_are_audited_identically(workdir, capsys):
    uri = f"sqlite:///{workdir}/mlflow.db"
    path = workdir / "ident.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    assert cli.main(["study", str(path), "--executor", "local", "--tracking-uri", uri]) == 0, capsys.readouterr().err
    client = MlflowClient(uri, uri)
    versions = sorted(client.search_model_versions("name = 'compbias-ident'"), key=lambda v: int(v.version))
    assert len(versions) == 4

    # every version the study registered is a contract member with its member.json
    for v in versions:
        member = C.Member.from_tags(v.tags)
        assert member.source == "study" and v.tags[C.SCHEMA] == C.SCHEMA_VERSION
        info = C.MemberInfo.from_json((_artifacts(client, v.run_id) / C.MEMBER_FILE).read_text())
        assert info == C.MemberInfo(num_classes=10, class_names=[str(i) for i in range(10)], groups=["ink"])

    # the same predictions, registered by the user's path into another registered model
    new_base = {}
    for v in sorted(versions, key=lambda v: v.tags[C.ROLE] != "baseline"):
        member = C.Member.from_tags(v.tags)
        table = _artifacts(client, v.run_id) / C.PREDICTIONS
        args = ["register", str(table), "--study", "ident", "--role", member.role, "--seed", str(member.seed),
                "--registered-model", "ident-byo", "--tracking-uri", uri]
        if member.role == "baseline":
            args += ["--num-classes", "10"]
        else:
            args += ["--method", member.method, "--level", member.level, "--baseline-version", new_base[member.seed]]
        assert cli.main(args) == 0, capsys.readouterr().err
        said = capsys.readouterr().out
        if member.role == "baseline":
            new_base[member.seed] = said.split(" version ")[1].split()[0]

    study_res = _audit(client, "compbias-ident", workdir / "cache-a")
    byo_res = _audit(client, "ident-byo", workdir / "cache-b")
    a, b = _by_member(client, study_res), _by_member(client, byo_res)
    assert len(a) == 4 and a.keys() == b.keys()
    assert {s for s, _ in a.values()} <= {"pass", "fail"}
    assert a == b
    ma, mb = client.get_run(study_res.run_id).data.metrics, client.get_run(byo_res.run_id).data.metrics
    shared = [k for k in ma if k.startswith(("acc/", "cev/", "sde/", "pie/", "cie/", "fpr/", "fnr/"))]
    assert len(shared) > 10 and not [k for k in shared if k not in mb]
    assert {k: ma[k] for k in shared} == pytest.approx({k: mb[k] for k in shared}, nan_ok=True)
    assert study_res.summary == byo_res.summary


# ------------------------------------------------------------------------------------------- ImageFolder


def _imagefolder(root: Path, per_class: int = 24) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for k, c in enumerate(("cat", "dog")):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (8, 8, 3), dtype=np.uint8)
            img[..., k] += 120  # a learnable colour cue
            Image.fromarray(img).save(root / c / f"{i}.png")
            rows.append({"path": f"{c}/{i}.png", "site": i % 2})
    pd.DataFrame(rows).to_csv(root / "attributes.csv", index=False)


def test_an_imagefolder_study_with_a_class_name_as_positive_class_is_audited(workdir, capsys):
    root = workdir / "pets"
    _imagefolder(root)
    study = {
        "name": "pets",
        "dataset": {"kind": "imagefolder", "root": str(root), "attributes_csv": "attributes.csv", "groups": ["site"],
                    "positive_class": "dog", "test_fraction": 0.5},
        "model": {"arch": "smallcnn"},
        "train": {"epochs": 1},
        "population": {"seeds": 2},
        "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 0}],
        "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    }
    path = workdir / "pets.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{workdir}/pets.db"
    assert cli.main(["study", str(path), "--executor", "local", "--tracking-uri", uri]) == 0, capsys.readouterr().err
    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name = 'compbias-pets'")
    info = json.loads((_artifacts(client, versions[0].run_id) / C.MEMBER_FILE).read_text())
    assert info["class_names"] == ["cat", "dog"] and info["positive_class"] == 1 and info["groups"] == ["site"]

    opts = AuditOptions(cache_dir=workdir / "cache-pets", **OPTIONS)
    (res,) = run_audit(client, Selection(registered_model="compbias-pets"), opts)
    assert len(res.statuses) == 4 and set(res.statuses.values()) <= {"pass", "fail"}, res.reasons
    metrics = client.get_run(res.run_id).data.metrics
    assert "acc/magnitude/0.5" in metrics and "acc/baseline" in metrics

    # a study logged before member.json existed: the name is resolved from the class names its runs logged
    for v in versions:
        (_artifacts(client, v.run_id) / C.MEMBER_FILE).unlink()
    opts_old = AuditOptions(cache_dir=workdir / "cache-pets-old", **OPTIONS)
    (old,) = run_audit(client, Selection(registered_model="compbias-pets", force=True), opts_old)
    assert old.statuses == res.statuses, old.reasons
    old_metrics = client.get_run(old.run_id).data.metrics
    keys = [k for k in metrics if k.startswith(("cev/", "sde/", "worst_group", "acc/", "pie/"))]
    assert keys and {k: old_metrics[k] for k in keys} == pytest.approx({k: metrics[k] for k in keys}, nan_ok=True)

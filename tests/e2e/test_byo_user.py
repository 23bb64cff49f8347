"""Issue 13's "Done when": a user with their own torch code and registry audits it with compbias.

``byo_user_script.py`` is the user: plain torch/torchvision/Torch-Pruning/
torchao/MLflow code with no compbias import (checked: it runs in a
subprocess that fails if any ``compbias`` module was imported).  It trains a
small torchvision ResNet for 3 seeds on a generated image folder with a
``site`` group, compresses each with ``torch.nn.utils.prune``, Torch-Pruning
and torchao int8, and registers the 12 versions (torch.export, state dict,
ONNX) with the documented lineage tags and no predictions.

Then ``compbias audit --evaluate spec.yaml --registered-model NAME`` (a
subprocess, exit 0) evaluates and audits them, and its numbers (per-version
accuracy, baseline and population accuracy, CEV, SDE, PIE, per-group FPR of
the positive class) equal those computed directly with
:mod:`compbias.metrics` on the predictions it logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

import compbias.metrics as M
from compbias import contract as C

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "byo_user_script.py"
NAME = "shapes-resnet"
STUDY = "byo-shapes"

RUN_WITHOUT_COMPBIAS = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
leaked = sorted(m for m in sys.modules if m == "compbias" or m.startswith("compbias."))
assert not leaked, f"the user script imported {leaked}"
"""


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env["COMPBIAS_CACHE_DIR"] = str(tmp / "cache")
    env.setdefault("NUMBA_CACHE_DIR", str(tmp / "numba"))
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("byo-user")
    env = _env(tmp)
    user = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_COMPBIAS, str(SCRIPT), "--tracking-uri", env["MLFLOW_TRACKING_URI"],
         "--data", str(tmp / "data"), "--name", NAME, "--study", STUDY, "--seeds", "3"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
    )
    assert user.returncode == 0, user.stderr[-4000:]
    registered = json.loads(user.stdout.strip().splitlines()[-1])["versions"]
    # the compbias side: an evaluation spec naming the image folder (a study file's dataset section)
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": {"kind": "imagefolder", "root": "data", "attributes_csv": "attributes.csv", "groups": ["site"],
                    "positive_class": "patch"},
        "batch_size": 64,
        "state_dict": {"factory": "byo_user_script:small_resnet", "kwargs": {"num_classes": 2},
                       "python_path": [str(HERE)]},
    }))
    audit = subprocess.run(
        [sys.executable, "-m", "compbias.platform.cli", "audit", "--evaluate", str(spec), "--registered-model", NAME,
         "--no-similarity", "--no-gallery", "--no-figures", "--bootstrap", "0", "--json"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
    )
    assert audit.returncode == 0, audit.stderr[-4000:]
    result = json.loads(audit.stdout.strip().splitlines()[-1])
    return {"tmp": tmp, "uri": env["MLFLOW_TRACKING_URI"], "registered": registered, "result": result,
            "stderr": audit.stderr}


def _predictions(client, run_id, tmp) -> pd.DataFrame:
    return pd.read_parquet(client.download_artifacts(run_id, C.PREDICTIONS, str(tmp)))


def test_every_version_is_evaluated_in_its_format_and_audited(audited):
    client = MlflowClient(audited["uri"], audited["uri"])
    statuses = audited["result"]["statuses"]
    assert set(statuses) == {f"{NAME}/{v['version']}" for v in audited["registered"]} and len(statuses) == 12
    assert set(statuses.values()) <= {"pass", "fail"}, audited["result"]["reasons"]
    kinds = {}
    for v in audited["registered"]:
        tags = client.get_model_version(NAME, v["version"]).tags
        assert tags[C.AUDIT_STATUS] == statuses[f"{NAME}/{v['version']}"]
        assert tags[C.AUDIT_RUN_ID] == audited["result"]["run_id"]
        kinds[v.get("compbias.method", "baseline")] = client.get_run(v["run_id"]).data.tags["compbias.evaluation.model_kind"]
    assert kinds == {"baseline": "pytorch-pt2", "torch_prune_l1": "pytorch-state-dict", "torch_pruning": "onnx",
                     "torchao_int8": "onnx"}
    info = C.MemberInfo.from_json(Path(client.download_artifacts(audited["registered"][0]["run_id"], C.MEMBER_FILE,
                                                                 str(audited["tmp"] / "m"))).read_text())
    assert info == C.MemberInfo(num_classes=2, class_names=("no_patch", "patch"), positive_class=1, groups=("site",))


def test_audit_numbers_equal_compbias_metrics_on_the_same_predictions(audited):
    client = MlflowClient(audited["uri"], audited["uri"])
    tmp = audited["tmp"] / "check"
    run = client.get_run(audited["result"]["run_id"])
    metrics = run.data.metrics
    models = pd.read_parquet(client.download_artifacts(run.info.run_id, "tables/models.parquet", str(tmp)))
    rates = pd.read_parquet(client.download_artifacts(run.info.run_id, "tables/rates.parquet", str(tmp)))
    pops: dict[tuple[str, str], list] = {}
    frames = {}
    for v in sorted(audited["registered"], key=lambda v: int(v["version"])):
        frames[v["version"]] = p = _predictions(client, v["run_id"], tmp / v["version"])
        key = ("baseline", "none") if v["compbias.role"] == "baseline" else (v["compbias.method"], v["compbias.level"])
        pops.setdefault(key, []).append(p)
    ref = frames[audited["registered"][0]["version"]]
    y = ref["label"].to_numpy()
    site = ref["site"].to_numpy()
    assert len(y) == 192 and set(np.unique(site)) == {0, 1}

    # per-version accuracy (compbias.metrics' confusion counts), version by version
    for v in audited["registered"]:
        p = frames[v["version"]]
        assert np.array_equal(p["label"].to_numpy(), y) and np.array_equal(p["example_id"].to_numpy(), ref["example_id"])
        direct = float(M.population_rates(y, p["pred"].to_numpy()[None, :], 2).accuracy[0])
        logged = models.loc[models["version"] == f"{NAME}/{v['version']}", "acc"]
        assert len(logged) == 1 and logged.iloc[0] == pytest.approx(direct, abs=1e-12)

    base = np.stack([p["pred"].to_numpy() for p in pops[("baseline", "none")]])
    base_acc = float(np.mean(M.population_rates(y, base, 2).accuracy))
    assert metrics["acc/baseline"] == pytest.approx(base_acc, abs=1e-12)
    assert base_acc > 0.6  # the generated task is learnable: the audit compares real models
    bias = pd.read_parquet(client.download_artifacts(run.info.run_id, "tables/bias.parquet", str(tmp)))
    checked = 0
    for (method, level), members in pops.items():
        if method == "baseline":
            continue
        comp = np.stack([p["pred"].to_numpy() for p in members])
        pk = f"{C.metric_key(method)}/{C.metric_key(level)}"
        assert metrics[f"acc/{pk}"] == pytest.approx(float(np.mean(M.population_rates(y, comp, 2).accuracy)), abs=1e-12)
        try:
            pb = M.population_bias(y, base, comp, 2)
        except ValueError as exc:
            # Which of these tiny models err on which class depends on the CPU's vector unit (AVX2
            # kernels train other models than AVX-512 ones). A baseline population that never
            # errs on a class leaves no class with a defined change: the audit must then log no
            # CEV/SDE, write NaN and the reason in the bias table, and not fail the audit.
            assert "none of the 2 classes has a defined change" in str(exc)
            assert f"cev/{pk}" not in metrics and f"sde/{pk}" not in metrics
            row = bias[(bias["method"] == method) & (bias["level"].astype(str) == level)]
            assert len(row) == 1 and np.isnan(row["cev"].iloc[0]) and np.isnan(row["sde"].iloc[0])
            assert row["cev_dropped_classes"].iloc[0].startswith("all")
        else:
            assert metrics[f"cev/{pk}"] == pytest.approx(pb.cev.value, rel=1e-9, abs=1e-12)
            assert metrics[f"sde/{pk}"] == pytest.approx(pb.sde.value, rel=1e-9, abs=1e-12)
        assert metrics[f"pie/{pk}"] == float(M.pie_mask(base, comp, 2).sum())
        # the positive class's FPR in each site group, averaged over the population's models
        g = M.population_rates(y, comp, 2, groups=site, n_groups=2)
        fpr = np.asarray(g.fpr, float)[:, :, 1].mean(axis=0)
        rows = rates[(rates["method"] == method) & (rates["level"].astype(str) == level) & (rates["scope"] == "group")]
        for code in (0, 1):
            row = rows[(rows["name"].astype(str) == f"site={code}") & (rows["metric"] == "fpr")]
            assert len(row) == 1, rows
            assert row["mean"].iloc[0] == pytest.approx(fpr[code], abs=1e-12)
        checked += 1
    assert checked == 3

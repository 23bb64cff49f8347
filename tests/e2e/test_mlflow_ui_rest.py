"""What the MLflow UI shows of compbias, read through the REST API the UI itself calls.

A real ``mlflow server`` (SQLite behind it, artifacts proxied) on a loopback
port (``devtools/services.py``). The tests write through it with compbias as a
user would, then read with plain HTTP requests, as the UI's pages do:

* ``POST /api/2.0/mlflow/runs/search`` with the parent filter: the audit's
  children, one per population, each with the same metric keys and the level
  as a param (what the compare view charts against each other);
* ``GET /api/2.0/mlflow/runs/get``: the audit run's evaluation dataset input
  and the model runs' training/evaluation inputs and LoggedModel outputs;
* ``GET /api/2.0/mlflow/metrics/get-history``: what a chart of one child plots;
* ``GET /api/2.0/mlflow/artifacts/list`` and ``GET /get-artifact``: the CSV
  twins the artifact viewer previews as tables (it does not preview parquet);
* ``POST /api/2.0/mlflow/logged-models/search``: the study's LoggedModels.
"""

from __future__ import annotations

import io
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.services import start_mlflow_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_mlflow_server(tmp_path_factory.mktemp("mlflow-ui-rest"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server, monkeypatch, tmp_path):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    return MlflowClient(server.url, server.url)


def api(server, method: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One JSON request to the server, as the UI sends it."""
    url = f"{server.url}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def get_bytes(server, endpoint: str, **query) -> bytes:
    with urllib.request.urlopen(f"{server.url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=60) as resp:
        return resp.read()


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: float(m["value"]) for m in run["data"].get("metrics", [])}


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def tags_of(obj: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in obj.get("tags", [])}


def children(server, experiment_id: str, parent: str) -> dict[str, dict]:
    out = api(server, "POST", "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": f"tags.`mlflow.parentRunId` = '{parent}'", "max_results": 100,
    })
    return {r["info"]["run_name"]: r for r in out.get("runs", [])}


def check_audit(server, run_id: str, populations: set[str], *, similarity: bool) -> tuple[dict, dict]:
    """The audit run and its children as the UI reads them; returns (parent, children by name)."""
    parent = api(server, "GET", "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert parent["info"]["status"] == "FINISHED"
    kids = children(server, parent["info"]["experiment_id"], run_id)
    assert set(kids) == populations
    keys = None
    for name, kid in kids.items():
        assert kid["info"]["status"] == "FINISHED", name
        assert int(kid["info"]["end_time"]) >= int(kid["info"]["start_time"]), name  # the UI shows its duration
        p, m = params_of(kid), metrics_of(kid)
        assert f"{p['method']}@{p['level']}" == name and float(p["sparsity"]) == m["sparsity"] == float(p["level"])
        # comparable: the same keys in every child, and the ones a chart of bias against level needs
        assert {"cev", "sde", "acc", "acc_drop", "pie", "worst_group_fpr_change", "cie_acc_top1pct",
                "gate_worst_excess_pp", "gate_overall_change_pp", "cev_ci_low", "cev_ci_high"} <= set(m), name
        assert any(k.startswith("svcca_") for k in m) == any(k.startswith("cka_") for k in m) == similarity
        keys = set(m) if keys is None else keys
        assert set(m) == keys, name
        # a chart of one child plots the value logged (the compare view reads the same history)
        hist = api(server, "GET", "/api/2.0/mlflow/metrics/get-history", run_id=kid["info"]["run_id"], metric_key="cev")
        assert [float(h["value"]) for h in hist["metrics"]] == [m["cev"]]
    # the evaluation set it audited, as a dataset input
    (di,) = parent["inputs"]["dataset_inputs"]
    assert tags_of(di) == {"mlflow.data.context": "evaluation"}
    assert di["dataset"]["name"] == "digits-test" and di["dataset"]["digest"]
    cols = [c["name"] for c in json.loads(di["dataset"]["schema"])["mlflow_colspec"]]
    assert cols[:2] == ["example_id", "label"] and "ink" in cols
    # the tables, previewable: CSV twins beside the parquet, served as the artifact viewer fetches them
    listed = api(server, "GET", "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="tables")
    names = {Path(f["path"]).name for f in listed["files"]}
    for stem in ("bias", "gate", "models", "versions", "rates"):
        assert {f"{stem}.parquet", f"{stem}.csv"} <= names, stem
    bias = pd.read_csv(io.BytesIO(get_bytes(server, "/get-artifact", path="tables/bias.csv", run_uuid=run_id)), dtype={"level": str})
    for name, kid in kids.items():
        row = bias[(bias["method"] + "@" + bias["level"]) == name]
        assert float(row["cev"].iloc[0]) == pytest.approx(metrics_of(kid)["cev"], rel=1e-9), name
    return parent, kids


def test_synthetic_audit_children_dataset_input_and_tables_through_rest(server, client, tmp_path, capsys):
    from compbias.platform.audit import AuditOptions, run_audit
    from compbias.platform.audit.synthetic import SyntheticStudy, register_synthetic_study

    spec = SyntheticStudy(name="rest-synth", n_examples=400, seeds=3, bootstrap=30,
                          methods={"magnitude": ["0.5", "0.9"]})
    register_synthetic_study(client, spec)
    opts = AuditOptions(cache_dir=tmp_path / "cache", similarity=False, gallery=False, workers=2)
    capsys.readouterr()
    (res,) = run_audit(client, options=opts)
    # MLflow prints two "View run ... at" lines per run it ends on a server: the audit's console shows its own, not a pair per child
    said = capsys.readouterr().out
    assert "View run audit-rest-synth" in said and "View run magnitude@" not in said
    parent, kids = check_audit(server, res.run_id, {"magnitude@0.5", "magnitude@0.9"}, similarity=False)
    # the injected bias grows with the level: what the compare view's CEV-against-sparsity chart shows
    assert metrics_of(kids["magnitude@0.9"])["cev"] > metrics_of(kids["magnitude@0.5"])["cev"] > 0
    # the parent keeps the folded keys of earlier dashboards
    assert metrics_of(parent)["cev/magnitude/0.9"] == pytest.approx(metrics_of(kids["magnitude@0.9"])["cev"])


TINY = {
    "name": "rest-tiny",
    "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 600, "max_test": 300},
    "train": {"epochs": 6, "batch_size": 64, "lr": 0.05},  # enough to learn every class: CEV is defined
    "population": {"seeds": 1},
    "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5, 0.9], "finetune_epochs": 0}],
    "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    "audit": {"bootstrap": 30, "probe_size": 32, "cie_fractions": [0.05]},
}


def test_real_study_logged_models_model_inputs_and_its_audit_through_rest(server, client, tmp_path):
    from compbias.platform import cli
    from compbias.platform.audit import AuditOptions, run_audit

    path = tmp_path / "rest-tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    assert cli.main(["study", str(path), "--tracking-uri", server.url, "--executor", "local"]) == 0
    exp = api(server, "GET", "/api/2.0/mlflow/experiments/get-by-name", experiment_name="compbias/rest-tiny")["experiment"]
    exp_id = exp["experiment_id"]
    model_runs = api(server, "POST", "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp_id], "filter": "tags.`compbias.run_kind` = 'model'", "max_results": 100})["runs"]
    assert len(model_runs) == 3
    # the LoggedModels page: one READY model per model run, produced by that run
    models = api(server, "POST", "/api/2.0/mlflow/logged-models/search", {"experiment_ids": [exp_id], "max_results": 50})["models"]
    by_run = {m["info"]["source_run_id"]: m for m in models}
    assert set(by_run) == {r["info"]["run_id"] for r in model_runs} and len(models) == 3
    assert {m["info"]["status"] for m in models} == {"LOGGED_MODEL_READY"}
    eval_digests = set()
    for r in model_runs:
        run = api(server, "GET", "/api/2.0/mlflow/runs/get", run_id=r["info"]["run_id"])["run"]
        inputs = {tags_of(i)["mlflow.data.context"]: i["dataset"] for i in run["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"training", "evaluation"}
        assert inputs["evaluation"]["name"] == "digits-test" and inputs["training"]["name"] == "digits-train"
        eval_digests.add(inputs["evaluation"]["digest"])
        assert [o["model_id"] for o in run["outputs"]["model_outputs"]] == [by_run[r["info"]["run_id"]]["info"]["model_id"]]
    assert len(eval_digests) == 1
    # the audit of that study: children with SVCCA/CKA (the models have weights), and the same evaluation set
    opts = AuditOptions(cache_dir=tmp_path / "cache", gallery=False, workers=2)
    (res,) = run_audit(client, options=opts)
    parent, _ = check_audit(server, res.run_id, {"magnitude@0.5", "magnitude@0.9"}, similarity=True)
    assert parent["info"]["experiment_id"] == exp_id
    (di,) = parent["inputs"]["dataset_inputs"]
    assert {di["dataset"]["digest"]} == eval_digests  # the audit audited the test set the models were evaluated on

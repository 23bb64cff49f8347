"""compbias.log_member / compbias register: what a good call writes (the bad ones: tests/reliability)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import compbias
from compbias import contract as C
from compbias.platform import cli

N = 30


def frame(seed=0, **cols) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 3
    pred = np.where(rng.random(N) < 0.2, (y + 1) % 3, y)
    out = pd.DataFrame({"example_id": np.arange(N)[::-1], "label": y[::-1], "pred": pred[::-1], "site": (np.arange(N) % 2)[::-1]})
    for k, v in cols.items():
        out[k] = v
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the user's store, as log_member reads it (nothing sets it process-wide)
    return {"uri": uri, "client": MlflowClient(uri, uri), "tmp": tmp_path}


def _artifact(client, run_id, path, tmp):
    from pathlib import Path

    return Path(client.download_artifacts(run_id, path, str(tmp)))


def test_without_an_active_run_a_finished_run_is_started_and_everything_written(store):
    client = store["client"]
    res = compbias.log_member(frame(), study="s", role="baseline", seed=0, registered_model_name="rm",
                              class_names=["a", "b", "c"])
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "compbias/s"
    assert C.Member.from_tags(run.data.tags) == res.member and run.data.tags[C.SOURCE] == "register"
    mv = client.get_model_version("rm", res.version)
    assert mv.run_id == res.run_id and C.Member.from_tags(mv.tags) == res.member and mv.source == run.info.artifact_uri
    names = {a.path for a in client.list_artifacts(res.run_id)}
    assert names == {C.PREDICTIONS, "predictions.csv", C.MEMBER_FILE}
    written = pd.read_parquet(_artifact(client, res.run_id, C.PREDICTIONS, store["tmp"]))
    assert written["example_id"].tolist() == list(range(N))  # sorted by example
    info = C.MemberInfo.from_json(_artifact(client, res.run_id, C.MEMBER_FILE, store["tmp"]).read_text())
    assert info == C.MemberInfo(num_classes=3, class_names=["a", "b", "c"], groups=["site"]) == res.info


def test_inside_the_users_run_and_a_compressed_member_inherits_the_population_facts(store):
    import mlflow

    client = store["client"]
    base = compbias.log_member(frame(), study="s", role="baseline", seed=1, registered_model_name="rm",
                               class_names=["a", "b", "c"], positive_class="c", groups=["site"])
    with mlflow.start_run() as run:
        res = compbias.log_member(frame(seed=5), study="s", role="compressed", seed=1, method="int8", level="w",
                                  baseline_run_id=base.run_id, registered_model_name="rm")
        assert res.run_id == run.info.run_id and client.get_run(run.info.run_id).info.status == "RUNNING"
    assert res.member.baseline_version == base.version and res.member.baseline_run_id == base.run_id
    assert res.info == base.info and res.info.positive_class == 2
    assert client.get_model_version("rm", res.version).tags[C.BASELINE_VERSION] == base.version


def test_the_version_points_at_the_users_logged_model(store):
    import mlflow
    from sklearn.dummy import DummyClassifier

    client = store["client"]
    model = DummyClassifier().fit(np.zeros((3, 1)), [0, 1, 2])
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(model, name="model")
        by_id = compbias.log_member(frame(), study="s", role="baseline", seed=0, registered_model_name="rm",
                                    model_uri=info.model_uri)
    with mlflow.start_run() as run2:
        info2 = mlflow.sklearn.log_model(model, name="clf")
        by_run = compbias.log_member(frame(), study="s", role="baseline", seed=1, registered_model_name="rm",
                                     model_uri=f"runs:/{run2.info.run_id}/clf")
    mv = client.get_model_version("rm", by_id.version)
    assert mv.source == f"models:/{info.model_id}" and mv.run_id == run.info.run_id  # predictions stay findable
    mv = client.get_model_version("rm", by_run.version)
    # as mlflow.register_model resolves runs:/ URIs: the run's model directory when it has an MLmodel, else the LoggedModel
    assert mv.source in (f"{client.get_run(run2.info.run_id).info.artifact_uri}/clf", f"models:/{info2.model_id}")
    assert mv.run_id == run2.info.run_id


def test_the_cli_attaches_to_an_existing_run_and_refuses_a_run_that_is_already_a_member(store, capsys):
    client = store["client"]
    exp = client.create_experiment("mine")
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id, "FINISHED")
    path = store["tmp"] / "p.parquet"
    frame().to_parquet(path, index=False)
    args = ["register", str(path), "--study", "s", "--role", "baseline", "--seed", "0", "--registered-model", "rm",
            "--run-id", run.info.run_id, "--tracking-uri", store["uri"]]
    assert cli.main(args) == 0, capsys.readouterr().err
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags[C.STUDY] == "s"
    assert [v.run_id for v in client.search_model_versions("name = 'rm'")] == [run.info.run_id]
    args[args.index("--seed") + 1] = "1"
    assert cli.main(args) == 2
    assert "already carries member tags" in capsys.readouterr().err
    assert len(client.search_model_versions("name = 'rm'")) == 1


def test_log_member_is_lazy():
    import subprocess
    import sys

    code = "import sys, compbias; assert 'mlflow' not in sys.modules; compbias.log_member; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

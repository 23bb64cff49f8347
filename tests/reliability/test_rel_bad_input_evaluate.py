"""Bad input to ``compbias audit --evaluate`` (bring your own models), through the command line.

Each case checks what the user sees (exit 2, ``compbias audit: ...`` lines on
stderr that name the problem and what to do, no traceback) and what MLflow is
left with: no predictions, ``member.json`` or evaluation tag on any run, no
``compbias.audit.*`` tag on any version, and no audit run (the command stops
before the audit).
"""

from __future__ import annotations

import argparse
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import cli
from compbias.platform.evaluate import EVALUATED_KIND

MODEL = "bad-eval"
N = 60


def _linear(out: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, out).eval()


def _tags(seed: int, **extra) -> dict:
    return {C.STUDY: "bad", C.ROLE: "baseline", C.SEED: str(seed), **extra}


@pytest.fixture(scope="module")
def _world(tmp_path_factory):
    """A store with one version per kind of bad model, an evaluation table and a valid spec.

    Made once: every case must leave it as it found it (that is what the cases check).
    """
    tmp_path = tmp_path_factory.mktemp("bad-evaluate")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()  # the user's store for their fluent mlflow calls below, undone at once
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("bad", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model(MODEL)
    example = np.zeros((2, 3), np.float32)
    versions = {}

    def logged(key, log, tags):
        with mlflow.start_run(experiment_id=exp) as run:
            source = log(run)
        mv = client.create_model_version(MODEL, source=source, run_id=run.info.run_id, tags=tags)
        versions[key] = (str(mv.version), run.info.run_id)

    logged("good", lambda run: mlflow.pytorch.log_model(_linear(), name="m", serialization_format="pt2",
                                                        input_example=example, pip_requirements=["torch"]).model_uri, _tags(0))
    logged("wide", lambda run: mlflow.pytorch.log_model(_linear(3), name="m", serialization_format="pt2",
                                                        input_example=example, pip_requirements=["torch"]).model_uri, _tags(1))
    logged("pickled", lambda run: mlflow.pytorch.log_model(_linear(), name="m", serialization_format="pickle",
                                                           pip_requirements=["torch"]).model_uri, _tags(2))

    def state_dict(run):
        mlflow.pytorch.log_state_dict(_linear().state_dict(), "sd")
        return f"{run.info.artifact_uri}/sd"

    logged("state_dict", state_dict, _tags(3))
    gone = tmp_path / "gone"
    gone.mkdir()
    logged("gone", lambda run: str(gone), _tags(4))
    shutil.rmtree(gone)
    logged("no_seed", state_dict, {C.STUDY: "bad", C.ROLE: "baseline"})
    mp.undo()
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"example_id": np.arange(N), "label": rng.integers(0, 2, N), "g": rng.integers(0, 2, N),
                          **{f"f{j}": rng.normal(size=N) for j in range(3)}})
    table.to_csv(tmp_path / "eval.csv", index=False)
    spec = {"table": {"path": "eval.csv", "features": ["f0", "f1", "f2"], "groups": ["g"]}, "num_classes": 2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {"client": client, "versions": versions, "tmp": tmp_path, "spec": spec, "table": table, "exp": exp, "uri": uri}


@pytest.fixture
def world(_world, monkeypatch):
    monkeypatch.chdir(_world["tmp"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _world["uri"])
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(_world["tmp"] / "cache"))
    return _world


def _write(world, name, content) -> str:
    path = world["tmp"] / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def _spec(world, **changes) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(world["spec"]))
    for key, value in changes.items():
        if key.startswith("table_"):
            spec["table"][key[len("table_"):]] = value
        else:
            spec[key] = value
    return spec


def _table(world, name, **columns) -> str:
    t = world["table"].copy()
    for col, value in columns.items():
        t[col] = value
    t.to_csv(world["tmp"] / name, index=False)
    return name


CASES = {
    "missing spec file": (lambda w: str(w["tmp"] / "nope.yaml"), "good", "does not exist"),
    "spec is not YAML": (lambda w: _write(w, "bad.yaml", "table: [unclosed"), "good", "not valid YAML"),
    "dataset and table": (lambda w: _write(w, "both.yaml", _spec(w, dataset={"kind": "digits"})), "good",
                          "exactly one of dataset:, study: or table:"),
    "unknown key": (lambda w: _write(w, "k.yaml", _spec(w, batchsize=4)), "good", "unknown key(s) ['batchsize']"),
    "missing feature column": (lambda w: _write(w, "f.yaml", _spec(w, table_features=["f0", "f9"])), "good",
                               "lacks the column(s) ['f9']"),
    "label out of range": (lambda w: _write(w, "l.yaml", _spec(w, table_path=_table(w, "l.csv", label=np.arange(N) % 5))),
                           "good", "label value(s) out of range"),
    "duplicated example ids": (lambda w: _write(w, "d.yaml", _spec(w, table_path=_table(w, "d.csv", example_id=np.arange(N) // 2))),
                               "good", "duplicated example_id"),
    "missing group values": (lambda w: _write(w, "g.yaml", _spec(w, table_path=_table(w, "g.csv", g=[None] * N))), "good",
                             "group column 'g' of"),
    "dataset of an unknown kind": (lambda w: _write(w, "u.yaml", {"dataset": {"kind": "mnist"}}), "good",
                                   "dataset section is invalid"),
    "output shape does not match the classes": (lambda w: "spec.yaml", "wide", "returns outputs of shape (60, 3)"),
    "unreachable model": (lambda w: "spec.yaml", "gone", "its model files cannot be downloaded"),
    "pickled model": (lambda w: "spec.yaml", "pickled", "--allow-pickle"),
    "state dict without factory": (lambda w: "spec.yaml", "state_dict", "state_dict: {factory:"),
    "missing lineage tag": (lambda w: "spec.yaml", "no_seed", "missing tag(s) ['compbias.seed']"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_evaluation_input_exits_2_and_writes_nothing(case, world, capsys):
    make_spec, key, fragment = CASES[case]
    spec = make_spec(world)
    version, _ = world["versions"][key]
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--evaluate", spec, "--version", f"{MODEL}/{version}", "--no-similarity", "--no-gallery",
                         "--no-figures", "--bootstrap", "0"])
    rc = cli.run(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert all(line.startswith(("compbias audit: ", "evaluating ")) for line in err.strip().splitlines()), err
    client = world["client"]
    for v, run_id in world["versions"].values():
        artifacts = {f.path for f in client.list_artifacts(run_id)}
        assert not ({C.PREDICTIONS, C.MEMBER_FILE, C.STUDY_FILE} & artifacts)
        assert EVALUATED_KIND not in client.get_run(run_id).data.tags
        assert not any(k.startswith(C.AUDIT_PREFIX) for k in client.get_model_version(MODEL, v).tags)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{C.RUN_KIND}` = '{C.RUN_KIND_AUDIT}'") == []


def test_allow_pickle_without_evaluate_is_refused(world, capsys):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert cli.run(p.parse_args(["--allow-pickle"])) == 2
    assert "--allow-pickle applies to --evaluate" in capsys.readouterr().err

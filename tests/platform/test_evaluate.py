"""Bring your own models: evaluate registered versions (pytorch pt2 / state dict / pickle, pyfunc, ONNX) and audit them.

Each test builds a private SQLite store, registers small torch models the way
a user would (``mlflow.pytorch`` / ``mlflow.onnx`` / ``mlflow.pyfunc`` plus
the contract's lineage tags, no predictions) and evaluates them on a
predictions-only table with :mod:`compbias.platform.evaluate` or through
``compbias audit --evaluate``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform import evaluate as E
from compbias.platform.audit import cli
from compbias.platform.audit import tags as T
from compbias.platform.audit.selection import VersionRecord

N_FEATURES = 4
MODEL = "byo-tab"


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private SQLite store (MLFLOW_TRACKING_URI) and its experiment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("byo", artifact_location=str(tmp_path / "artifacts"))
    yield {"uri": uri, "client": client, "exp": exp, "root": tmp_path}


@pytest.fixture
def table(tmp_path):
    """A predictions-only dataset: 120 examples with shuffled ids, 4 features, a string group, 2 classes."""
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    frame = pd.DataFrame({"example_id": rng.permutation(np.arange(1000, 1000 + n)), "label": y,
                          "sex": np.where(rng.random(n) < 0.4, "female", "male")})
    for j in range(N_FEATURES):
        frame[f"f{j}"] = x[:, j]
    path = tmp_path / "eval.parquet"
    frame.to_parquet(path, index=False)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "table": {"path": "eval.parquet", "features": [f"f{j}" for j in range(N_FEATURES)], "groups": ["sex"]},
        "class_names": ["neg", "pos"], "positive_class": "pos", "batch_size": 32,
        "state_dict": {"factory": "torch.nn:Linear", "kwargs": {"in_features": N_FEATURES, "out_features": 2}},
    }))
    return {"frame": frame, "spec_path": spec_path, "spec": E.load_spec(spec_path)}


def linear(seed: int, out: int = 2) -> torch.nn.Linear:
    torch.manual_seed(seed)
    m = torch.nn.Linear(N_FEATURES, out)
    with torch.no_grad():
        m.weight[:, 0] += torch.linspace(-2, 2, out)  # a model that is better than chance
    return m.eval()


def lineage(seed: int, role: str = "baseline", baseline_version: str | None = None, level: str = "0.5") -> dict:
    tags = {C.STUDY: "tab", C.ROLE: role, C.SEED: str(seed)}
    if role == "compressed":
        tags.update({C.METHOD: "magnitude", C.LEVEL: level, C.BASELINE_VERSION: baseline_version})
    return tags


def register(store, log, tags: dict) -> VersionRecord:
    """Log a model inside a run with ``log(run_id) -> model source`` and register it with ``tags``."""
    client = store["client"]
    with mlflow.start_run(experiment_id=store["exp"]) as run:
        source = log(run.info.run_id)
    if source.startswith("models:/"):
        mv = mlflow.register_model(source, MODEL, tags=tags)
    else:
        try:
            client.create_registered_model(MODEL)
        except Exception:
            pass
        mv = client.create_model_version(MODEL, source=source, run_id=run.info.run_id, tags=tags)
    return VersionRecord(MODEL, str(mv.version), run.info.run_id, dict(tags))


def log_pt2(model):
    example = np.zeros((3, N_FEATURES), np.float32)

    def log(run_id):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", input_example=example,
                                        pip_requirements=["torch"]).model_uri
    return log


def log_pickle(model):
    def log(run_id):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=["torch"]).model_uri
    return log


def log_state_dict(model):
    def log(run_id):
        mlflow.pytorch.log_state_dict(model.state_dict(), "state_dict")
        return mlflow.get_artifact_uri("state_dict")
    return log


def log_onnx(model, tmp: Path, flavour: bool = True, batch: int | None = None):
    """ONNX with a dynamic batch dimension, or exported for a fixed ``batch`` size."""
    import onnx

    path = tmp / f"m{id(model)}.onnx"
    torch.onnx.export(model, (torch.zeros(batch or 2, N_FEATURES),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes=None if batch else {"x": {0: "batch"}}, dynamo=False)

    def log(run_id):
        if flavour:
            return mlflow.onnx.log_model(onnx.load(str(path)), name="model", pip_requirements=["onnx"]).model_uri
        mlflow.log_artifact(str(path), "onnx")
        return mlflow.get_artifact_uri("onnx")
    return log


class LinearPyfunc(mlflow.pyfunc.PythonModel):
    """A cloudpickled pyfunc: scores = features @ w.T + b."""

    def __init__(self, w, b):
        self.w, self.b = np.asarray(w), np.asarray(b)

    def predict(self, context, model_input, params=None):
        return np.asarray(model_input, np.float32) @ self.w.T + self.b


def log_pyfunc(model):
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()

    def log(run_id):
        return mlflow.pyfunc.log_model(name="model", python_model=LinearPyfunc(w, b), pip_requirements=["numpy"]).model_uri
    return log


def expected_preds(model: torch.nn.Module, frame: pd.DataFrame) -> pd.Series:
    """The model's argmax on every example, indexed by example_id."""
    x = torch.from_numpy(frame[[f"f{j}" for j in range(N_FEATURES)]].to_numpy(np.float32))
    with torch.no_grad():
        return pd.Series(model(x).argmax(1).numpy(), index=frame["example_id"].to_numpy())


def logged(client, run_id) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id)}


def nothing_written(client, run_id) -> bool:
    """No contract artifact and no evaluation tag on the run."""
    tags = client.get_run(run_id).data.tags
    return not ({C.PREDICTIONS, C.MEMBER_FILE, C.STUDY_FILE} & logged(client, run_id)) and E.EVALUATED_KIND not in tags


def read_predictions(client, run_id, tmp) -> pd.DataFrame:
    return pd.read_parquet(client.download_artifacts(run_id, C.PREDICTIONS, str(tmp)))


def check_predictions(client, rec, model, table, tmp):
    got = read_predictions(client, rec.run_id, tmp)
    frame = table["frame"]
    assert list(got["example_id"]) == sorted(frame["example_id"])  # the contract's order
    want = expected_preds(model, frame)
    assert np.array_equal(got["pred"].to_numpy(), want.loc[got["example_id"]].to_numpy())
    labels = frame.set_index("example_id")["label"]
    assert np.array_equal(got["label"].to_numpy(), labels.loc[got["example_id"]].to_numpy())
    sex = frame.set_index("example_id")["sex"].loc[got["example_id"]]
    assert np.array_equal(got["sex"].to_numpy(), (sex == "male").astype(int).to_numpy())  # female=0, male=1
    assert ((got["prob"] >= 0.5) & (got["prob"] <= 1)).all()
    info = C.MemberInfo.from_json(Path(client.download_artifacts(rec.run_id, C.MEMBER_FILE, str(tmp))).read_text())
    assert info == C.MemberInfo(num_classes=2, class_names=("neg", "pos"), positive_class=1, groups=("sex",))


@pytest.mark.parametrize("kind", ["pt2", "state_dict", "onnx", "onnx_file"])
def test_safe_formats_are_evaluated_and_logged_as_the_models_argmax(kind, store, table, tmp_path):
    model = linear(1)
    log = {"pt2": lambda: log_pt2(model), "state_dict": lambda: log_state_dict(model),
           "onnx": lambda: log_onnx(model, tmp_path), "onnx_file": lambda: log_onnx(model, tmp_path, flavour=False)}[kind]()
    rec = register(store, log, lineage(0))
    client = store["client"]
    report = E.evaluate_versions(client, [rec], table["spec"])
    assert report.errors == {}
    assert report.evaluated == {rec.key: {"pt2": "pytorch-pt2", "state_dict": "pytorch-state-dict",
                                          "onnx": "onnx", "onnx_file": "onnx"}[kind]}
    assert {C.PREDICTIONS, C.MEMBER_FILE} <= logged(client, rec.run_id)
    check_predictions(client, rec, model, table, tmp_path / "dl")
    assert client.get_run(rec.run_id).data.tags[E.EVALUATED_KIND] == report.evaluated[rec.key]


@pytest.mark.parametrize("kind", ["pickle", "pyfunc"])
def test_pickled_models_are_refused_by_default_with_nothing_written_and_loaded_with_the_opt_in(kind, store, table, tmp_path):
    model = linear(2)
    rec = register(store, log_pickle(model) if kind == "pickle" else log_pyfunc(model), lineage(0))
    client = store["client"]
    before_tags = dict(client.get_model_version(MODEL, rec.version).tags)
    before_run_tags = dict(client.get_run(rec.run_id).data.tags)
    report = E.evaluate_versions(client, [rec], table["spec"])
    reason = report.errors[rec.key]
    assert report.evaluated == {}
    for words in ("executes code", "--allow-pickle", "state dict", "ONNX", "torch.export", "predictions only"):
        assert words in reason
    assert nothing_written(client, rec.run_id)  # nothing half written
    assert dict(client.get_model_version(MODEL, rec.version).tags) == before_tags
    assert dict(client.get_run(rec.run_id).data.tags) == before_run_tags
    with pytest.raises(E.PickleRefused):
        E.load_local_model(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{rec.version}", dst_path=str(tmp_path / "m")),
                           table["spec"])
    report = E.evaluate_versions(client, [rec], table["spec"], allow_pickle=True)
    assert report.evaluated == {rec.key: "pytorch-pickle" if kind == "pickle" else "pyfunc"}
    check_predictions(client, rec, model, table, tmp_path / "dl")


def test_output_shape_mismatch_and_unreachable_model_are_clear_errors_with_nothing_written(store, table, tmp_path):
    client = store["client"]
    wide = register(store, log_pt2(linear(3, out=3)), lineage(0))
    gone_dir = tmp_path / "gone"
    gone_dir.mkdir()
    torch.save(linear(4).state_dict(), gone_dir / "state_dict.pth")

    def log_gone(run_id):
        return str(gone_dir)

    gone = register(store, log_gone, lineage(1))
    import shutil

    shutil.rmtree(gone_dir)
    report = E.evaluate_versions(client, [wide, gone], table["spec"])
    assert report.evaluated == {}
    assert "shape (120, 3)" in report.errors[wide.key] and "2 classes" in report.errors[wide.key]
    assert "cannot be downloaded" in report.errors[gone.key] and str(gone_dir) in report.errors[gone.key]
    for rec in (wide, gone):
        assert nothing_written(client, rec.run_id)


def test_spec_errors_name_the_problem(tmp_path, table):
    bad = [
        ({}, "exactly one of dataset:, study: or table:"),
        ({"table": {"path": "eval.parquet", "features": ["f0"]}}, "needs num_classes"),
        ({"table": {"path": "eval.parquet", "features": ["f0"]}, "num_classes": 2, "output": "odds"}, "output must be one of"),
        ({"table": {"path": "eval.parquet", "features": ["f0"]}, "num_classes": 2, "state_dict": {"factory": "resnet"}},
         "module:function"),
        ({"dataset": {"kind": "digits"}, "colour": 1}, "unknown key"),
    ]
    for raw, message in bad:
        with pytest.raises(E.EvaluationError, match=message):
            E.load_spec(raw)
    spec = E.load_spec({"table": {"path": str(tmp_path / "eval.parquet"), "features": ["f0", "nope"]}, "num_classes": 2})
    with pytest.raises(E.EvaluationError, match=r"lacks the column\(s\) \['nope'\]"):
        E.load_data(spec)
    spec = E.load_spec({"table": {"path": str(tmp_path / "eval.parquet"), "features": ["f0"]}, "num_classes": 2,
                        "positive_class": "pos"})
    with pytest.raises(E.EvaluationError, match="not a class id"):
        E.load_data(spec)


def test_state_dict_without_factory_and_wrong_factory(store, table, tmp_path):
    client = store["client"]
    rec = register(store, log_state_dict(linear(5)), lineage(0))
    raw = yaml.safe_load(table["spec_path"].read_text())
    raw.pop("state_dict")
    raw["table"]["path"] = str(tmp_path / "eval.parquet")
    report = E.evaluate_versions(client, [rec], E.load_spec(raw))
    assert "state_dict: {factory:" in report.errors[rec.key]
    raw["state_dict"] = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}}
    report = E.evaluate_versions(client, [rec], E.load_spec(raw))
    assert "does not fit torch.nn:Linear" in report.errors[rec.key]
    assert nothing_written(client, rec.run_id)


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


AUDIT_ARGS = ["--no-similarity", "--no-gallery", "--no-figures", "--bootstrap", "0"]


def population(store, tmp_path, *, seeds=(0, 1)):
    """Baselines in pt2 and ONNX, compressed versions as state dicts: what a BYO team registers."""
    recs, models = [], {}
    for seed in seeds:
        base = linear(10 + seed)
        b = register(store, log_pt2(base) if seed % 2 == 0 else log_onnx(base, tmp_path), lineage(seed))
        pruned = linear(10 + seed)
        with torch.no_grad():
            pruned.weight[:, 1:] = 0
        c = register(store, log_state_dict(pruned), lineage(seed, "compressed", b.version))
        recs += [b, c]
        models[b.key], models[c.key] = base, pruned
    return recs, models


def test_cli_evaluates_then_audits_a_byo_population(store, table, tmp_path, capsys):
    client = store["client"]
    recs, models = population(store, tmp_path)
    rc = cli.run(parse(AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--registered-model", MODEL, "--json"]))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "evaluated byo-tab/1 (pytorch-pt2)" in captured.err and "(pytorch-state-dict)" in captured.err
    assert "(onnx)" in captured.err
    for r in recs:
        tags = client.get_model_version(MODEL, r.version).tags
        assert tags[T.STATUS] in ("pass", "fail"), tags
        check_predictions(client, r, models[r.key], table, tmp_path / "dl" / r.version)
    # a second run finds nothing to evaluate or audit
    rc = cli.run(parse(AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--json"]))
    assert rc == 0 and "nothing to audit" in capsys.readouterr().err


def test_cli_exit_2_on_a_bad_version_and_on_a_bad_spec(store, table, tmp_path, capsys):
    client = store["client"]
    good = register(store, log_pt2(linear(0)), lineage(0))
    bad = register(store, log_pickle(linear(1)), lineage(1))
    rc = cli.run(parse(AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--model", MODEL]))
    err = capsys.readouterr().err
    assert rc == 2 and f"version {bad.key}" in err and "--allow-pickle" in err and "nothing was audited" in err
    assert T.STATUS not in client.get_model_version(MODEL, good.version).tags
    assert nothing_written(client, bad.run_id)
    missing = tmp_path / "nope.yaml"
    assert cli.run(parse(AUDIT_ARGS + ["--evaluate", str(missing)])) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.run(parse(AUDIT_ARGS + ["--allow-pickle"])) == 2
    assert "--evaluate" in capsys.readouterr().err
    # with the opt-in both are evaluated and audited
    rc = cli.run(parse(AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--model", MODEL, "--allow-pickle"]))
    assert rc == 0, capsys.readouterr().err
    assert client.get_model_version(MODEL, bad.version).tags[T.STATUS] in ("pass", "fail")


def test_watch_evaluates_new_versions_and_tags_the_unevaluable_ones_error(store, table, tmp_path, capsys):
    client = store["client"]
    recs, _ = population(store, tmp_path, seeds=(0,))
    wide = register(store, log_pt2(linear(7, out=3)), lineage(1))
    argv = AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--watch", "--interval", "1s", "--max-passes", "1"]
    assert cli.run(parse(argv)) == 0
    for r in recs:
        assert client.get_model_version(MODEL, r.version).tags[T.STATUS] in ("pass", "fail")
        assert C.PREDICTIONS in logged(client, r.run_id)
    tags = client.get_model_version(MODEL, wide.version).tags
    assert tags[T.STATUS] == "error" and "shape (120, 3)" in tags[T.REASON]
    assert nothing_written(client, wide.run_id)
    # a version registered later is evaluated and audited on the next pass
    later = register(store, log_state_dict(linear(8)), lineage(0, "compressed", recs[0].version, level="0.9"))
    assert cli.run(parse(argv)) == 0
    assert client.get_model_version(MODEL, later.version).tags[T.STATUS] in ("pass", "fail")
    assert client.get_model_version(MODEL, wide.version).tags[T.STATUS] == "error"  # not retried


def test_a_state_dict_left_with_prune_masks_is_folded(store, table, tmp_path):
    """``torch.nn.utils.prune`` without ``prune.remove`` saves ``weight_orig`` and ``weight_mask``."""
    import torch.nn.utils.prune as prune

    model = linear(6)
    prune.l1_unstructured(model, "weight", amount=0.5)
    assert {"weight_orig", "weight_mask"} <= set(model.state_dict())
    rec = register(store, log_state_dict(model), lineage(0))
    report = E.evaluate_versions(store["client"], [rec], table["spec"])
    assert report.evaluated == {rec.key: "pytorch-state-dict"}, report.errors
    check_predictions(store["client"], rec, model, table, tmp_path / "dl")  # the pruned model's argmax


class ArgmaxOnly(torch.nn.Module):
    """Returns class ids, not scores (``output: labels``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).argmax(1)


def test_a_model_returning_class_ids_needs_output_labels_or_is_read_as_ids(store, table, tmp_path):
    model = linear(7)
    rec = register(store, log_onnx(ArgmaxOnly(model), tmp_path), lineage(0))
    report = E.evaluate_versions(store["client"], [rec], table["spec"])  # output: auto reads integer ids as labels
    assert report.evaluated == {rec.key: "onnx"}, report.errors
    got = read_predictions(store["client"], rec.run_id, tmp_path / "dl")
    want = expected_preds(model, table["frame"])
    assert np.array_equal(got["pred"].to_numpy(), want.loc[got["example_id"]].to_numpy()) and "prob" not in got
    raw = yaml.safe_load(table["spec_path"].read_text())
    raw["table"]["path"] = str(tmp_path / "eval.parquet")
    raw["output"] = "logits"
    rec2 = register(store, log_onnx(ArgmaxOnly(model), tmp_path), lineage(1))
    report = E.evaluate_versions(store["client"], [rec2], E.load_spec(raw))
    assert "shape (120,)" in report.errors[rec2.key] and nothing_written(store["client"], rec2.run_id)


class TinyDigits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_study_files_dataset_section_is_evaluated_and_logged_with_it(store, tmp_path):
    from compbias.jobs import load_dataset

    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "d", "dataset": {"kind": "digits", "groups": ["ink"]}}))
    spec = E.load_spec({"study": str(tmp_path / "study.yaml"), "batch_size": 100})
    torch.manual_seed(0)
    model = TinyDigits().eval()
    example = np.zeros((2, 1, 8, 8), np.float32)

    def log(run_id):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", input_example=example,
                                        pip_requirements=["torch"]).model_uri

    rec = register(store, log, lineage(0))
    report = E.evaluate_versions(store["client"], [rec], spec)
    assert report.evaluated == {rec.key: "pytorch-pt2"}, report.errors
    bundle = load_dataset("digits", groups=["ink"])
    x, _ = bundle.test.batch(slice(None))
    with torch.no_grad():
        want = model(x).argmax(1).numpy()
    got = read_predictions(store["client"], rec.run_id, tmp_path / "dl")
    assert np.array_equal(got["example_id"], bundle.test_frame["example_id"]) and np.array_equal(got["pred"], want)
    assert np.array_equal(got["ink"], bundle.test_frame["ink"])
    logged_study = yaml.safe_load(Path(store["client"].download_artifacts(rec.run_id, C.STUDY_FILE, str(tmp_path / "s"))).read_text())
    assert logged_study["dataset"]["kind"] == "digits" and logged_study["dataset"]["groups"] == ["ink"]


def test_cli_exit_2_for_a_wrong_output_shape_and_an_unreachable_model(store, table, tmp_path, capsys):
    client = store["client"]
    wide = register(store, log_pt2(linear(3, out=3)), lineage(0))
    gone_dir = tmp_path / "gone"
    gone_dir.mkdir()
    (gone_dir / "model.onnx").write_bytes(b"")
    gone = register(store, lambda run_id: str(gone_dir), lineage(1))
    (gone_dir / "model.onnx").unlink()
    gone_dir.rmdir()
    rc = cli.run(parse(AUDIT_ARGS + ["--evaluate", str(table["spec_path"]), "--model", MODEL]))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"version {wide.key}: the model returns outputs of shape (120, 3)" in err
    assert f"version {gone.key}: its model files cannot be downloaded" in err
    for rec in (wide, gone):
        assert nothing_written(client, rec.run_id) and T.STATUS not in client.get_model_version(MODEL, rec.version).tags
    assert client.search_runs([store["exp"]], "tags.`compbias.run_kind` = 'audit'") == []  # no audit run was started


def test_registered_models_restricts_what_is_evaluated(store, table, tmp_path):
    client = store["client"]
    ours = register(store, log_pt2(linear(0)), lineage(0))
    with mlflow.start_run(experiment_id=store["exp"]) as run:
        info = mlflow.pytorch.log_model(linear(1), name="model", serialization_format="pt2",
                                        input_example=np.zeros((2, N_FEATURES), np.float32), pip_requirements=["torch"])
    other = mlflow.register_model(info.model_uri, "other-team", tags={**lineage(0), C.STUDY: "images"})
    with pytest.raises(E.EvaluationError, match="registered_models must be a list"):
        E.load_spec({"table": {"path": "x.csv", "features": ["f0"]}, "num_classes": 2, "registered_models": [1]})
    todo, _ = E.pending_versions(client, registered_models=[MODEL])
    assert [r.key for r in todo] == [ours.key]
    todo, _ = E.pending_versions(client)
    assert sorted(r.key for r in todo) == sorted([ours.key, f"other-team/{other.version}"])
    assert run.info.run_id == other.run_id


class _Payload:
    """Unpickling this object would create the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_state_dict_with_a_code_payload_is_refused_without_running_it(table, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "sd"
    folder.mkdir()
    torch.save({**linear(0).state_dict(), "extra": _Payload(marker)}, folder / "state_dict.pth")
    with pytest.raises(E.PickleRefused, match="holds objects other than tensors.*--allow-pickle"):
        E.load_local_model(folder, table["spec"])
    assert not marker.exists()
    (folder / "state_dict.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(E.EvaluationError, match="cannot be read"):
        E.load_local_model(folder, table["spec"])


def test_a_pt2_archive_holding_pickled_objects_is_refused_then_loaded_with_the_opt_in(store, table, tmp_path):
    """torchao's int8 weights are tensor subclasses: a torch.export archive can only hold them pickled."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = linear(9)
    quantize_(model, Int8WeightOnlyConfig())
    rec = register(store, log_pt2(model), lineage(0))
    report = E.evaluate_versions(store["client"], [rec], table["spec"])
    assert "torch.export archive holds a pickled payload" in report.errors[rec.key]
    assert nothing_written(store["client"], rec.run_id)
    report = E.evaluate_versions(store["client"], [rec], table["spec"], allow_pickle=True)
    assert report.evaluated == {rec.key: "pytorch-pt2"}, report.errors
    check_predictions(store["client"], rec, model, table, tmp_path / "dl")


def test_a_model_exported_for_a_fixed_batch_size_is_evaluated_with_that_batch_size(store, table, tmp_path):
    model = linear(11)
    rec = register(store, log_onnx(model, tmp_path, batch=32), lineage(0))  # the spec's batch_size; 120 = 3 x 32 + 24
    report = E.evaluate_versions(store["client"], [rec], table["spec"])
    assert report.evaluated == {rec.key: "onnx"}, report.errors
    check_predictions(store["client"], rec, model, table, tmp_path / "dl")


def test_a_dataset_section_is_read_slice_by_slice_and_normalized(tmp_path):
    """The split's inputs are read a slice at a time (a split left in its files is never decoded whole);
    normalize is checked when the data is loaded and applied to every slice."""
    from compbias.jobs import load_dataset
    from compbias.jobs.data import FileImageDataset
    from tests.jobs.conftest import write_celeba

    spec = E.load_spec({"dataset": {"kind": "digits"}, "normalize": {"mean": [0.5], "std": [0.25]}})
    data = E.load_data(spec)
    x = load_dataset("digits").test.batch(slice(None))[0].numpy()
    assert data.inputs.shape == x.shape and len(data.inputs) == len(data.frame)
    assert np.allclose(data.inputs[3:9], (x[3:9] - 0.5) / 0.25) and data.inputs[3:9].dtype == np.float32
    with pytest.raises(E.EvaluationError, match="normalize mean/std of length 3 do not fit inputs of shape"):
        E.load_data(E.load_spec({"dataset": {"kind": "digits"}, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}))

    write_celeba(tmp_path / "celeba", n=24)
    section = {"kind": "celeba", "root": str(tmp_path / "celeba"), "target": "Blond_Hair", "in_memory": False}
    files = E.load_data(E.load_spec({"dataset": section}))
    assert isinstance(files.inputs.split, FileImageDataset)
    ref = load_dataset("celeba", root=tmp_path / "celeba", target="Blond_Hair").test.batch(slice(None))[0].numpy()
    assert np.array_equal(np.concatenate([files.inputs[i : i + 5] for i in range(0, len(files.inputs), 5)]), ref)

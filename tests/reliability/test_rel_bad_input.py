"""Bad input through the user's paths: ``compbias study``/``compbias audit`` and the public Python API.

Each case checks what a user sees (a non-zero exit and a message naming the
problem and what to do, never a traceback for an expected error, or a
documented skip recorded in the audit) and what MLflow is left with (no new
RUNNING or FINISHED run, no registered version). Cases already covered
elsewhere are listed in ``docs/reliability.md`` instead of repeated here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from compbias.platform import cli
from conftest import census, write_study

TINY = yaml.safe_load(write_study.__globals__["TINY_STUDY"].format(name="bad", seeds=1, levels="[0.5]"))


def _variant(change) -> dict:
    d = copy.deepcopy(TINY)
    change(d)
    return d


def _set(path: str, value):
    def change(d):
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        last = parts[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return change


def _del(path: str):
    def change(d):
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[parts[-1]]
    return change


def run_study_cli(capsys, tmp_path, text: str | None, *extra: str, name: str = "bad.yaml"):
    """``compbias study`` on a study file holding ``text``; returns (exit code, stderr, store uri)."""
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "local", *extra])
    out = capsys.readouterr()
    return code, out.err + out.out, uri


def assert_nothing_kept(uri: str, tmp_path: Path) -> None:
    """No run left RUNNING or FINISHED, no registered version (or no store at all)."""
    if not (tmp_path / "mlflow.db").exists():
        return
    c = census(uri)
    assert not [r for r in c.runs if r.info.status in ("RUNNING", "FINISHED")], c.statuses()
    assert not c.versions, [(v.name, v.version) for v in c.versions]


# ----------------------------------------------------------------- study files: refused before anything runs

STUDY_FILE_CASES = [
    ("malformed-yaml", "name: [unclosed\ncompression: {", ("not valid YAML",)),
    ("yaml-list", "- name: x\n", ("YAML mapping",)),
    ("empty-file", "", ("YAML mapping",)),
    ("unknown-top-key", _variant(_set("epochs", 3)), ("epochs: unknown key", "allowed here")),
    ("unknown-nested-key", _variant(_set("train.epoch", 3)), ("train.epoch: unknown key", "epochs")),
    ("wrong-type-epochs", _variant(_set("train.epochs", "ten")), ("train.epochs", "integer")),
    ("wrong-type-levels", _variant(_set("compression.0.levels", "lots")), ("compression[0].levels", "not a sparsity")),
    ("sparsity-one", _variant(_set("compression.0.levels", [1.0])), ("compression[0].levels[0]", "< 1")),
    ("sparsity-above-one", _variant(_set("compression.0.levels", [1.5])), ("compression[0].levels[0]", "< 1")),
    ("sparsity-zero", _variant(_set("compression.0.levels", [0.0])), ("compression[0].levels[0]", "> 0")),
    ("negative-seed", _variant(_set("population.seeds", [0, -1])), ("population.seeds", ">= 0")),
    ("zero-seeds", _variant(_set("population.seeds", 0)), ("population.seeds", ">= 1")),
    ("empty-method-list", _variant(_set("compression", [])), ("compression", "at least one entry")),
    ("missing-name", _variant(_del("name")), ("name: required key is missing",)),
    ("name-with-path", _variant(_set("name", "../../etc")), ("name", "pattern")),
    ("unknown-method", _variant(_set("compression.0.method", "lottery")), ("compression[0].method", "'magnitude'")),
    ("unknown-quant-level", _variant(_set("compression", [{"method": "quantize", "levels": ["int4"]}])),
     ("compression[0].levels[0]", "int8_weight")),
    ("negative-lr", _variant(_set("train.lr", -0.1)), ("train.lr", "greater than 0")),
    ("celeba-without-target", _variant(_set("dataset", {"kind": "celeba", "root": "/data"})), ("target",)),
    ("negative-max-retries", _variant(_set("resources.max_retries", -1)), ("resources.max_retries",)),
]


@pytest.mark.parametrize("case, content, fragments", STUDY_FILE_CASES, ids=[c[0] for c in STUDY_FILE_CASES])
def test_bad_study_file_is_refused_by_name(capsys, tmp_path, case, content, fragments):
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    code, said, uri = run_study_cli(capsys, tmp_path, text)
    assert code == 2, said
    assert "Traceback" not in said
    for f in fragments:
        assert f in said, f"{f!r} not in:\n{said}"
    assert_nothing_kept(uri, tmp_path)


def test_missing_study_file_names_the_places_looked(capsys, tmp_path):
    code, said, uri = run_study_cli(capsys, tmp_path, None, name="nowhere.yaml")
    assert code == 2 and "no study file" in said and "configs" in said and "Traceback" not in said
    assert_nothing_kept(uri, tmp_path)


@pytest.mark.parametrize("option, value, fragment", [("--seeds", "-1", "population.seeds"),
                                                     ("--seeds", "x,y", "--seeds"),
                                                     ("--executor", "spark", "--executor")])
def test_bad_command_line_overrides_exit_2(capsys, tmp_path, option, value, fragment):
    path = write_study(tmp_path, "ok")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code = cli.main(["study", str(path), "--tracking-uri", uri, option, value])
    except SystemExit as exc:  # argparse refuses it
        code = exc.code
    said = capsys.readouterr().err
    assert code == 2 and fragment in said and "Traceback" not in said
    assert_nothing_kept(uri, tmp_path)


def test_bad_ray_bind_setting_is_refused_before_anything_is_logged(capsys, tmp_path, monkeypatch):
    """``COMPBIAS_RAY_BIND`` takes loopback or all; anything else stops the study before Ray or MLflow start."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("COMPBIAS_RAY_BIND", "0.0.0.0")
    path = write_study(tmp_path, "ok")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["study", str(path), "--tracking-uri", uri, "--executor", "ray"])
    said = capsys.readouterr().err
    assert code == 2 and "COMPBIAS_RAY_BIND" in said and "'loopback'" in said and "Traceback" not in said, said
    assert not (tmp_path / "mlflow.db").exists() or not census(uri).runs
    assert_nothing_kept(uri, tmp_path)


def _model_artifacts(uri, run) -> Path:
    """The artifact folder of the run's LoggedModel (where its weights are)."""
    from mlflow import MlflowClient

    (model,) = [m for m in MlflowClient(uri).search_logged_models(experiment_ids=[run.info.experiment_id])
                if m.source_run_id == run.info.run_id]
    return Path(model.artifact_location.removeprefix("file://"))


def test_compress_after_the_baselines_artifacts_were_deleted_names_the_version_and_the_way_out(capsys, tmp_path, monkeypatch):
    """``compbias train``, then the baseline's artifact folder is deleted, then ``compbias compress``: exit 2, no traceback."""
    import shutil

    monkeypatch.setenv("COMPBIAS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    path = write_study(tmp_path, "gone")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["train", str(path), "--tracking-uri", uri, "--executor", "local"]) == 0
    (run,) = census(uri).model_runs("FINISHED")
    shutil.rmtree(_model_artifacts(uri, run))  # the model's files (its LoggedModel) and the run's tables
    shutil.rmtree(Path(run.info.artifact_uri.removeprefix("file://")))
    capsys.readouterr()
    code = cli.main(["compress", str(path), "--tracking-uri", uri, "--executor", "local"])
    said = capsys.readouterr().err
    assert code == 2 and "Traceback" not in said, said
    assert "version 1 of compbias-gone has no saved weights" in said and "delete that model version" in said, said
    c = census(uri)
    assert len(c.model_runs("FINISHED")) == 1 and len(c.versions) == 1 and "RUNNING" not in c.statuses(), c.statuses()


def test_missing_dataset_path_is_refused_before_anything_is_logged(capsys, tmp_path):
    study = _variant(_set("dataset", {"kind": "imagefolder", "root": str(tmp_path / "no-such-dir")}))
    code, said, uri = run_study_cli(capsys, tmp_path, yaml.safe_dump(study))
    assert code == 2 and "does not exist" in said and "no-such-dir" in said
    assert_nothing_kept(uri, tmp_path)


# ----------------------------------------------------------------- data the tasks cannot use: each model FAILED, nothing registered


def _images(root: Path, classes, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def _failing_study(capsys, tmp_path, dataset: dict) -> tuple[str, str]:
    study = _variant(_set("dataset", dataset))
    code, said, uri = run_study_cli(capsys, tmp_path, yaml.safe_dump(study))
    assert code == 1, said
    assert "Traceback" not in said
    c = census(uri)
    models = c.model_runs()
    assert models and all(r.info.status == "FAILED" and r.data.tags.get("compbias.error") for r in models)
    assert not [r for r in c.runs if r.info.status in ("RUNNING", "FINISHED")], c.statuses()
    assert not c.versions
    return said, " ".join(r.data.tags["compbias.error"] for r in models)


def test_dataset_with_class_folders_but_no_images_fails_every_model(capsys, tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    said, errors = _failing_study(capsys, tmp_path, {"kind": "imagefolder", "root": str(root)})
    assert "no images" in said and "no images" in errors


def test_missing_attribute_column_fails_naming_the_column(capsys, tmp_path):
    said, errors = _failing_study(capsys, tmp_path, {"kind": "digits", "groups": ["skin_tone"], "max_train": 300, "max_test": 200})
    assert "skin_tone" in said and "skin_tone" in errors


def test_attribute_file_escaping_the_root_fails_naming_it(capsys, tmp_path):
    root = tmp_path / "imgs"
    _images(root, ("a", "b"))
    (tmp_path / "attrs.csv").write_text("path,grp\n" + "".join(f"{c}/{i}.png,{i % 2}\n" for c in "ab" for i in range(4)))
    said, errors = _failing_study(capsys, tmp_path, {"kind": "imagefolder", "root": str(root),
                                                     "attributes_csv": "../attrs.csv", "groups": ["grp"]})
    assert "escapes the dataset root" in said and "escapes the dataset root" in errors


# ----------------------------------------------------------------- public API: labels, classes, groups, logits, weights


def test_labels_out_of_range_are_refused_by_the_metrics():
    from compbias import metrics

    with pytest.raises(ValueError, match=r"\[0, 3\)|n_classes|range"):
        metrics.confusion_counts(np.array([0, 1, 5]), np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)|n_classes|range"):
        metrics.confusion_counts(np.array([0, 1, 2]), np.array([0, -1, 2]), 3)


def test_a_class_absent_from_the_test_split_has_undefined_not_crashing_rates():
    from compbias import metrics
    from compbias.platform.tasks import TaskResult
    from compbias.platform.tracking import model_metrics

    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 has no test example
    p = np.array([0, 1, 1, 1, 2, 1])
    rates = metrics.class_rates(metrics.confusion_counts(y, p, 3))
    fnr = np.asarray(rates.fnr)
    assert np.isnan(fnr[2]) and np.isfinite(fnr[:2]).all()
    # and the study logs no metric for the undefined rate (NaN is never logged)
    per_class = pd.DataFrame({"class": [0, 1, 2], "fpr": np.asarray(rates.fpr), "fnr": fnr})
    pred = pd.DataFrame({"example_id": range(6), "label": y, "pred": p})
    result = TaskResult(task=None, predictions=pred, per_class=per_class, per_group=pd.DataFrame(), info={},
                        model_files={}, node_id="local", seconds=0.0)
    m = model_metrics(result)
    assert "fnr/class/2" not in m and "fnr/class/0" in m and "fpr/class/2" in m


def test_a_group_with_no_members_gets_nan_rates_and_is_ignored_by_gaps():
    from compbias import metrics

    y = np.array([0, 1, 0, 1])
    p = np.array([0, 1, 1, 1])
    groups = {"sex": ["f", "f", "m", "m"], "age": ["young", "young", "old", "old"]}
    r = metrics.group_rates(y, p, groups, 2, positive_class=1)
    t = r.table.set_index("group")
    assert t.loc["sex=f&age=old", "size"] == 0 and np.isnan(t.loc["sex=f&age=old", "fpr"])
    assert np.isfinite(r.difference("fpr"))


def test_nan_logits_never_become_a_model(tmp_path):
    """A model whose logits are NaN raises in ``evaluate``; the study turns that into a FAILED run (see test_study_driver)."""
    import torch

    from compbias import jobs

    bundle = jobs.load_dataset("digits", max_train=100, max_test=50)
    model = jobs.build_model("smallcnn", bundle.n_classes, bundle.input_shape, seed=0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        jobs.evaluate(model, bundle)


def test_corrupt_safetensors_file_is_named(tmp_path):
    from compbias import jobs

    model = jobs.build_model("smallcnn", 10, (1, 8, 8), seed=0)
    jobs.save_model(model, {"class_names": [str(i) for i in range(10)]}, tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"\x00\x01garbage" * 20)
    with pytest.raises(ValueError, match=r"weights\.safetensors.*(corrupt|not a valid)"):
        jobs.load_model(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        jobs.load_model(tmp_path / "m")


# ----------------------------------------------------------------- audit: bad options, missing things, corrupt artifacts


def audit_cli(capsys, *args: str):
    code = cli.main(["audit", *args])
    out = capsys.readouterr()
    return code, out.err + out.out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--bootstrap", "-1"], "--bootstrap"),
        (["--confidence", "1.5"], "--confidence"),
        (["--cie-fraction", "0"], "--cie-fraction"),
        (["--probe-size", "0"], "--probe-size"),
        (["--smoothing", "-1"], "--smoothing"),
        (["--version", "not-a-version"], "NAME/VERSION"),
        (["--watch", "--interval", "soon"], "interval"),
        (["--claim-ttl", "forever"], "forever"),
        (["--model", "nope"], "no compbias versions in registered model 'nope'"),
        (["--version", "compbias-relstudy/99"], "compbias-relstudy/99"),
    ],
    ids=["bootstrap", "confidence", "cie-fraction", "probe-size", "smoothing", "version-spec", "interval",
         "claim-ttl", "unknown-model", "unknown-version"],
)
def test_bad_audit_options_and_unknown_models_exit_2(capsys, finished_store, args, fragment):
    before = census(finished_store["uri"])
    code, said = audit_cli(capsys, *args, "--no-gallery")
    assert code == 2, said
    assert fragment in said and "Traceback" not in said
    after = census(finished_store["uri"])
    assert len(after.runs) == len(before.runs) and len(after.versions) == len(before.versions)
    assert [v.tags for v in after.versions] == [v.tags for v in before.versions]


def _compressed_run(uri):
    c = census(uri)
    run = next(r for r in c.model_runs("FINISHED") if r.data.tags["compbias.role"] == "compressed")
    return run, Path(run.info.artifact_uri.removeprefix("file://"))


def _version_tags(uri, run_id):
    return next(v.tags for v in census(uri).versions if v.run_id == run_id)


def test_missing_predictions_artifact_is_an_error_recorded_on_the_version(capsys, finished_store):
    run, art = _compressed_run(finished_store["uri"])
    (art / "predictions.parquet").unlink()
    code, said = audit_cli(capsys, "--study", "relstudy", "--force", "--no-gallery", "--no-similarity")
    assert code == 0 and "Traceback" not in said, said
    tags = _version_tags(finished_store["uri"], run.info.run_id)
    assert tags["compbias.audit.status"] == "error"
    assert "predictions.parquet" in tags["compbias.audit.reason"]
    assert "predictions.parquet" in said


def test_prediction_ids_that_differ_between_versions_are_an_error(capsys, finished_store):
    run, art = _compressed_run(finished_store["uri"])
    frame = pd.read_parquet(art / "predictions.parquet")
    frame["example_id"] = frame["example_id"] + 1000  # another test set
    frame.to_parquet(art / "predictions.parquet", index=False)
    code, said = audit_cli(capsys, "--study", "relstudy", "--force", "--no-gallery", "--no-similarity")
    assert code == 0 and "Traceback" not in said, said
    tags = _version_tags(finished_store["uri"], run.info.run_id)
    assert tags["compbias.audit.status"] == "error" and "same test examples" in tags["compbias.audit.reason"]


def test_corrupt_weights_skip_similarity_and_say_so(capsys, finished_store):
    run, _ = _compressed_run(finished_store["uri"])
    weights = list(_model_artifacts(finished_store["uri"], run).rglob("*.safetensors"))
    assert weights
    for f in weights:
        f.write_bytes(b"not a safetensors file" * 10)
    code, said = audit_cli(capsys, "--study", "relstudy", "--force", "--no-gallery", "--output-dir",
                           str(finished_store["tmp"] / "out"))
    assert code == 0 and "Traceback" not in said, said
    tags = _version_tags(finished_store["uri"], run.info.run_id)
    assert tags["compbias.audit.status"] in ("pass", "fail")  # a missing similarity never changes a verdict
    report = next((finished_store["tmp"] / "out").rglob("report.html")).read_text()
    assert "safetensors" in report or "weights" in report.lower()


def test_corrupt_baseline_weights_fail_the_compress_task_not_the_store(capsys, finished_store):
    """Adding a level makes the study compress the finished baseline again, from its (now corrupt) version."""
    c = census(finished_store["uri"])
    base = next(r for r in c.model_runs("FINISHED") if r.data.tags["compbias.role"] == "baseline")
    weights = list(_model_artifacts(finished_store["uri"], base).rglob("*.safetensors"))
    assert weights
    for f in weights:
        f.write_bytes(b"not a safetensors file" * 10)
    study = finished_store["study"]
    study.write_text(study.read_text().replace("levels: [0.5]", "levels: [0.5, 0.8]"))
    code = cli.main(["study", str(study), "--executor", "local"])
    said = capsys.readouterr()
    said = said.err + said.out
    assert code == 1 and "Traceback" not in said and "safetensors" in said
    after = census(finished_store["uri"])
    new = [r for r in after.model_runs() if r.data.tags["compbias.level"] == "0.8"]
    assert len(new) == 1 and new[0].info.status == "FAILED"
    assert len(after.versions) == len(c.versions)
    assert not [r for r in after.runs if r.info.status == "RUNNING"]

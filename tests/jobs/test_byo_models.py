"""Bring your own architecture and weights: factory import paths, the user's module, given baselines, load_weights."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from compbias import jobs
from compbias.jobs import build_model, load_dataset, load_model, load_state_file, load_weights, predict_logits, save_model
from compbias.platform.config import StudyConfigError, parse_study
from compbias.platform.plan import plan_study
from compbias.platform.tasks import execute_task

from .byo_helpers import rgb_bundle, user_module


@pytest.fixture(scope="module")
def rgb():
    return rgb_bundle()


def test_torchvision_resnet18_by_import_path_saves_and_reloads_without_pickle(rgb, tmp_path):
    kw = {"num_classes": 3}
    a = build_model("torchvision.models:resnet18", 3, (3, 16, 16), seed=1, kwargs=kw, blocks=["layer1", "layer4"])
    b = build_model("torchvision.models:resnet18", 3, (3, 16, 16), seed=1, kwargs=kw)
    assert torch.equal(a.fc.weight, b.fc.weight)  # the seed fixes the initialisation
    assert a.compbias_spec == {"arch": "torchvision.models:resnet18", "n_classes": 3, "input_shape": [3, 16, 16], "width": 1,
                               "kwargs": kw, "blocks": ["layer1", "layer4"]}
    assert a.block_names == ("layer1", "layer4")
    x = rgb.test.batch(torch.arange(6))[0]
    a.eval()
    save_model(a, {"seed": 1}, tmp_path / "m")
    # the weights file alone (its header carries the factory reference) rebuilds the model
    lone = tmp_path / "lone" / "w.safetensors"
    lone.parent.mkdir()
    shutil.copy(tmp_path / "m" / "weights.safetensors", lone)
    for loaded in (load_model(tmp_path / "m"), load_weights(lone), jobs.models.load_weights(tmp_path / "m")):
        assert loaded.compbias_spec["kwargs"] == kw and loaded.block_names == ("layer1", "layer4")
        np.testing.assert_array_equal(predict_logits(loaded, x), predict_logits(a, x))
    acts = jobs.layer_activations(a, x)
    assert list(acts) == ["layer1", "layer4", "logits"]


def test_the_users_own_module_from_the_working_directory(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch, on_path=False)  # only the working directory: not on sys.path
    m = build_model(f"{name}:tiny", 10, (1, 8, 8), seed=0, kwargs={"hidden": 4})
    assert m.head.out_features == 10 and m.features[0].out_channels == 4
    m2 = build_model(f"{name}:Tiny", 10, (1, 8, 8), seed=0, kwargs={"hidden": 4})  # a class is a factory too
    assert torch.equal(m.head.weight, m2.head.weight)
    assert jobs.layer_activations(m, torch.zeros(3, 1, 8, 8)).keys() == {"logits"}  # no blocks: logits only


@pytest.mark.parametrize("arch,match", [
    ("nosuchpkg_xyz.nets:tiny", "cannot import module 'nosuchpkg_xyz.nets'.*working directory or PYTHONPATH"),
    ("torchvision.models:resnet_nope", "has no attribute 'resnet_nope'"),
    ("torchvision:__version__", "is a str, not a callable"),
    ("torchvision.models:resnet18 ", "not an import path"),
])
def test_a_bad_factory_path_is_refused_clearly(arch, match):
    with pytest.raises(ValueError, match=match):
        build_model(arch, 10, (1, 8, 8))


def test_a_factory_that_fails_or_returns_no_module(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"returned a str, not a torch.nn.Module"):
        build_model(f"{name}:not_a_module", 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"failed when called with kwargs \{'depth': 3\}: TypeError"):
        build_model(f"{name}:tiny", 10, (1, 8, 8), kwargs={"depth": 3})
    with pytest.raises(ValueError, match=r"model.blocks names \['nope'\]"):
        build_model(f"{name}:tiny", 10, (1, 8, 8), blocks=["nope"])
    with pytest.raises(ValueError, match="kwargs and blocks apply to a factory"):
        build_model("smallcnn", 10, (1, 8, 8), kwargs={"x": 1})


def test_the_output_check_runs_where_the_model_is():
    """check_model_output sends its batch (from any device) to the model's device and input dtype.

    A model on the meta device (shapes, no data) stands in for one on a GPU: a CPU batch it was not
    sent to fails there, as a GPU model fails on a CPU batch.
    """
    model = build_model("smallcnn", 10, (1, 8, 8), seed=0).to("meta")
    cpu_batch = torch.zeros(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="meta"):
        model(cpu_batch)  # what the check would hit without the move
    jobs.models.check_model_output(model, (1, 8, 8), 10, x=cpu_batch)
    jobs.models.check_model_output(model, (1, 8, 8), 10)  # its own batch of zeros: made on the model's device
    assert model.training  # its mode restored
    with pytest.raises(ValueError, match=r"outputs shape \(2, 10\) on a batch of 2; the dataset has 7 classes"):
        jobs.models.check_model_output(model, (1, 8, 8), 7, x=cpu_batch)


def test_output_shape_mismatch_is_refused_with_the_fix(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"outputs shape \(2, 5\).*10 classes.*num_classes: 10"):
        build_model(f"{name}:tiny", 10, (1, 8, 8), kwargs={"num_classes": 5})
    # torchvision's resnet18 wants 3 channels: the digits' 1-channel inputs fail on the check batch, named as such
    with pytest.raises(ValueError, match=r"fails on a batch of the dataset's inputs, shape \(2, 1, 8, 8\).*RuntimeError.*1-channel 8x8"):
        build_model("torchvision.models:resnet18", 10, (1, 8, 8), kwargs={"num_classes": 10})


def _study(name: str, **extra) -> dict:
    return {"name": "byo", "dataset": {"kind": "digits", "max_train": 200, "max_test": 100},
            "model": {"factory": f"{name}:tiny", "kwargs": {"hidden": 4}}, "train": {"epochs": 1},
            "population": {"seeds": 1}, "compression": [{"method": "torch_pruning", "levels": [0.5]}], **extra}


def test_output_shape_mismatch_stops_a_study_task_before_training(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    data = _study(name)
    data["model"]["kwargs"]["num_classes"] = 4
    spec = parse_study(data)
    monkeypatch.setattr(jobs, "train_model", lambda *a, **k: pytest.fail("trained a model whose outputs are wrong"))
    task = plan_study(spec, roles=["baseline"])[0]
    with pytest.raises(ValueError, match=r"outputs shape \(2, 4\) on a batch of 2; the dataset has 10 classes"):
        execute_task(task, spec.resolved())


def test_a_baseline_from_a_safetensors_file_is_loaded_not_trained(tmp_path, monkeypatch, device):
    name = user_module(tmp_path, monkeypatch)
    bundle = load_dataset("digits", max_train=200, max_test=100)
    theirs = build_model(f"{name}:tiny", 10, (1, 8, 8), seed=7, kwargs={"hidden": 4})
    theirs, _ = jobs.train_model(theirs, bundle, epochs=1, seed=7, device=device, log=None)
    theirs.cpu()  # the task below evaluates the given baseline on the CPU: compare on the CPU, bit for bit
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "s0.safetensors"))  # the user's own script
    spec = parse_study(_study(name, baseline={"weights": str(tmp_path / "s{seed}.safetensors")}))
    monkeypatch.setattr(jobs, "train_model", lambda *a, **k: pytest.fail("a given baseline must not be trained"))
    result = execute_task(plan_study(spec, roles=["baseline"])[0], spec.resolved())
    expected = predict_logits(theirs.eval(), bundle.test.batch(torch.arange(len(bundle.test)))[0]).argmax(axis=1)
    np.testing.assert_array_equal(result.predictions.sort_values("example_id")["pred"].to_numpy(), expected)
    assert not any(k.startswith("history/") for k in result.info)  # nothing was trained


def test_baseline_weights_that_do_not_fit_are_refused_by_key_and_shape(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    model = build_model(f"{name}:tiny", 10, (1, 8, 8), kwargs={"hidden": 4})
    wider = build_model(f"{name}:tiny", 10, (1, 8, 8), kwargs={"hidden": 6})
    save_file(dict(wider.state_dict()), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit the model .*tiny.*shape mismatches \['features.0.weight: file \(6, 1, 3, 3\) vs model \(4, 1, 3, 3\)'"):
        load_state_file(model, tmp_path / "wide.safetensors")
    state = dict(model.state_dict())
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\].*unexpected keys \['extra.weight'\]"):
        load_state_file(model, tmp_path / "keys.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="pickled torch file; compbias does not unpickle"):
        load_state_file(model, tmp_path / "w.pt")
    # through a study task: the same message, before any training
    spec = parse_study(_study(name, baseline={"weights": str(tmp_path / "wide.safetensors")}))
    with pytest.raises(ValueError, match="do not fit the model"):
        execute_task(plan_study(spec, roles=["baseline"])[0], spec.resolved())


def test_a_baseline_from_an_mlflow_model_uri(tmp_path, monkeypatch):
    import mlflow

    name = user_module(tmp_path, monkeypatch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the user's store, for their fluent mlflow calls
    theirs = build_model(f"{name}:tiny", 10, (1, 8, 8), seed=3, kwargs={"hidden": 4}).eval()
    save_file(dict(theirs.state_dict()), str(tmp_path / "weights.safetensors"))
    (tmp_path / "pickled").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "pickled" / "model.pth")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "weights.safetensors"), "net")
        mlflow.log_artifact(str(tmp_path / "pickled" / "model.pth"), "pickled")
    spec = parse_study(_study(name, baseline={"model_uri": f"runs:/{run.info.run_id}/net"}))
    result = execute_task(plan_study(spec, roles=["baseline"])[0], spec.resolved())
    bundle = load_dataset("digits", max_train=200, max_test=100)
    expected = predict_logits(theirs, bundle.test.batch(torch.arange(len(bundle.test)))[0]).argmax(axis=1)
    np.testing.assert_array_equal(result.predictions.sort_values("example_id")["pred"].to_numpy(), expected)
    spec = parse_study(_study(name, baseline={"model_uri": f"runs:/{run.info.run_id}/pickled"}))
    with pytest.raises(ValueError, match=r"holds 0 safetensors files \(files: \['model.pth'\]\).*never unpickles"):
        execute_task(plan_study(spec, roles=["baseline"])[0], spec.resolved())
    spec = parse_study(_study(name, baseline={"model_uri": "models:/no-such-model/1"}))
    with pytest.raises(ValueError, match="cannot download 'models:/no-such-model/1'"):
        execute_task(plan_study(spec, roles=["baseline"])[0], spec.resolved())


# -- the study file ---------------------------------------------------------------


def _parse(**parts):
    return parse_study({"name": "t", "compression": [{"method": "magnitude", "levels": [0.5]}], **parts})


def test_model_section_forms():
    assert _parse(model="resnet20").model.arch == "resnet20"
    s = _parse(model="torchvision.models:resnet18")
    assert s.model.is_factory and s.resolved()["model"] == {"arch": "torchvision.models:resnet18", "width": 1}
    s = _parse(model={"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}, "blocks": ["layer1"]})
    assert s.resolved()["model"] == {"arch": "torchvision.models:resnet18", "width": 1, "kwargs": {"num_classes": 10}, "blocks": ["layer1"]}
    assert parse_study(s.resolved()).resolved() == s.resolved()  # the logged study.yaml parses back the same
    for bad, match in [
        ({"arch": "vgg"}, "model.arch: unknown architecture 'vgg'.*import path of an nn.Module factory"),
        ({"arch": "smallcnn", "kwargs": {"a": 1}}, "apply to a factory import path"),
        ({"factory": "a.b:c", "width": 2}, "'width' applies to the built-in"),
        ({"factory": "a.b:c", "arch": "smallcnn"}, "either 'arch'.*or 'factory'"),
        ("not a path:x", "not an import path"),
    ]:
        with pytest.raises(StudyConfigError, match=match):
            _parse(model=bad)


def test_existing_studies_resolve_and_fingerprint_as_before():
    from compbias.platform.config import load_study

    spec = load_study("configs/digits.yaml")
    data = spec.resolved()
    assert set(data) == {"name", "dataset", "model", "train", "population", "compression", "resources", "mlflow", "audit"}
    assert data["model"] == {"arch": "smallcnn", "width": 1}
    assert all(set(c) == {"method", "schedule", "levels", "finetune_epochs", "mitigation"} for c in data["compression"])
    # the fingerprint of digits.yaml's baselines as computed before factories existed (resuming stays possible)
    assert [spec.model_fingerprint(i) for i in (None, 0, 1, 2)] == ["8cac780f252a", "7b56de7871cd", "eda7faf607e9", "e0847a7b45b0"]


def test_baseline_section():
    s = _parse(baseline={"weights": "w/s{seed}.safetensors"}, population={"seeds": [3, 5]})
    assert s.baseline.source_for(5, s.seeds()) == "w/s5.safetensors"
    s = _parse(baseline={"model_uri": ["models:/a/1", "models:/a/2"]}, population={"seeds": [3, 5]})
    assert s.baseline.source_for(5, s.seeds()) == "models:/a/2"
    assert s.model_fingerprint(None) != _parse(population={"seeds": [3, 5]}).model_fingerprint(None)
    for bad, match in [
        ({"weights": "one.safetensors"}, "one baseline for 3 seeds"),
        ({"weights": ["a", "b"]}, "2 entries for 3 seeds"),
        ({"weights": "a", "model_uri": "b"}, "exactly one of 'weights'"),
        ({"path": "a"}, "baseline.path: unknown key; allowed here: weights, model_uri"),
    ]:
        with pytest.raises(StudyConfigError, match=match):
            _parse(baseline=bad)


# -- the docs' snippets -------------------------------------------------------------


def test_the_bring_your_own_docs_snippets_run(tmp_path, monkeypatch):
    """Every study file in docs/bring-your-own.md's section validates; its Python files build and compress."""
    import yaml

    from tests.doc_snippets import section_snippets

    blocks = section_snippets("bring-your-own.md", "## Bring your own architecture and compression", ("yaml", "python"))
    studies = [parse_study(yaml.safe_load(body)) for kind, body in blocks if kind == "yaml"]
    assert len(studies) == 5
    files = {}
    for kind, body in blocks:
        first = body.splitlines()[0]
        fname = first.split()[1].rstrip(",:") if first.startswith("# ") else ""
        if kind == "python" and fname.endswith(".py"):
            files[fname] = body
    assert set(files) == {"mynets.py", "mycompress.py"}
    for fname, body in files.items():
        (tmp_path / fname).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("mynets", "mycompress"):
        sys.modules.pop(mod, None)
    bundle = load_dataset("digits", max_train=200, max_test=100)
    by_name = {s.name: s for s in studies}
    for name in ("mynet-digits", "given-baselines", "byo-compression"):
        m = by_name[name].model
        model = build_model(m.arch, bundle.n_classes, bundle.input_shape, m.width, seed=0, kwargs=m.kwargs, blocks=m.blocks)
    entry = by_name["byo-compression"].compression[0]
    compressed, info = jobs.compress_model(model.eval(), bundle, entry.method, 0.5, function=entry.function, log=None)
    assert (compressed[-1].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert info["params"] == info["baseline_params"]
    resnet = by_name["resnet18-folder"].model
    assert build_model(resnet.arch, 3, (3, 32, 32), kwargs=resnet.kwargs, blocks=resnet.blocks).block_names == (
        "layer1", "layer2", "layer3", "layer4")

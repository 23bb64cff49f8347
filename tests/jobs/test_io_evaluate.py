"""Evaluation tables, NaN logits, and safetensors round-trips for float, pruned and quantized models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from compbias.jobs import (
    build_model, compress_model, evaluate, layer_activations, load_dataset, load_model, save_model, train_model,
)
from compbias.jobs.models import model_device
from tests.jobs.devices import assert_same_logits


def test_evaluation_tables(baseline, digits):
    ev = evaluate(baseline, digits)
    p = ev.predictions
    assert list(p.columns) == ["example_id", "label", "pred", "prob", "ink"]
    assert p["example_id"].tolist() == list(range(len(digits.test)))
    assert p["label"].equals(digits.test_frame["label"]) and p["ink"].equals(digits.test_frame["ink"])
    assert ((p["prob"] > 0.1) & (p["prob"] <= 1.0)).all()
    assert ev.accuracy == pytest.approx((p["label"] == p["pred"]).mean())
    cm = confusion_matrix(p["label"], p["pred"], labels=range(10))
    assert np.array_equal(ev.confusion, cm)
    pc = ev.per_class
    assert pc["fp"].tolist() == (cm.sum(0) - np.diag(cm)).tolist()
    assert pc["fnr"].tolist() == pytest.approx(((cm.sum(1) - np.diag(cm)) / cm.sum(1)).tolist())
    g = ev.per_group
    assert set(g["group"]) == {"ink=0", "ink=1"}
    sizes = g.drop_duplicates("group").set_index("group")["size"]
    assert sizes["ink=1"] == int(digits.test_frame["ink"].sum())


def test_tied_top_logits_go_to_the_lowest_class_and_are_counted(baseline, digits):
    """A model whose logits sit on a coarse grid ties; ``pred`` takes the lowest tied class and ``n_ties`` counts them."""
    assert evaluate(baseline, digits).n_ties == 0  # a float model

    class Coarse(torch.nn.Module):  # the baseline's logits rounded to a step of 4: many exact ties
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.round(self.inner(x) / 4.0) * 4.0

    coarse = Coarse(baseline)
    ev = evaluate(coarse, digits, keep_logits=True)
    logits = ev.logits
    top = logits.max(axis=1, keepdims=True)
    tied = (logits == top).sum(axis=1) > 1
    assert tied.any() and ev.n_ties == int(tied.sum())
    first_top = (logits == top).argmax(axis=1)  # hand rule: the first (lowest) class holding the maximum
    assert (ev.predictions["pred"].to_numpy() == first_top).all()


def test_binary_task_reports_the_positive_class_per_group(celeba_root, device):
    b = load_dataset("celeba", root=celeba_root, target="Blond_Hair", groups=["Male", "Young"], image_size=8)
    model = build_model("smallcnn", 2, b.input_shape, seed=0)
    model, _ = train_model(model, b, epochs=1, batch_size=16, device=device, log=None)
    ev = evaluate(model, b)
    g = ev.per_group
    assert (g["class"] == 1).all()
    assert {"Male", "Young", "Male&Young"} == set(g["grouping"])
    male = g[g["group"] == "Male=1"].iloc[0]
    sub = ev.predictions[ev.predictions["Male"] == 1]
    neg = sub[sub["label"] == 0]
    assert male["fpr"] == pytest.approx((neg["pred"] == 1).mean()) if len(neg) else np.isnan(male["fpr"])


def test_nan_logits_are_a_clear_error(baseline, digits):
    broken = build_model("smallcnn", 10, digits.input_shape)
    broken.load_state_dict(baseline.state_dict())
    with torch.no_grad():
        broken.fc.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        evaluate(broken, digits)


@pytest.mark.parametrize(
    "method, level, options",
    [
        (None, None, {}),
        ("magnitude", 0.9, {"schedule": "oneshot", "finetune_epochs": 0}),
        ("structured", 0.5, {"schedule": "oneshot", "finetune_epochs": 0}),
        ("quantize", "int8_weight", {}),
        ("quantize", "int8_static", {}),
        ("quantize", "fp16", {}),
        ("quantize", "bf16", {}),
    ],
)
def test_save_load_round_trip_gives_identical_predictions(baseline, digits, tmp_path, device, method, level, options):
    model = baseline if method is None else compress_model(baseline, digits, method, level, device=device, log=None, **options)[0]
    save_model(model, {"class_names": digits.class_names, "seed": 0}, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model_spec.json", "weights.safetensors"]
    spec = json.loads((tmp_path / "m" / "model_spec.json").read_text())
    assert spec["arch"] == "smallcnn" and spec["input_shape"] == [1, 8, 8] and spec["seed"] == 0
    loaded = load_model(tmp_path / "m", device=model_device(model))  # bit-identical on the same device
    a, b = evaluate(model, digits, keep_logits=True), evaluate(loaded, digits, keep_logits=True)
    assert a.predictions.equals(b.predictions)
    assert np.array_equal(a.logits, b.logits)
    if model_device(model).type != "cpu":  # and loaded on the CPU: within the cross-device tolerance
        assert_same_logits(evaluate(load_model(tmp_path / "m"), digits, keep_logits=True).logits, a.logits, same_device=False)
    if method == "quantize":
        assert spec["quantization"]["mode"] == level and spec["compression"]["level"] == level
        assert loaded.compbias_quantization["mode"] == level
    if method in ("magnitude", "structured"):
        assert spec["compression"] == {"method": method, "level": level, "schedule": "oneshot", "mitigation": None}
    if isinstance(level, str) and level.startswith("int8"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / "m" / "weights.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("weight_int8")}
        assert dtypes == {"I8"}  # int8 weights really stored as int8


def test_load_model_puts_a_float_model_on_the_device_given_and_a_quantized_one_on_the_cpu(baseline, digits, tmp_path):
    save_model(baseline, None, tmp_path / "f")  # from the test device
    assert model_device(load_model(tmp_path / "f", device="meta")).type == "meta"  # meta: a stand-in for a GPU here
    q, _ = compress_model(baseline, digits, "quantize", "fp16", log=None)
    save_model(q, None, tmp_path / "q")
    assert model_device(load_model(tmp_path / "q", device="meta")).type == "cpu"


def test_load_model_errors(baseline, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_spec.json"):
        load_model(tmp_path)
    save_model(baseline, None, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model_spec.json").read_text())
    spec["arch"] = "resnet20"
    (tmp_path / "m" / "model_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not match the resnet20"):
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="contradicts the model"):
        save_model(baseline, {"n_classes": 3}, tmp_path / "x")


def test_a_loaded_baseline_can_be_compressed(baseline, small_digits, tmp_path, device):
    save_model(baseline, None, tmp_path / "b")
    loaded = load_model(tmp_path / "b")  # on the CPU; compress_model fine-tunes both on the test device
    a, _ = compress_model(baseline, small_digits, "magnitude", 0.5, schedule="oneshot", finetune_epochs=1, device=device, log=None)
    b, _ = compress_model(loaded, small_digits, "magnitude", 0.5, schedule="oneshot", finetune_epochs=1, device=device, log=None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="already compressed"):
        compress_model(a, small_digits, "quantize", "int8_weight", log=None)


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_resnets_quantize_prune_and_round_trip(imagefolder_split_root, tmp_path, device, arch):
    """Residual blocks, projection shortcuts and torchvision's layout survive every method and a round-trip."""
    b = load_dataset("imagefolder", root=imagefolder_split_root, image_size=8)
    base = build_model(arch, 3, b.input_shape, seed=0)
    base, _ = train_model(base, b, epochs=1, batch_size=12, device=device, log=None)
    float_logits = evaluate(base, b, keep_logits=True).logits
    for method, level, kw in [("quantize", "int8_static", {}), ("quantize", "fp16", {}),
                              ("structured", 0.5, {"schedule": "oneshot", "finetune_epochs": 0})]:
        model, info = compress_model(base, b, method, level, device=device, log=None, **kw)
        directory = tmp_path / f"{arch}-{level}"
        save_model(model, None, directory)
        loaded = load_model(directory, device=model_device(model))  # int8 / fp16 models are CPU models
        a, c = evaluate(model, b, keep_logits=True), evaluate(loaded, b, keep_logits=True)
        assert np.array_equal(a.logits, c.logits), (method, level)
        if level == "int8_static":
            assert info["quantization"]["batchnorm_folded"] >= 19
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
            assert np.abs(a.logits - float_logits).max() < 0.5 * np.abs(float_logits).max()
            x = b.test.batch(slice(0, 4))[0]
            acts, float_acts = layer_activations(model, x), layer_activations(base, x)
            assert list(acts) == list(float_acts) == [*base.block_names, "logits"]
            assert all(acts[k].shape == float_acts[k].shape for k in acts)

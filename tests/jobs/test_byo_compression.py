"""Bring your own compression: the user's function, Torch-Pruning, torch.nn.utils.prune, torchao."""

from __future__ import annotations

import copy
import importlib
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from compbias.jobs import build_model, byo, compress_model, evaluate, load_model, load_weights, predict_logits, save_model
from compbias.jobs.footprint import latency_batch
from compbias.jobs.models import model_device
from compbias.jobs.torchao_quant import TORCHAO_LEVELS, TorchaoUnavailable
from compbias.platform import config
from tests.jobs.devices import assert_same_logits

from .byo_helpers import rgb_bundle, user_module


def _reload_same(model, bundle, tmp_path):
    """Save, reload (directory and lone weights file) and check the logits: bit-identical on the model's device,
    within the cross-device tolerance on the CPU when the model is elsewhere. Returns the CPU copy."""
    save_model(model, {"seed": 0}, tmp_path / "saved")
    x = bundle.test.batch(torch.arange(min(64, len(bundle.test))))[0]
    want, device = predict_logits(model, x), model_device(model)
    for loaded in (load_model(tmp_path / "saved", device=device), load_weights(tmp_path / "saved" / "weights.safetensors", device=device)):
        np.testing.assert_array_equal(predict_logits(loaded, x), want)
    on_cpu = load_model(tmp_path / "saved")
    assert_same_logits(predict_logits(on_cpu, x), want, same_device=device.type == "cpu")
    return on_cpu


def _info_footprint(info):
    for key in ("params", "size_bytes", "latency_ms"):
        assert info[key] > 0 and info[f"baseline_{key}"] > 0, key


# -- custom ---------------------------------------------------------------------


def test_custom_function_is_called_with_model_bundle_level_seed(baseline, small_digits, tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    model, info = compress_model(baseline, small_digits, "custom", 0.5, function=f"{name}:scale_weights", seed=4, log=None)
    calls = importlib.import_module(name).CALLS
    assert calls == [(0.5, 4, len(small_digits.train), model_device(baseline))]  # a copy on the baseline's device
    assert model_device(model) == model_device(baseline)
    torch.testing.assert_close(model.fc.weight, baseline.fc.weight * 0.5)  # the user's function ran on a copy
    assert not torch.equal(model.fc.weight, baseline.fc.weight)
    assert info["method"] == "custom" and info["function"] == f"{name}:scale_weights"
    assert model.compbias_compression == {"method": "custom", "level": 0.5, "schedule": None, "mitigation": None,
                                          "function": f"{name}:scale_weights"}
    _info_footprint(info)
    _reload_same(model, small_digits, tmp_path)


def test_custom_function_may_shrink_shapes_and_still_reloads(tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    bundle = rgb_bundle()
    base = build_model(f"{name}:Tiny", 3, bundle.input_shape, seed=0, kwargs={"num_classes": 3, "in_channels": 3}).eval()
    model, info = compress_model(base, bundle, "custom", "half", function=f"{name}:halve_channels", log=None)
    assert model.features[0].out_channels == 4 and info["params"] < info["baseline_params"]
    assert model.compbias_compression["reshaped"] is True
    _reload_same(model, bundle, tmp_path)


@pytest.mark.parametrize("fn,match", [
    ("returns_none", "returned a NoneType; it must return the compressed torch.nn.Module"),
    ("wrong_classes", r"outputs shape \(2, 3\).*10 classes"),
    ("leave_masks", r"other state-dict keys .*head.weight_mask.*call prune.remove, or use method torch_prune"),
    ("raises", "custom compression function '.*:raises' failed at level 0.5: RuntimeError: my compression broke"),
    ("nope", "has no attribute 'nope'"),
])
def test_custom_function_errors_are_clear(fn, match, small_digits, tmp_path, monkeypatch):
    name = user_module(tmp_path, monkeypatch)
    base = build_model(f"{name}:tiny", 10, small_digits.input_shape, seed=0)
    with pytest.raises(ValueError, match=match):
        compress_model(base, small_digits, "custom", 0.5, function=f"{name}:{fn}", log=None)


def test_library_and_custom_methods_work_where_the_baseline_is(baseline, small_digits, monkeypatch):
    """A baseline on the meta device (shapes, no data) stands in for one on a GPU: Torch-Pruning's copy and
    example input are made there, and the custom function's copy and its output check run there."""
    import torch_pruning as tp

    meta = copy.deepcopy(baseline).to("meta")
    # the footprint times CPU copies, which a model without data cannot give: run the compression step alone
    monkeypatch.setattr(byo, "measured", lambda base, bundle, n, compress: compress(latency_batch(bundle, n)))
    seen = {}

    class Spy:
        def __init__(self, model, example_inputs, **kwargs):
            seen.update(model=model_device(model), example=example_inputs.device)
            raise RuntimeError("stopped by the test")

    monkeypatch.setattr(tp.pruner, "MetaPruner", Spy)
    with pytest.raises(ValueError, match="stopped by the test"):
        byo.library_prune("torch_pruning", meta, small_digits, 0.5)
    assert seen == {"model": torch.device("meta"), "example": torch.device("meta")}
    monkeypatch.setattr(byo, "measure_sparsity", lambda model, kind: (0.0, {}))  # counting zeros needs data
    model, info = byo.custom_compress(meta, small_digits, 0.5, function=lambda m, bundle, level, seed: m)
    assert model_device(model).type == "meta" and model is not meta and info["reshaped"] is False


def test_custom_needs_a_function(baseline, small_digits):
    with pytest.raises(ValueError, match="method custom needs function"):
        compress_model(baseline, small_digits, "custom", 0.5, log=None)


# -- Torch-Pruning ----------------------------------------------------------------


@pytest.mark.parametrize("level", [0.5, 0.75])
def test_torch_pruning_removes_channels_so_params_and_size_shrink(baseline, small_digits, tmp_path, level):
    model, info = compress_model(baseline, small_digits, "torch_pruning", level, finetune_epochs=0, log=None)
    assert model_device(model) == model_device(baseline)  # not fine-tuned: pruned and left where the baseline is
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    base_convs = [m for m in baseline.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [round(b.out_channels * (1 - level)) for b in base_convs]  # physically removed
    assert model.fc.out_features == 10 and model.fc.in_features == convs[-1].out_channels  # the classifier keeps its classes
    assert info["params"] < (1 - level) * info["baseline_params"]  # convs shrink in both dimensions
    assert info["size_bytes"] < (1 - level) * info["baseline_size_bytes"]
    assert info["sparsity"] == pytest.approx(1 - info["params"] / info["baseline_params"])
    assert info["params"] == sum(p.numel() for p in model.parameters())
    _info_footprint(info)
    reloaded = _reload_same(model, small_digits, tmp_path)
    assert [m.out_channels for m in reloaded.modules() if isinstance(m, nn.Conv2d)] == [c.out_channels for c in convs]
    assert sum(p.numel() for p in baseline.parameters()) == info["baseline_params"]  # the baseline is untouched


def test_torch_pruning_fine_tunes_the_smaller_model_on_a_residual_network(small_digits, tmp_path, device):
    base = build_model("resnet20", 10, small_digits.input_shape, seed=0).eval()  # on the CPU, fine-tuned on the test device
    model, info = compress_model(base, small_digits, "torch_pruning", 0.5, finetune_epochs=1, batch_size=128, device=device,
                                 log=None)
    assert model_device(model).type == device.type
    assert len(info["history"]) == 1 and info["final_loss"] > 0
    assert info["params"] < 0.5 * info["baseline_params"]
    assert model.layer1[0].conv1.out_channels == 8
    _reload_same(model, small_digits, tmp_path)


def test_torch_pruning_on_torchvision_resnet18():
    bundle = rgb_bundle()
    base = build_model("torchvision.models:resnet18", 3, bundle.input_shape, seed=0, kwargs={"num_classes": 3}).eval()
    model, info = compress_model(base, bundle, "torch_pruning", 0.5, finetune_epochs=0, log=None)
    assert model.conv1.out_channels == 32 and model.fc.out_features == 3
    assert info["params"] < 0.3 * info["baseline_params"]
    assert evaluate(model, bundle).predictions.shape[0] == len(bundle.test)


def test_torch_pruning_options_are_checked(baseline, small_digits):
    with pytest.raises(ValueError, match="importance must be one of l1, l2, random"):
        compress_model(baseline, small_digits, "torch_pruning", 0.5, options={"importance": "taylor"}, log=None)
    with pytest.raises(ValueError, match=r"options \['style'\] unknown"):
        compress_model(baseline, small_digits, "torch_pruning", 0.5, options={"style": "x"}, log=None)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\)"):
        compress_model(baseline, small_digits, "torch_pruning", 1.0, log=None)


def test_library_prune_refuses_other_methods_and_unknown_fine_tuning_options(baseline, small_digits):
    with pytest.raises(ValueError, match="prunes with torch_pruning or torch_prune, not 'magnitude'"):
        byo.library_prune("magnitude", baseline, small_digits, 0.5)
    with pytest.raises(TypeError, match="finetune_lr"):  # the fine-tuning options are FineTuning's fields, no others
        byo.torch_prune_compress(baseline, small_digits, 0.5, finetune_lr=0.1)
    with pytest.raises(ValueError, match="give finetune_epochs >= 1"):
        byo.torch_prune_compress(baseline, small_digits, 0.5, mitigation="kd")


# -- torch.nn.utils.prune ---------------------------------------------------------


def test_torch_prune_masks_are_made_permanent(baseline, small_digits, tmp_path, device):
    model, info = compress_model(baseline, small_digits, "torch_prune", 0.8, finetune_epochs=1, device=device, log=None)
    keys = set(model.state_dict())
    assert keys == set(baseline.state_dict())  # no weight_orig / weight_mask left
    assert not any(m._forward_pre_hooks for m in model.modules())  # prune.remove dropped the re-masking hooks
    assert all(isinstance(m.weight, nn.Parameter) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert info["sparsity"] == pytest.approx(0.8, abs=1e-3)  # global L1: 80% of the conv+linear weights, after fine-tuning
    assert len(info["history"]) == 1
    assert info["size_bytes_sparse"] < info["size_bytes"] == info["baseline_size_bytes"]
    _info_footprint(info)
    reloaded = _reload_same(model, small_digits, tmp_path)
    assert reloaded.compbias_compression["method"] == "torch_prune"


def test_torch_prune_ln_structured_zeroes_whole_filters(baseline, small_digits):
    model, info = compress_model(baseline, small_digits, "torch_prune", 0.5, finetune_epochs=0,
                                 options={"style": "ln_structured", "n": 1}, log=None)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            alive = m.weight.detach().flatten(1).abs().sum(1) > 0
            assert int((~alive).sum()) == m.out_channels // 2
    assert info["style"] == "ln_structured" and info["sparsity"] == pytest.approx(0.5)


# -- torchao ----------------------------------------------------------------------


@pytest.mark.parametrize("level", ["int8_weight_only", "int8_dynamic", "float8_weight_only"])
def test_torchao_configs_that_work_on_cpu(baseline, digits, tmp_path, level):
    model, info = compress_model(baseline, digits, "torchao", level, log=None)
    assert model_device(model).type == "cpu"  # torchao quantizes a CPU copy, whatever device the baseline is on
    assert type(model.fc.weight).__name__ in ("Int8Tensor", "Float8Tensor")
    assert info["quantization"]["layers"] == ["fc"] and info["quantization"]["config"] == level
    assert info["size_bytes"] < info["baseline_size_bytes"]
    _info_footprint(info)
    assert evaluate(model, digits).accuracy > evaluate(baseline, digits).accuracy - 0.02
    reloaded = _reload_same(model, digits, tmp_path)
    assert type(reloaded.fc.weight).__name__ == type(model.fc.weight).__name__


@pytest.mark.parametrize("level,torchao_error", [
    ("int4_weight_only", "quantized no layer of this model"),
    ("float8_dynamic", "AssertionError: Float8 dynamic quantization requires CUDA"),
])
def test_torchao_configs_that_fail_here_name_the_torchao_error(baseline, digits, level, torchao_error):
    """The CPU behaviour docs/methods.md documents (on a CUDA machine torchao may run them: then it must work)."""
    try:
        model, info = compress_model(baseline, digits, "torchao", level, log=None)
    except TorchaoUnavailable as exc:
        if not torch.cuda.is_available():
            assert re.search(f"config .* \\(level {level}\\) .*{torchao_error}", str(exc)), str(exc)
    else:
        assert torch.cuda.is_available(), f"{level} worked on a CPU-only machine: update docs/methods.md"
        assert info["quantization"]["layers"]


def test_torchao_int4_on_a_wide_layer_names_torchaos_import_error():
    from compbias.jobs.torchao_quant import torchao_quantize

    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    try:
        torchao_quantize(net, "int4_weight_only")
    except TorchaoUnavailable as exc:
        assert re.search("Int4WeightOnlyConfig .*fails on this machine: ImportError: Requires mslk", str(exc)), str(exc)
    else:
        pytest.fail("int4_weight_only worked here: torchao gained a CPU int4 kernel; update docs/methods.md")


def test_study_file_accepts_exactly_the_jobs_vocabulary():
    from compbias.jobs import vocabulary as v

    assert TORCHAO_LEVELS == v.TORCHAO_LEVELS  # what torchao_quant applies is what the study file names

    def entry(method, levels, **extra):
        base = {"custom": {"function": "mypkg.compress:shrink"}}.get(method, {})
        return {"method": method, "levels": levels, **base, **extra}

    def refusal(*entries, **sections):
        with pytest.raises(config.StudyConfigError) as info:
            config.parse_study({"name": "t", "compression": list(entries), **sections})
        return str(info.value)

    example = {"quantize": [v.QUANT_LEVELS[0]], "torchao": [v.TORCHAO_LEVELS[0]]}
    spec = config.parse_study({"name": "t", "compression": [entry(m, example.get(m, [0.5])) for m in v.METHODS]})
    assert [c.method for c in spec.compression] == list(v.METHODS)
    assert all(repr(m) in refusal(entry("lottery", [0.5])) for m in v.METHODS)
    # levels: every listed name, nothing else; fractions in (0, 1) for the pruning methods
    assert config.parse_study({"name": "t", "compression": [entry("quantize", list(v.QUANT_LEVELS)),
                                                            entry("torchao", list(v.TORCHAO_LEVELS))]})
    assert "not a quantization level" in refusal(entry("quantize", [v.TORCHAO_LEVELS[0]]))
    assert "not a torchao level" in refusal(entry("torchao", [v.QUANT_LEVELS[0]]))
    for method in ("magnitude", "structured", "torch_pruning", "torch_prune"):
        for bad in (0.0, 1.0, "int8_weight"):
            assert "compression[0].levels[0]" in refusal(entry(method, [bad]))
    # schedules and mitigations
    for s in v.SCHEDULES:
        assert config.parse_study({"name": "t", "compression": [entry("magnitude", [0.5], schedule=s)]})
    assert all(repr(s) in refusal(entry("magnitude", [0.5], schedule="weekly")) for s in v.SCHEDULES)
    for mit in v.MITIGATIONS:
        assert config.parse_study({"name": "t", "compression": [entry("magnitude", [0.5], mitigation=mit)]})
    assert all(repr(m) in refusal(entry("magnitude", [0.5], mitigation="crd")) for m in v.MITIGATIONS)
    # method options: each listed option with a valid value; methods without options take none
    valid = {tuple: lambda allowed: allowed[-1], bool: lambda _: True, int: lambda _: 2}
    for method, allowed in v.METHOD_OPTIONS.items():
        if allowed:
            options = {k: valid[kind if isinstance(kind, type) else tuple](kind) for k, kind in allowed.items()}
            assert config.parse_study({"name": "t", "compression": [entry(method, [0.5], options=options)]})
            assert "unknown" in refusal(entry(method, [0.5], options={"colour": 1}))
    for method in v.METHODS:
        if not v.METHOD_OPTIONS.get(method):
            assert f"method {method} takes no options" in refusal(entry(method, example.get(method, [0.5]), options={"x": 1}))
    # dataset kinds and architectures
    assert all(repr(k) in refusal(entry("magnitude", [0.5]), dataset={"kind": "mnist"}) for k in v.DATASET_KINDS)
    for arch in v.ARCHS:
        assert config.parse_study({"name": "t", "model": arch, "compression": [entry("magnitude", [0.5])]}).model.arch == arch
    assert all(a in refusal(entry("magnitude", [0.5]), model="vgg") for a in v.ARCHS)


def test_study_file_entries_for_the_new_methods():
    spec = config.parse_study({"name": "t", "compression": [
        {"method": "custom", "function": "mypkg.compress:shrink", "levels": [0.5, "aggressive"]},
        {"method": "torch_pruning", "levels": [0.3, 0.6], "finetune_epochs": 2, "mitigation": "kd", "options": {"importance": "l2"}},
        {"method": "torch_prune", "levels": [0.9], "options": {"style": "ln_structured", "n": 2}},
        {"method": "torchao", "levels": ["int8_weight_only", "int8_dynamic"]},
    ]})
    assert [c.name for c in spec.compression] == ["custom", "torch_pruning+kd", "torch_prune", "torchao"]
    assert spec.compression[0].levels == [0.5, "aggressive"] and spec.compression[0].finetune_epochs == 0
    assert spec.compression[2].finetune_epochs == 0
    for entry, match in [
        ({"method": "custom", "levels": [1]}, "method custom needs 'function"),
        ({"method": "custom", "function": "x", "levels": [1]}, "not an import path"),
        ({"method": "torchao", "levels": ["int8_weight"]}, "not a torchao level"),
        ({"method": "torchao", "levels": ["int8_dynamic"], "finetune_epochs": 2}, "does not fine-tune"),
        ({"method": "torch_pruning", "levels": [0.5], "schedule": "gradual"}, "prunes or quantizes at once"),
        ({"method": "torch_pruning", "levels": [0.5], "mitigation": "kd"}, "finetune_epochs >= 1"),
        ({"method": "torch_pruning", "levels": [1.5]}, "not a channel pruning ratio"),
        ({"method": "torch_prune", "levels": [0.5], "options": {"n": 0}}, "options.n: give a positive integer"),
        ({"method": "magnitude", "levels": [0.5], "function": "a.b:c"}, "'function' applies to method custom only"),
        ({"method": "quantize", "levels": ["fp16"], "options": {"style": "x"}}, "method quantize takes no options"),
    ]:
        with pytest.raises(config.StudyConfigError, match=match):
            config.parse_study({"name": "t", "compression": [entry]})

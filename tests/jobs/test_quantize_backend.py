"""int8 on torch.ao.quantization: real int8 modules, the integer arithmetic they compute, agreement with
compbias's independent simulation, bit-exact safetensors round-trips, old saves still loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn as nn
import torch.nn.functional as F

from compbias.jobs import capture_blocks, evaluate, load_model, save_model
from compbias.jobs.quantize import (
    Int8StaticLayer,
    Int8WeightOnlyConv2d,
    Int8WeightOnlyLinear,
    QuantizedConv2d,
    QuantizedLinear,
    fold_batchnorm,
    is_quantized,
    quantize_model,
    select_engine,
    simulate_int8,
)


@pytest.fixture(scope="module")
def calibration(digits):
    """512 seeded training images in batches of 128, as compress_model picks them."""
    idx = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(digits.train), 512, replace=False)))
    return [digits.train.batch(idx[i : i + 128])[0] for i in range(0, 512, 128)]


@pytest.fixture(scope="module")
def static(baseline, calibration):
    return quantize_model(baseline, "int8_static", calibration=calibration)


def _test_inputs(digits):
    return digits.test.batch(slice(0, len(digits.test)))


def test_int8_static_model_is_made_of_torch_ao_int8_modules(baseline, digits, static):
    q, info = static
    record = info["quantization"]
    engine = select_engine()  # x86 wherever torch has it (this machine, CI)
    assert record["backend"] == f"torch.ao.quantization (eager, {engine})" and record["engine"] == engine
    reduce = engine in ("x86", "fbgemm")  # 7-bit activations on the engines whose kernels need it
    assert record["activation"]["range"] == [0, 127 if reduce else 255] and record["activation"]["reduce_range"] is reduce
    assert record["fused_relu"] == ["block1.conv", "block2.conv", "block3.conv"]
    wrappers = {n: m for n, m in q.named_modules() if isinstance(m, Int8StaticLayer)}
    assert sorted(wrappers) == ["block1.conv", "block2.conv", "block3.conv", "fc"]  # replaced in place: names kept
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for m in q.modules())
    for name, w in wrappers.items():
        assert isinstance(w.layer, nnq.Linear if name == "fc" else nnq.Conv2d)
        weight = w.layer.weight()
        assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
        assert torch.equal(weight.q_per_channel_zero_points(), torch.zeros(weight.shape[0], dtype=torch.int64))  # symmetric
        assert isinstance(w.quant, nnq.Quantize) and w.quant.dtype == torch.quint8
    assert is_quantized(q)
    x, _ = _test_inputs(digits)
    float_logits = torch.from_numpy(evaluate(baseline, digits, keep_logits=True).logits)
    with torch.no_grad():
        assert (q(x) - float_logits).abs().max() > 1e-2  # the quantization error is really there


def _int64_layer(w: Int8StaticLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent integer computation of one int8 layer: (expected uint8 output, the module's uint8 output)."""
    qx = w.quant(x)
    s_x, z_x = qx.q_scale(), qx.q_zero_point()
    xi = qx.int_repr().to(torch.int64) - z_x
    weight = w.layer.weight()
    wi = weight.int_repr().to(torch.int64)
    s_w = weight.q_per_channel_scales().to(torch.float64)
    bias = w.layer.bias().to(torch.float64)
    if wi.ndim == 4:
        conv = w.layer
        cols = F.unfold(xi.to(torch.float64), conv.kernel_size, padding=conv.padding, stride=conv.stride)
        acc = torch.einsum("ok,nkl->nol", wi.flatten(1), cols.round().to(torch.int64))  # int64 sums
        out_h = (x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        acc, shape = acc.view(acc.shape[0], acc.shape[1], out_h, -1), (1, -1, 1, 1)
    else:
        acc, shape = xi @ wi.T, (1, -1)
    acc_scale = s_x * s_w
    acc = acc + torch.round(bias / acc_scale).to(torch.int64).view(shape)
    s_o, z_o = w.layer.scale, w.layer.zero_point
    expected = torch.round(acc.to(torch.float64) * (acc_scale / s_o).view(shape)) + z_o
    lo = z_o if "ReLU" in type(w.layer).__name__ else 0
    expected = expected.clamp(lo, 255).to(torch.int64)
    got = w.layer(qx).int_repr().to(torch.int64)
    return expected, got


def test_each_int8_layer_computes_the_integer_formula(digits, static):
    """Per layer: requantize(sum((q_x - z_x) * q_w) + round(b / (s_x s_w))) in int64, within one output quantum."""
    q, _ = static
    x, _ = _test_inputs(digits)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in q.named_modules() if isinstance(m, Int8StaticLayer)]
    with torch.no_grad():
        q(x[:200])
    for h in hooks:
        h.remove()
    assert len(inputs) == 4
    for name, layer_input in inputs.items():
        expected, got = _int64_layer(q.get_submodule(name), layer_input)
        diff = (expected - got).abs()
        assert diff.max() <= 1, name
        assert (diff == 0).float().mean() > 0.99, name  # off by one only where the kernel's float32 requantization rounds the other way
        assert got.unique().numel() > 20, name  # outputs really spread over the uint8 grid


def test_int8_static_agrees_with_the_independent_simulation(baseline, digits, calibration, static):
    q, _ = static
    sim, info = simulate_int8(baseline, "int8_static", calibration=calibration)
    assert info["quantization"]["backend"] == "compbias.simulation"
    x, y = _test_inputs(digits)
    pf = torch.from_numpy(evaluate(baseline, digits, keep_logits=True).logits).argmax(1)
    with torch.no_grad():
        pq, ps = q(x).argmax(1), sim(x).argmax(1)
    assert (pq == ps).float().mean() >= 0.97
    acc_q, acc_f = (pq == y).float().mean().item(), (pf == y).float().mean().item()
    assert abs(acc_q - acc_f) <= 0.02
    assert evaluate(q, digits).accuracy == pytest.approx(acc_q)  # evaluate reports the int8 model's own accuracy


def test_int8_weight_is_torch_per_channel_grid_with_float_compute(baseline, digits, calibration):
    q, info = quantize_model(baseline, "int8_weight")
    assert info["quantization"]["activation"] is None and "torch.ao" in info["quantization"]["backend"]
    folded, _ = fold_batchnorm(baseline)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, (Int8WeightOnlyConv2d, Int8WeightOnlyLinear))}
    assert sorted(layers) == ["block1.conv", "block2.conv", "block3.conv", "fc"]
    for name, m in layers.items():
        w = folded.get_submodule(name).weight.detach()
        scale = w.flatten(1).abs().amax(1) / 127.5  # torch's symmetric qint8 observer: max|w| / ((127 + 128) / 2)
        assert torch.allclose(m.weight_scale.double(), scale.double(), rtol=1e-6, atol=0)
        ratio = w / scale.view(-1, *([1] * (w.ndim - 1)))
        assert (m.weight_int8.float() - ratio.clamp(-128, 127)).abs().max() <= 0.5 + 1e-4  # nearest grid point
        assert m.weight().dtype == torch.qint8
    x, y = _test_inputs(digits)
    acts = {}
    with torch.no_grad():
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: acts.__setitem__(n, a[0])) for n, m in layers.items()]
        logits = q(x)
        for h in hooks:
            h.remove()
        conv = layers["block2.conv"]
        ref = F.conv2d(acts["block2.conv"], conv.weight_int8.float() * conv.weight_scale.float().view(-1, 1, 1, 1),
                       conv.bias, conv.stride, conv.padding)
        assert torch.allclose(conv(acts["block2.conv"]), ref, atol=1e-5, rtol=0)  # float32 compute, int8 weights
    sim, _ = simulate_int8(baseline, "int8_weight")
    with torch.no_grad():
        assert (logits.argmax(1) == sim(x).argmax(1)).float().mean() >= 0.97
    assert abs((logits.argmax(1) == y).float().mean().item() - evaluate(baseline, digits).accuracy) <= 0.02


@pytest.mark.parametrize("level", ["int8_static", "int8_weight"])
def test_block_hooks_see_the_quantized_model(digits, static, baseline, level):
    """capture_blocks / layer_activations work on quantized models, and see the int8 layers' outputs."""
    q = static[0] if level == "int8_static" else quantize_model(baseline, level)[0]
    x, _ = _test_inputs(digits)
    with torch.no_grad(), capture_blocks(q) as store:
        q(x[:64])
    assert list(store) == list(q.block_names)
    if level == "int8_static":
        s_o = q.block1.conv.layer.scale
        grid = store["block1"] / s_o  # block1's output is the fused conv+ReLU's uint8 output, dequantized
        assert torch.allclose(grid, grid.round(), atol=1e-3) and grid.min() >= 0


@pytest.mark.parametrize("level", ["int8_static", "int8_weight"])
def test_safetensors_round_trip_is_bit_exact_and_plain(baseline, digits, calibration, tmp_path, level):
    q, info = quantize_model(baseline, level, calibration=calibration if level == "int8_static" else None)
    q.compbias_quantization = info["quantization"]
    save_model(q, None, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model_spec.json").read_text())
    assert spec["quantization"]["backend"].startswith("torch.ao.quantization")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith("weight_int8")} == {"I8"}
    assert sum(k.endswith("weight_int8") for k in dtypes) == 4
    loaded = load_model(tmp_path / "m")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    x, _ = _test_inputs(digits)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.compbias_quantization == spec["quantization"]


def test_models_saved_in_the_old_format_still_load(baseline, digits, calibration, tmp_path):
    """Saves from before torch.ao (own simulated modules, no 'backend' in the spec) load as they were."""
    for level in ("int8_static", "int8_weight"):
        sim, info = simulate_int8(baseline, level, calibration=calibration)
        old_record = {k: v for k, v in info["quantization"].items() if k != "backend"}
        sim.compbias_quantization = old_record
        save_model(sim, None, tmp_path / level)
        assert "backend" not in json.loads((tmp_path / level / "model_spec.json").read_text())["quantization"]
        loaded = load_model(tmp_path / level)
        assert {type(m) for m in loaded.modules() if isinstance(m, (QuantizedConv2d, QuantizedLinear))} == {QuantizedConv2d, QuantizedLinear}
        x, _ = _test_inputs(digits)
        with torch.no_grad():
            assert torch.equal(loaded(x), sim(x))


def test_qnnpack_engine_full_range_and_round_trip(baseline, digits, calibration, tmp_path):
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    before = torch.backends.quantized.engine
    q, info = quantize_model(baseline, "int8_static", calibration=calibration, engine="qnnpack")
    record = info["quantization"]
    assert record["engine"] == "qnnpack" and record["activation"]["range"] == [0, 255]
    assert torch.backends.quantized.engine == before  # the global engine is restored
    q.compbias_quantization = record
    save_model(q, None, tmp_path / "m")
    x, y = _test_inputs(digits)
    with torch.no_grad():
        out = q(x)
        assert torch.equal(load_model(tmp_path / "m")(x), out)
    assert (out.argmax(1) == y).float().mean() > evaluate(baseline, digits).accuracy - 0.02


def test_quantize_errors_are_clear(baseline):
    with pytest.raises(ValueError, match="calibration batches"):
        quantize_model(baseline, "int8_static")
    with pytest.raises(ValueError, match="no batches"):
        quantize_model(baseline, "int8_static", calibration=[])
    with pytest.raises(RuntimeError, match="not supported by this torch build"):
        quantize_model(baseline, "int8_static", calibration=[torch.zeros(1, 1, 8, 8)], engine="tpu")
    with pytest.raises(ValueError, match="unknown quantization level"):
        quantize_model(baseline, "int4")


def test_engine_falls_back_when_x86_is_missing(monkeypatch):
    supported = torch._C._supported_qengines()
    names = dict(zip(torch.backends.quantized.supported_engines, supported))
    if not {"x86", "fbgemm", "qnnpack"} <= set(names):
        pytest.skip(f"this torch build lacks some of the engines the fallback test removes one by one: {sorted(names)}")
    assert select_engine() == "x86"
    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [e for n, e in names.items() if n != "x86"])
    assert select_engine() == "fbgemm"
    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [e for n, e in names.items() if n == "qnnpack"])
    assert select_engine() == "qnnpack"
    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [e for n, e in names.items() if n == "onednn"])
    with pytest.raises(RuntimeError, match="none of the quantized engines"):
        select_engine()

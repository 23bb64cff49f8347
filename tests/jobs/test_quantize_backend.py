"""int8 on torch.ao.quantization: real int8 modules, the integer arithmetic they compute, the float-output
classifier (no ties from a logit grid), agreement with compbias's independent simulation, bit-exact
safetensors round-trips, old saves still loading."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn as nn
import torch.nn.functional as F

from compbias.jobs import build_model, capture_blocks, evaluate, load_model, save_model, train_model
from compbias.jobs.data import TensorImageDataset
from compbias.jobs.quantize import (
    FLOAT_OUTPUT_KERNEL,
    Int8LinearFloatOut,
    Int8StaticLayer,
    Int8WeightOnlyConv2d,
    Int8WeightOnlyLinear,
    QuantizedConv2d,
    QuantizedLinear,
    fold_batchnorm,
    is_quantized,
    output_linear,
    quantize_model,
    select_engine,
)
from compbias.jobs.quantize import QUANT_FORMAT_VERSION, activation_qmax, quantization_format_version
from compbias.jobs.quantize.engine import use_engine
from compbias.jobs.quantize.static import convert_mapping, static_qconfig
from tests.jobs import int8_reference
from tests.jobs.int8_simulation import simulate_int8


@pytest.fixture(scope="module")
def baseline(baseline):
    """The conftest baseline on the CPU: int8 is a CPU matter here (quantize_model returns CPU models),
    and these tests compare the int8 layers with the float model's own layers."""
    return copy.deepcopy(baseline).cpu()


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
    assert record["output_layer"] == {"name": "fc", "output": "float32 (int32 accumulator dequantized, not requantized)",
                                      "kernel": f"{FLOAT_OUTPUT_KERNEL} ({engine})" if engine in ("x86", "fbgemm") else record["output_layer"]["kernel"]}
    wrappers = {n: m for n, m in q.named_modules() if isinstance(m, Int8StaticLayer)}
    assert sorted(wrappers) == ["block1.conv", "block2.conv", "block3.conv"]  # replaced in place: names kept
    assert isinstance(q.fc, Int8LinearFloatOut)  # the classifier: int8 in, float32 out
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for m in q.modules())
    for name, w in wrappers.items():
        assert isinstance(w.layer, nnq.Conv2d)
        assert isinstance(w.quant, nnq.Quantize) and w.quant.dtype == torch.quint8
    for weight in [w.layer.weight() for w in wrappers.values()] + [q.fc.weight()]:
        assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
        assert torch.equal(weight.q_per_channel_zero_points(), torch.zeros(weight.shape[0], dtype=torch.int64))  # symmetric
    assert q.fc.weight_int8.dtype == torch.int8 and q.fc.weight_int8.shape == (10, 64)
    assert is_quantized(q)
    x, _ = _test_inputs(digits)
    float_logits = torch.from_numpy(evaluate(baseline, digits, keep_logits=True).logits)
    with torch.no_grad():
        assert (q(x) - float_logits).abs().max() > 1e-2  # the quantization error is really there


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
    assert sorted(inputs) == ["block1.conv", "block2.conv", "block3.conv"]  # fc: see the float-output test
    for name, layer_input in inputs.items():
        expected, got = int8_reference.hidden_layer(q.get_submodule(name), layer_input, activation_qmax(select_engine()))
        diff = (expected - got).abs()
        assert diff.max() <= 1, name
        assert (diff == 0).float().mean() > 0.99, name  # off by one only where the kernel's float32 requantization rounds the other way
        assert got.unique().numel() > 20, name  # outputs really spread over the uint8 grid


def _fc_inputs(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float input the model's classifier ``fc`` receives for ``x``."""
    seen = []
    h = q.fc.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        q(x)
    h.remove()
    return torch.cat(seen)


def test_output_layer_computes_int8_products_with_float32_output(baseline, digits, calibration, static):
    """fc: calibrated quint8 input, int8 weights, the int64 sum dequantized to float32 (not requantized)."""
    q, _ = static
    x, _ = _test_inputs(digits)
    fc_in = _fc_inputs(q, x)
    with torch.no_grad():
        got = q.fc(fc_in)
    expected = int8_reference.float_output_layer(q.fc, fc_in, activation_qmax(select_engine()))
    assert got.dtype == torch.float32 and got.shape == (len(x), 10)
    # equal within float32 rounding of the scale product and the sum (no output quantum anywhere)
    assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    # the input grid is the calibration observer's (min/max of what fc of the float model saw), as for every
    # other layer (7 bits on x86 / fbgemm)
    folded, _ = fold_batchnorm(baseline)
    observed = torch.cat([_fc_inputs(folded, xb) for xb in calibration])
    hi = 127 if select_engine() in ("x86", "fbgemm") else 255
    assert float(q.fc.input_scale) == pytest.approx(float(observed.max().clamp(min=0)) / hi, rel=1e-6)
    assert int(q.fc.input_zero_point) == 0  # inputs after ReLU + pooling are non-negative
    assert float(q.fc.input_scale) == float(_requantizing_classifier(q, baseline, calibration).fc.quant.scale)
    # float logits are not on a grid: they take (almost) as many values as there are logits
    assert got.unique().numel() > 0.95 * got.numel()
    # and the float model and the int8 model differ by the quantization error, not more
    float_logits = torch.from_numpy(evaluate(baseline, digits, keep_logits=True).logits)
    assert 1e-3 < (got - float_logits).abs().max() < 0.1 * float(float_logits.abs().max())


def _requantizing_classifier(q: nn.Module, baseline: nn.Module, calibration) -> nn.Module:
    """A copy of ``q`` whose fc is what int8_static built before the float-output classifier.

    fc wrapped as ``QuantStub -> Linear -> DeQuantStub``, prepared, calibrated on the inputs
    fc of the (folded) float model sees for the calibration batches -- what the whole-model
    calibration fed it -- and converted by torch.ao with compbias's qconfig and mapping: its
    output is requantized to quint8 (7 bits on x86) with a calibrated scale.
    """
    engine = q.compbias_engine
    old = copy.deepcopy(q)
    folded, _ = fold_batchnorm(baseline)
    wrapper = Int8StaticLayer(copy.deepcopy(folded.fc))
    wrapper.qconfig = static_qconfig(engine)
    with use_engine(engine), torch.no_grad():
        import torch.ao.quantization as tq

        tq.prepare(wrapper, inplace=True)
        for xb in calibration:
            wrapper(_fc_inputs(folded, xb))
        tq.convert(wrapper, mapping=convert_mapping(), inplace=True)
    wrapper.layer.compbias_engine = engine
    old.fc = wrapper
    return old


def _ties(logits: torch.Tensor) -> int:
    """Number of rows whose two largest logits are exactly equal (argmax then picks the lower class)."""
    top = logits.topk(2, dim=1).values
    return int((top[:, 0] == top[:, 1]).sum())


@pytest.fixture(scope="module")
def binary(device):
    """A binary task (digit >= 5) and a smallcnn trained on it for 4 epochs (about 2 s on one core)."""
    from compbias.jobs import load_dataset

    d = load_dataset("digits")
    relabel = lambda ds: TensorImageDataset(ds.images, (ds.labels >= 5).long(), ds.scale)  # noqa: E731
    bundle = dataclasses.replace(d, train=relabel(d.train), test=relabel(d.test), n_classes=2,
                                 class_names=["0-4", "5-9"], positive_class=1)
    model = build_model("smallcnn", 2, bundle.input_shape, seed=0)
    model, _ = train_model(model, bundle, epochs=4, seed=0, device=device, log=None)
    model.cpu()  # compared layer by layer with its int8 copy, which is a CPU model
    idx = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(bundle.train), 512, replace=False)))
    calibration = [bundle.train.batch(idx[i : i + 128])[0] for i in range(0, 512, 128)]
    return bundle, model.eval(), calibration


def test_no_logit_ties_from_an_output_grid_on_a_binary_task(binary):
    """Near the decision boundary requantized logits tie (argmax -> class 0); the float-output classifier does not."""
    bundle, model, calibration = binary
    q, _ = quantize_model(model, "int8_static", calibration=calibration)
    requantized = _requantizing_classifier(q, model, calibration)
    # inputs that cross the decision boundary: 101-step paths between 30 pairs of test images of different classes
    x, y = bundle.test.batch(slice(0, len(bundle.test)))
    a, b = x[y == 0][:30], x[y == 1][:30]
    t = torch.linspace(0, 1, 101).view(1, -1, 1, 1, 1)
    paths = ((1 - t) * a.unsqueeze(1) + t * b.unsqueeze(1)).flatten(0, 1)
    with torch.no_grad():
        lf, lq, lr = model(paths), q(paths), requantized(paths)
    assert (lf.argmax(1).view(30, 101)[:, [0, -1]] == torch.tensor([0, 1])).float().mean() > 0.9  # the paths cross
    ties_float, ties_new, ties_old = _ties(lf), _ties(lq), _ties(lr)
    assert ties_new <= ties_float  # no tie the float model does not have
    assert ties_old >= 30  # the check can fail: with the uint8 logit grid, about one tie per crossing
    grid = lr / requantized.fc.layer.scale  # the old classifier's outputs really lie on its grid
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    # on the real test images accuracy stays that of the float model
    with torch.no_grad():
        assert abs((q(x).argmax(1) == y).float().mean() - (model(x).argmax(1) == y).float().mean()) <= 0.02


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
    if level == "int8_static":  # the float-output classifier: plain tensors too
        assert {k: dtypes[k] for k in dtypes if k.startswith("fc.")} == {
            "fc.weight_int8": "I8", "fc.weight_scale": "F32", "fc.weight_zero_point": "I32", "fc.bias": "F32",
            "fc.input_scale": "F64", "fc.input_zero_point": "I64"}
    loaded = load_model(tmp_path / "m")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    if level == "int8_static":
        assert all(torch.equal(a, b) for a, b in zip(loaded.fc.state_dict().values(), q.fc.state_dict().values()))
        assert loaded.fc.kernel == q.fc.kernel
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


def test_torch_ao_models_saved_before_the_float_output_classifier_still_load(baseline, digits, calibration, static, tmp_path):
    """A torch.ao int8_static save without 'output_layer' (every layer requantized) loads with its requantized fc."""
    q, info = static
    old = _requantizing_classifier(q, baseline, calibration)
    record = {k: v for k, v in info["quantization"].items() if k not in ("output_layer", "format_version")}  # as saved then
    record["accumulation"] = f"int32 in torch.ao.nn.quantized kernels ({q.compbias_engine}); each layer's output requantized to uint8"
    old.compbias_quantization = record
    save_model(old, None, tmp_path / "old")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old" / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"fc.quant.scale", "fc.layer.scale", "fc.layer.weight_int8"} <= keys and "fc.input_scale" not in keys
    loaded = load_model(tmp_path / "old")
    assert isinstance(loaded.fc, Int8StaticLayer) and not any(isinstance(m, Int8LinearFloatOut) for m in loaded.modules())
    x, _ = _test_inputs(digits)
    with torch.no_grad():
        out = loaded(x)
        assert torch.equal(out, old(x))  # its saved behaviour, bit for bit
        assert not torch.equal(out, q(x))  # which is not the float-output classifier's
    grid = out / loaded.fc.layer.scale
    assert torch.allclose(grid, grid.round(), atol=1e-3)  # requantized logits, as saved
    # a record naming an output layer the architecture does not have is refused
    bad = dict(info["quantization"], output_layer={"name": "block3.conv", "output": "float32"})
    q.compbias_quantization = bad
    save_model(q, None, tmp_path / "bad")
    with pytest.raises(ValueError, match="not an unfused linear layer"):
        load_model(tmp_path / "bad")


def test_the_record_format_version_picks_the_modules_and_an_unknown_one_is_refused(baseline, static, tmp_path):
    """int8 records carry format_version 3; records saved without one get theirs from backend / output_layer."""
    q, info = static
    assert info["quantization"]["format_version"] == QUANT_FORMAT_VERSION == 3
    assert quantize_model(baseline, "int8_weight")[1]["quantization"]["format_version"] == 3
    assert "format_version" not in quantize_model(baseline, "fp16")[1]["quantization"]  # a cast: nothing to version
    record = {k: v for k, v in info["quantization"].items() if k != "format_version"}
    assert quantization_format_version(record) == 3
    assert quantization_format_version({k: v for k, v in record.items() if k != "output_layer"}) == 2
    assert quantization_format_version({"mode": "int8_static"}) == 1  # the first version: no backend
    assert quantization_format_version({"mode": "int8_weight", "backend": "compbias.simulation"}) == 1
    with pytest.raises(ValueError, match="unknown quantization backend 'tensorrt'"):
        quantization_format_version({"mode": "int8_static", "backend": "tensorrt"})
    future = copy.deepcopy(q)
    future.compbias_quantization = dict(info["quantization"], format_version=4)
    save_model(future, None, tmp_path / "future")
    with pytest.raises(ValueError, match="unknown quantization format_version 4; this compbias reads versions 1, 2, 3"):
        load_model(tmp_path / "future")
    broken = copy.deepcopy(q)
    broken.compbias_quantization = {k: v for k, v in info["quantization"].items() if k != "output_layer"}
    save_model(broken, None, tmp_path / "broken")
    with pytest.raises(ValueError, match="format 3 names its output layer"):
        load_model(tmp_path / "broken")


def test_output_linear_finds_the_classifier_of_every_architecture():
    for arch, shape in [("smallcnn", (1, 8, 8)), ("resnet20", (3, 16, 16)), ("resnet32", (3, 16, 16)), ("resnet18", (3, 16, 16))]:
        assert output_linear(build_model(arch, 2, shape)) == "fc", arch

    class Softmaxed(nn.Module):  # output not produced by a Linear: the classifier keeps the requantized output
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return torch.softmax(self.fc(self.conv(x).mean((2, 3))), 1)

    assert output_linear(Softmaxed()) is None
    q, info = quantize_model(Softmaxed(), "int8_static", calibration=[torch.rand(8, 1, 6, 6)])
    assert info["quantization"]["output_layer"]["name"] is None and "requantized" in info["quantization"]["output_layer"]["output"]
    assert isinstance(q.fc, Int8StaticLayer)


def test_qnnpack_engine_full_range_and_round_trip(baseline, digits, calibration, tmp_path):
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    before = torch.backends.quantized.engine
    q, info = quantize_model(baseline, "int8_static", calibration=calibration, engine="qnnpack")
    record = info["quantization"]
    assert record["engine"] == "qnnpack" and record["activation"]["range"] == [0, 255]
    assert torch.backends.quantized.engine == before  # the global engine is restored
    # qnnpack has no float-output int8 linear kernel: the classifier computes the same formula in int64
    assert isinstance(q.fc, Int8LinearFloatOut) and record["output_layer"]["kernel"].startswith("int64 matrix product")
    x, y = _test_inputs(digits)
    fc_in = _fc_inputs(q, x)
    expected = int8_reference.float_output_layer(q.fc, fc_in, activation_qmax("qnnpack"))
    with torch.no_grad():
        assert (q.fc(fc_in).double() - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    q.compbias_quantization = record
    save_model(q, None, tmp_path / "m")
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

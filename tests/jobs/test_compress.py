"""Each compression method's effect: sparsity, whole filters, the int8 grid, quantized arithmetic, losses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compbias.jobs import build_model, compress_model, evaluate, measure_sparsity, pw_targets, pw_weights
from compbias.jobs.distill import PerformanceWeighted, kd_loss
from compbias.jobs.models import model_device
from compbias.jobs.prune import Pruner, conv_bn_pairs, cubic_sparsity
from compbias.jobs.quantize import (
    Int8LinearFloatOut,
    Int8StaticLayer,
    Int8WeightOnlyConv2d,
    Int8WeightOnlyLinear,
    QuantizedLinear,
    fold_batchnorm,
)
from tests.jobs.int8_simulation import set_input_range, set_weight, simulate_int8


def _weights(model):
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# -- magnitude pruning -----------------------------------------------------------


def test_cubic_schedule():
    kw = dict(final=0.9, start_step=10, end_step=110)
    assert cubic_sparsity(0, **kw) == 0.0 and cubic_sparsity(10, **kw) == 0.0
    assert cubic_sparsity(60, **kw) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(110, **kw) == 0.9 and cubic_sparsity(500, **kw) == 0.9


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95])
def test_oneshot_magnitude_pruning_is_global_and_exact(baseline, digits, level):
    pruned, info = compress_model(baseline, digits, "magnitude", level, schedule="oneshot", finetune_epochs=0, log=None)
    assert model_device(pruned) == model_device(baseline)  # nothing trains it: pruned where the baseline is
    assert info["sparsity"] == pytest.approx(level, abs=1e-4)
    assert measure_sparsity(pruned)[0] == info["sparsity"]
    # global: the surviving weights are exactly the largest |w| of the baseline
    before = torch.cat([w.abs().flatten() for w in _weights(baseline).values()])
    after = torch.cat([w.flatten() for w in _weights(pruned).values()])
    threshold = before[after != 0].min()
    assert (before[after == 0] <= threshold).all()
    assert torch.equal(after[after != 0], torch.cat([w.flatten() for w in _weights(baseline).values()])[after != 0])
    # layers are pruned unevenly (global ranking), the baseline is untouched
    per_layer = list(info["sparsity_per_layer"].values())
    assert max(per_layer) - min(per_layer) > 0.05
    assert measure_sparsity(baseline)[0] < 0.01
    assert info["size_bytes_sparse"] < info["size_bytes"] == info["baseline_size_bytes"]


def test_gradual_magnitude_pruning_finetunes_from_the_baseline(baseline, small_digits, device):
    pruned, info = compress_model(baseline, small_digits, "magnitude", 0.9, schedule="gradual", finetune_epochs=3,
                                  device=device, log=None)
    assert model_device(pruned).type == device.type
    assert abs(info["sparsity"] - 0.9) < 0.002
    scheduled = [h["sparsity"] for h in info["history"]]
    assert scheduled[0] < scheduled[1] <= scheduled[2] == pytest.approx(0.9)
    assert info["method"] == "magnitude" and info["schedule"] == "gradual" and info["final_loss"] > 0
    assert evaluate(pruned, small_digits).accuracy > 0.8


def test_pruned_weights_stay_zero_during_finetuning(baseline, small_digits, device):
    pruned, _ = compress_model(baseline, small_digits, "magnitude", 0.7, schedule="oneshot", finetune_epochs=0, log=None)
    zero_before = {n: w == 0 for n, w in _weights(pruned).items()}
    tuned, info = compress_model(baseline, small_digits, "magnitude", 0.7, schedule="oneshot", finetune_epochs=2,
                                 device=device, log=None)
    for n, w in _weights(tuned).items():
        assert torch.equal(w == 0, zero_before[n]), n  # same mask after fine-tuning
    assert not torch.equal(_weights(tuned)["fc"], _weights(pruned)["fc"])  # but the survivors moved


def test_scratch_schedule_trains_a_new_pruned_model(baseline, small_digits, device):
    model, info = compress_model(baseline, small_digits, "magnitude", 0.8, schedule="scratch", epochs=3, lr=0.05,
                                 device=device, log=None)
    assert abs(info["sparsity"] - 0.8) < 0.005
    with pytest.raises(ValueError, match="give epochs"):
        compress_model(baseline, small_digits, "magnitude", 0.8, schedule="scratch", log=None)


# -- structured pruning -------------------------------------------------------------


def test_structured_pruning_zeroes_whole_filters_in_every_conv(small_digits, device):
    model = build_model("resnet20", 10, (1, 8, 8), seed=0)
    pruned, info = compress_model(model, small_digits, "structured", 0.5, schedule="gradual", finetune_epochs=1, batch_size=100,
                                  device=device, log=None)
    bns = dict(conv_bn_pairs(pruned))
    modules = dict(pruned.named_modules())
    for name, m in modules.items():
        if not isinstance(m, nn.Conv2d):
            continue
        dead = (m.weight.flatten(1) == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * m.out_channels), name
        # no partially-zero filters: zeros come in whole filters
        alive = m.weight[~dead]
        assert (alive.flatten(1) != 0).any(dim=1).all()
        bn = modules[bns[name]]
        assert (bn.weight[dead] == 0).all() and (bn.bias[dead] == 0).all()
    assert info["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert torch.count_nonzero(pruned.fc.weight) == pruned.fc.weight.numel()  # linear layer untouched


def test_structured_levels_are_monotone_over_the_schedule(device):
    model = build_model("smallcnn", 10, (1, 8, 8), seed=0).to(device)
    pruner = Pruner(model, "structured", 0.75, start_step=0, end_step=10, frequency=2)
    seen = []
    for step in range(12):
        pruner.update(step)
        seen.append(int((model.block2.conv.weight.flatten(1) == 0).all(dim=1).sum()))
    assert seen == sorted(seen) and seen[-1] == 24  # 0.75 * 32 filters


# -- quantization ---------------------------------------------------------------------


def _int8_weights(q):
    """``name -> (int8 weight, per-channel scale)`` of every quantized layer (torch.ao, its float-output classifier, or weight-only)."""
    out = {}
    for name, m in q.named_modules():
        if isinstance(m, (Int8StaticLayer, Int8LinearFloatOut)):
            w = m.layer.weight() if isinstance(m, Int8StaticLayer) else m.weight()
            out[name] = (w.int_repr(), w.q_per_channel_scales().float())
        elif isinstance(m, (Int8WeightOnlyConv2d, Int8WeightOnlyLinear)):
            out[name] = (m.weight_int8, m.weight_scale.float())
    return out


@pytest.mark.parametrize("level", ["int8_weight", "int8_static"])
def test_int8_weights_lie_on_the_int8_grid(baseline, digits, level):
    q, info = compress_model(baseline, digits, "quantize", level, log=None)
    assert model_device(q).type == "cpu"  # int8 is a CPU model, whatever device the baseline is on
    layers = _int8_weights(q)
    assert len(layers) == 4 and not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for m in q.modules())
    folded, _ = fold_batchnorm(copy.deepcopy(baseline).cpu())  # compared with the CPU int8 weights
    for name, (qw, scale) in layers.items():
        assert qw.dtype == torch.int8
        w = folded.get_submodule(name).weight.detach()
        ratio = w / scale.view(-1, *([1] * (w.ndim - 1)))
        # Each weight is the nearest point of the int8 grid. Exact ties (x.5) may round either way: the
        # symmetric per-channel scale max|w| / 127.5 puts every channel's extreme weight on +-127.5, and
        # the quantize kernel multiplies by 1/scale in float32, whose last bit differs between the
        # AVX2, AVX-512 and CUDA kernels. Off ties the grid point is exact on every engine.
        assert (qw.float() - ratio.clamp(-128, 127)).abs().max() <= 0.5 + 1e-4
        tie = (ratio - ratio.floor() - 0.5).abs() <= 1e-4
        off_grid = qw.float() != ratio.round().clamp(-128, 127)
        assert not (off_grid & ~tie).any(), f"{name}: {int((off_grid & ~tie).sum())} weights off the nearest grid point"
        assert set(qw.flatten(1).to(torch.int16).abs().amax(1).tolist()) <= {127, 128}  # symmetric per-channel scale uses the full range
    assert info["size_bytes"] < 0.3 * info["baseline_size_bytes"]
    assert info["quantization"]["mode"] == level
    assert info["quantization"]["backend"].startswith("torch.ao.quantization")
    if level == "int8_static":  # the classifier keeps int8 weights and outputs float32 logits
        assert isinstance(q.fc, Int8LinearFloatOut) and info["quantization"]["output_layer"]["name"] == "fc"
    assert evaluate(q, digits).accuracy > evaluate(baseline, digits).accuracy - 0.03


def _reference_int8_static(q_model, folded, x):
    """Independent int8 pipeline: integer tensors and int64 matmuls via unfold."""
    qmods = dict(q_model.named_modules())

    def pre_hook(module, args, name):
        qm = qmods[name]
        s, z = float(qm.input_scale), int(qm.input_zero_point)
        xi = (torch.clamp(torch.round(args[0] / s) + z, 0, 255).to(torch.int64) - z)
        wi = qm.weight_int8.to(torch.int64)
        if isinstance(module, nn.Conv2d):
            cols = F.unfold(xi.double(), module.kernel_size, padding=module.padding, stride=module.stride).round().to(torch.int64)
            acc = torch.einsum("ok,nkl->nol", wi.flatten(1), cols)
            h = args[0].shape[2]
            out_h = (h + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
            acc = acc.view(acc.shape[0], acc.shape[1], out_h, -1)
            bshape = (1, -1, 1, 1)
        else:
            acc = xi @ wi.T
            bshape = (1, -1)
        acc_scale = torch.tensor(s, dtype=torch.float64) * qm.weight_scale.double()
        acc = acc + torch.round(qm.bias.double() / acc_scale).to(torch.int64).view(bshape)
        module._ref_out = (acc.double() * acc_scale.view(bshape)).float()

    def fwd_hook(module, args, out):
        return module._ref_out

    handles = []
    for name, m in folded.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: pre_hook(mod, a, name)))
            handles.append(m.register_forward_hook(fwd_hook))
    with torch.no_grad():
        out = folded(x)
    for h in handles:
        h.remove()
    return out


def test_simulation_computes_the_int8_pipeline_exactly(baseline, digits):
    """The independent check (simulate_int8, compbias's first int8 modules) against int64 unfold/matmuls."""
    baseline = copy.deepcopy(baseline).cpu()  # int8 arithmetic is checked on the CPU, where simulate_int8 runs
    calibration = [digits.train.batch(slice(i, i + 128))[0] for i in range(0, 512, 128)]
    q, info = simulate_int8(baseline, "int8_static", calibration=calibration)
    assert info["quantization"]["activation"]["dtype"] == "uint8"
    folded, _ = fold_batchnorm(baseline)
    x = digits.test.batch(slice(0, 200))[0]
    with torch.no_grad():
        q_logits, float_logits = q(x), folded(x)
    ref = _reference_int8_static(q, copy.deepcopy(folded), x)
    # the simulation computes exactly the int8 pipeline (up to the final float32 rounding) ...
    assert torch.allclose(q_logits, ref, atol=1e-5, rtol=0)
    # ... which differs from the float model: the quantization error is really there
    assert (q_logits - float_logits).abs().max() > 1e-3
    ev = evaluate(q, digits, keep_logits=True)
    assert np.allclose(ev.logits[:200], ref.numpy(), atol=1e-5)


def test_int8_static_layer_equals_integer_matmul():
    lin = nn.Linear(5, 3)
    q = QuantizedLinear(lin, "int8_static")
    set_weight(q, lin.weight, lin.bias)
    set_input_range(q, -1.0, 2.0)
    x = torch.tensor([[0.3, -0.7, 1.9, 0.0, 1.2]])
    s, z = float(q.input_scale), int(q.input_zero_point)
    assert z == round(1.0 / s)  # zero maps to an integer
    xq = torch.clamp(torch.round(x / s) + z, 0, 255).to(torch.int64) - z
    acc = xq @ q.weight_int8.to(torch.int64).T + torch.round(q.bias.double() / (s * q.weight_scale.double())).to(torch.int64)
    expected = (acc.double() * s * q.weight_scale.double()).float()
    assert torch.allclose(q(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("level, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision(baseline, digits, level, dtype):
    q, info = compress_model(baseline, digits, "quantize", level, log=None)
    assert all(p.dtype == dtype for p in q.parameters())
    floats = sum(t.numel() * t.element_size() for t in baseline.state_dict().values() if t.is_floating_point())
    assert info["size_bytes"] == info["baseline_size_bytes"] - floats // 2  # every float stored in 2 bytes
    assert model_device(q).type == "cpu"  # fp16/bf16: a CPU copy, whatever device the baseline is on
    x = digits.test.batch(slice(0, 50))[0]
    out = q(x)
    assert out.dtype == torch.float32
    agree = (out.argmax(1) == baseline(x.to(model_device(baseline))).argmax(1).cpu()).float().mean()
    assert agree > 0.95


def test_quantize_rejects_bad_levels_and_mitigations(baseline, digits):
    with pytest.raises(ValueError, match="quantize level"):
        compress_model(baseline, digits, "quantize", "int4", log=None)
    with pytest.raises(ValueError, match="pruning only"):
        compress_model(baseline, digits, "quantize", "int8_weight", mitigation="kd", log=None)
    with pytest.raises(ValueError, match="sparsity in"):
        compress_model(baseline, digits, "magnitude", 1.0, log=None)
    with pytest.raises(ValueError, match="unknown compression method"):
        compress_model(baseline, digits, "lowrank", 0.5, log=None)
    with pytest.raises(ValueError, match="finetune_epochs must be at least 1"):
        compress_model(baseline, digits, "magnitude", 0.5, schedule="gradual", finetune_epochs=0, log=None)
    with pytest.raises(ValueError, match="unknown mitigation"):
        compress_model(baseline, digits, "magnitude", 0.5, mitigation="crd", log=None)
    other = build_model("smallcnn", 3, (1, 8, 8))
    with pytest.raises(ValueError, match="built for 3 classes"):
        compress_model(other, digits, "magnitude", 0.5, log=None)


# -- distillation and the performance-weighted loss ----------------------------------------


@pytest.mark.parametrize("mitigation, part", [("kd", "kd"), ("at", "at"), ("pkt", "pkt"), ("at_kd", "at"), ("pkt_kd", "pkt")])
def test_distillation_loss_falls_during_finetuning(baseline, small_digits, mitigation, part, device):
    pruned, info = compress_model(baseline, small_digits, "magnitude", 0.9, schedule="oneshot", finetune_epochs=3,
                                  mitigation=mitigation, device=device, log=None)
    curve = [h[part] for h in info["history"]]
    assert curve[-1] < curve[0], curve
    total = [h["loss"] for h in info["history"]]  # the weighted distillation objective
    assert total[-1] < total[0], total
    assert info["method"] == f"magnitude+{mitigation}"
    assert abs(info["sparsity"] - 0.9) < 1e-3


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 10)
    assert kd_loss(a, a).abs() < 1e-6
    assert kd_loss(a, torch.randn(4, 10)) > 0


def test_pw_weights_and_targets_on_a_hand_made_example():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1])
    w = pw_weights(probs, labels, gamma=5, min_weight=0.75)
    expected = torch.tensor([0.75 + 0.25 * 0.1**5, 0.75 + 0.25 * 0.8**5, 0.75 + 0.25 * 0.6**5])
    assert torch.allclose(w, expected)
    t = pw_targets(probs, labels)
    # right (row 0): the unpruned model's output; wrong (rows 1, 2): the one-hot label
    assert torch.allclose(t, torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]]))


def test_pw_objective_value():
    teacher = nn.Linear(2, 2, bias=False)
    student = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        student.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    loss, logits, parts = PerformanceWeighted(teacher, gamma=2, min_weight=0.5)(student, x, y)
    p = F.softmax(teacher(x), 1)
    w = 0.5 + 0.5 * (1 - p[:, 0]) ** 2
    targets = torch.stack([p[0], torch.tensor([1.0, 0.0])])  # example 2: teacher says 1, label 0
    ce = -(targets * F.log_softmax(student(x), 1)).sum(1)
    assert torch.allclose(loss, (w * ce).mean())


def test_pruning_with_pw_loss(baseline, small_digits, device):
    pruned, info = compress_model(baseline, small_digits, "magnitude", 0.9, schedule="oneshot", finetune_epochs=2,
                                  mitigation="pw", device=device, log=None)
    assert info["method"] == "magnitude+pw" and 0.75 <= info["history"][0]["mean_weight"] <= 1.0
    assert info["history"][-1]["pw"] < info["history"][0]["pw"]
    assert evaluate(pruned, small_digits).accuracy > 0.8

"""The training loop's input pipeline: vectorised crops and flips, resident and streamed batches, device
accumulation, reproducibility, and the defaults' single owner."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from compbias.jobs import build_model, load_dataset, train_model
from compbias.jobs import pipeline
from compbias.jobs.data import TensorImageDataset
from compbias.jobs.models import model_device
from compbias.jobs import train as train_mod
from compbias.jobs.train import fit
from compbias.jobs.vocabulary import TRAIN_DEFAULTS
from tests.jobs.devices import selected_device


def _reference_crop_flip(x, flip, oy, ox):
    """One example at a time, as the loop did before: flip, zero-pad H/8, crop at the offsets."""
    n, _, h, w = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(n)])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(7, 3, 12, 10), (5, 1, 8, 8), (4, 2, 17, 17)])
def test_vectorised_crop_flip_equals_the_per_example_loop(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, shape, generator=g).to(dtype)
    plan = pipeline.EpochPlan.draw(shape[0], shape[2], g, augment=True)
    assert 0 <= int(plan.oy.min()) and int(plan.oy.max()) <= 2 * pipeline.crop_padding(shape[2])
    got = pipeline.crop_flip(x, plan.flip, plan.oy, plan.ox)
    assert got.dtype == dtype
    assert torch.equal(got, _reference_crop_flip(x, plan.flip, plan.oy, plan.ox))


def _uint8_bundle(n_train: int = 90):
    """digits as uint8 images (values x 15) with augmentation on: the layout of decoded photos."""
    d = load_dataset("digits", max_train=n_train)
    as_u8 = lambda ds: TensorImageDataset((ds.images * 15).to(torch.uint8), ds.labels, 1 / 240)  # noqa: E731
    return dataclasses.replace(d, train=as_u8(d.train), test=as_u8(d.test), augment=True)


@pytest.mark.parametrize("augment", [True, False])
def test_resident_and_streamed_batches_are_the_same(augment):
    bundle = _uint8_bundle(91)  # 91 = 3 x 30 + 1: the last batch of one example is dropped
    data, device = bundle.train, selected_device()
    steps = pipeline.steps_per_epoch(len(data), 30)
    assert steps == 3
    plan = pipeline.EpochPlan.draw(len(data), 8, torch.Generator().manual_seed(0), augment)
    resident = list(pipeline.training_batches(data, device, 30, steps, resident=True).epoch(plan, 30, steps))
    streamed = list(pipeline.training_batches(data, device, 30, steps, resident=False).epoch(plan, 30, steps))
    assert len(resident) == len(streamed) == 3
    for (xr, yr), (xs, ys) in zip(resident, streamed):
        assert xr.dtype == torch.float32 and xr.device.type == device.type
        assert torch.equal(xr, xs) and torch.equal(yr, ys)
    # the batches are the dataset's examples in the plan's order, scaled and augmented as planned
    idx = plan.order[:30]
    x, y = data.batch(idx)
    if augment:
        x = _reference_crop_flip(x, plan.flip[:30], plan.oy[:30], plan.ox[:30])
    assert torch.equal(resident[0][0].cpu(), x) and torch.equal(resident[0][1].cpu(), y)


def test_a_generic_dataset_streams_through_a_dataloader():
    bundle = _uint8_bundle()
    items = torch.utils.data.TensorDataset(bundle.train.images.float() * bundle.train.scale, bundle.train.labels)
    source = pipeline.training_batches(items, torch.device("cpu"), 32, 2)
    assert isinstance(source, pipeline.StreamedBatches)
    plan = pipeline.EpochPlan.draw(len(items), 8, torch.Generator().manual_seed(0), augment=False)
    (x, y), _ = list(source.epoch(plan, 32, 2))
    assert torch.equal(x, bundle.train.batch(plan.order[:32])[0]) and torch.equal(y, bundle.train.labels[plan.order[:32]])


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_training_on_uint8_images_with_augmentation_is_reproducible_and_path_independent(monkeypatch):
    bundle = _uint8_bundle()
    device = selected_device()

    def run():
        model = build_model("smallcnn", bundle.n_classes, bundle.input_shape, seed=0)
        model, history, _ = fit(model, bundle, epochs=2, batch_size=16, seed=3, device=device, log=None)
        return _weights(model), history

    (w1, h1), (w2, h2) = run(), run()
    assert h1[-1]["loss"] == h2[-1]["loss"]
    if device.type == "cpu":  # bit-for-bit on the CPU
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
        monkeypatch.setattr(pipeline, "fits_on_device", lambda *a, **k: False)  # stream the same plan instead
        w3, h3 = run()
        assert all(torch.equal(w1[k], w3[k]) for k in w1) and h3 == [dict(h, seconds=s["seconds"]) for h, s in zip(h1, h3)]
    # another seed trains another model
    model = build_model("smallcnn", bundle.n_classes, bundle.input_shape, seed=0)
    w4 = _weights(fit(model, bundle, epochs=2, batch_size=16, seed=4, device=device, log=None)[0])
    assert not all(torch.equal(w1[k], w4[k]) for k in w1)


def test_history_sums_match_a_recount(small_digits):
    """Loss and accuracy summed on the device over an epoch equal the per-batch values read one by one."""
    device = selected_device()
    seen = []

    def objective(model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        seen.append((float(loss.detach()), int((logits.argmax(1) == y).sum()), len(y)))
        return loss, logits, {"twice": 2 * loss.detach()}

    model = build_model("smallcnn", 10, small_digits.input_shape, seed=0)
    _, history, _ = fit(model, small_digits, epochs=1, batch_size=64, device=device, objective=objective, log=None)
    n = sum(k for *_, k in seen)
    assert history[0]["loss"] == pytest.approx(sum(l * k for l, _, k in seen) / n, rel=1e-5)
    assert history[0]["twice"] == pytest.approx(2 * history[0]["loss"], rel=1e-5)
    assert history[0]["acc"] == sum(c for _, c, _ in seen) / n


def test_a_non_finite_loss_is_reported_with_its_step(small_digits):
    calls = []

    def objective(model, x, y):
        logits = model(x)
        calls.append(1)
        loss = F.cross_entropy(logits, y) * (float("nan") if len(calls) == 3 else 1.0)
        return loss, logits, {}

    model = build_model("smallcnn", 10, small_digits.input_shape, seed=0)
    with pytest.raises(FloatingPointError, match="non-finite at epoch 1, step 2; lower the learning rate"):
        fit(model, small_digits, epochs=2, batch_size=64, device=selected_device(), objective=objective, log=None)


def test_training_defaults_have_one_owner():
    for function in (fit, train_model):
        params = inspect.signature(function).parameters
        for name in ("batch_size", "lr", "momentum", "weight_decay"):
            assert params[name].default == TRAIN_DEFAULTS[name], (function.__name__, name)
    assert inspect.signature(train_model).parameters["epochs"].default == TRAIN_DEFAULTS["epochs"]


def test_a_model_on_the_test_device_trains_there_and_keeps_the_default_layout(small_digits):
    device = selected_device()
    model = build_model("resnet20", 10, small_digits.input_shape, seed=0)
    model, _ = train_model(model, small_digits, epochs=1, device=device, log=None)
    assert model_device(model).type == device.type and not model.training
    assert all(p.is_contiguous() for p in model.parameters())  # channels-last is undone after training


def test_jobs_functions_take_a_model_on_any_device(baseline, digits, small_digits, device):
    """The baseline lives on the test device (CUDA under make test-gpu); inputs may come from anywhere."""
    import copy

    from compbias.jobs import evaluate, layer_activations, predict_logits, quantize_model
    from compbias.jobs.distill import make_objective

    assert model_device(baseline).type == device.type
    x = digits.test.batch(slice(0, 64))[0]
    on_cpu, on_device = predict_logits(baseline, x), predict_logits(baseline, x.to(device))
    assert on_cpu.shape == (64, 10) and (on_cpu == on_device).all()  # the same batches reach the model
    assert (evaluate(baseline, digits, keep_logits=True).logits[:64] == on_cpu).all()
    assert layer_activations(baseline, x)["logits"].shape == (64, 10)
    q, _ = quantize_model(baseline, "fp16")
    assert model_device(q).type == "cpu" and model_device(baseline).type == device.type  # copied to the CPU, original left
    teacher = copy.deepcopy(baseline).cpu()  # a teacher somewhere else follows the student's batches
    student = copy.deepcopy(baseline)
    fit(student, small_digits, epochs=1, device=device, objective=make_objective("kd", teacher), log=None)
    assert model_device(teacher).type == device.type


# The CUDA recipes (autocast, the gradient scaler, channels-last) forced on the CPU, where all
# three also run: the code paths a GPU takes, checked without one. Expectations are about
# dtypes, layouts and learning, never about exact values (bf16 kernels differ between CPUs).
CUDA_RECIPES = {
    "bf16+channels_last": train_mod.TrainingRecipe(torch.bfloat16, False, True),
    "fp16+scaler+channels_last": train_mod.TrainingRecipe(torch.float16, True, True),
}


def test_the_cpu_recipe_is_float32_in_the_default_layout():
    assert train_mod.training_recipe(torch.device("cpu")) == train_mod.TrainingRecipe(None, False, False)


@pytest.mark.parametrize("recipe", list(CUDA_RECIPES), ids=list(CUDA_RECIPES))
@pytest.mark.parametrize("arch", ["smallcnn", "resnet20"])
def test_the_cuda_recipes_train_on_the_cpu(recipe, arch, small_digits, monkeypatch):
    seen = {}
    real = train_mod.training_batches

    def spy(*args, **kwargs):
        seen["channels_last"] = kwargs.get("channels_last")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_recipe", lambda device: CUDA_RECIPES[recipe])
    monkeypatch.setattr(train_mod, "training_batches", spy)
    model = build_model(arch, 10, small_digits.input_shape, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, history, _ = fit(model, small_digits, epochs=3, batch_size=32, device="cpu", log=None)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # a step the scaler skips is expected
    assert seen["channels_last"] is True
    losses = [h["loss"] for h in history]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert history[-1]["acc"] > 0.5, history  # 10 classes: chance is 0.1
    # the model comes back as float32 in the default layout, and evaluates in float32
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    x, _ = small_digits.test.batch(slice(0, 8))
    with torch.no_grad():
        assert model(x).dtype == torch.float32


@pytest.mark.parametrize("recipe", list(CUDA_RECIPES), ids=list(CUDA_RECIPES))
def test_pruning_and_distillation_under_the_cuda_recipes(recipe, small_digits, monkeypatch):
    from compbias.jobs.distill import make_objective
    from compbias.jobs.prune import measure_sparsity

    monkeypatch.setattr(train_mod, "training_recipe", lambda device: CUDA_RECIPES[recipe])
    teacher = build_model("smallcnn", 10, small_digits.input_shape, seed=1)
    teacher, _ = train_model(teacher, small_digits, epochs=2, device="cpu", log=None)
    student = build_model("smallcnn", 10, small_digits.input_shape, seed=0)
    student, history = train_model(student, small_digits, epochs=2, batch_size=32, device="cpu", log=None,
                                   objective=make_objective("kd", teacher), prune={"kind": "magnitude", "sparsity": 0.5})
    assert abs(measure_sparsity(student)[0] - 0.5) < 0.005 and history[-1]["sparsity"] == pytest.approx(0.5)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history) and "kd" in history[-1], history[-1]
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in student.parameters())


def test_the_residency_rule_on_cuda_uses_the_free_memory(monkeypatch):
    """A split stays on a CUDA card when it takes at most 40% of the free memory (torch.cuda.mem_get_info, faked)."""
    gib = 2**30
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 10 * gib, 80 * gib  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 1)
    assert pipeline.RESIDENT_FRACTION == 0.4
    assert pipeline.fits_on_device(4 * gib, cuda) and not pipeline.fits_on_device(4 * gib + 1, cuda)
    assert pipeline.fits_on_device(5 * gib, cuda, fraction=0.5)
    assert asked and all(d == cuda for d in asked)  # the card the task trains on, not device 0
    assert pipeline.fits_on_device(10**15, torch.device("cpu"))  # the split is in host memory already
    assert not pipeline.fits_on_device(1, torch.device("meta"))  # other devices stream

"""Model shapes, block activations, deterministic training, pruning from scratch."""

from __future__ import annotations

import pytest
import torch

from compbias.jobs import build_model, evaluate, layer_activations, measure_sparsity, train_model
from compbias.jobs.models import model_device


@pytest.mark.parametrize(
    "arch, width, shape, blocks",
    [
        ("smallcnn", 1, (1, 8, 8), {"block1": (16, 8, 8), "block2": (32, 4, 4), "block3": (64, 2, 2)}),
        ("resnet20", 1, (3, 16, 16), {"layer1": (16, 16, 16), "layer2": (32, 8, 8), "layer3": (64, 4, 4)}),
        ("resnet32", 2, (3, 16, 16), {"layer1": (32, 16, 16), "layer2": (64, 8, 8), "layer3": (128, 4, 4)}),
        ("resnet18", 1, (3, 16, 16), {"layer1": (64, 16, 16), "layer2": (128, 8, 8), "layer3": (256, 4, 4), "layer4": (512, 2, 2)}),
    ],
)
def test_forward_shapes_and_block_activations(arch, width, shape, blocks, device):
    model = build_model(arch, 7, shape, width=width, seed=0).to(device)
    x = torch.rand(3, *shape)  # on the CPU: layer_activations sends it to the model's device
    assert model(x.to(device)).shape == (3, 7)
    acts = layer_activations(model, x)
    assert list(acts) == [*blocks, "logits"]
    for name, chw in blocks.items():
        assert acts[name].shape == (3, *chw)
    assert acts["logits"].shape == (3, 7)
    assert torch.allclose(torch.from_numpy(acts["logits"]), model.eval()(x.to(device)).cpu(), atol=1e-5)


def test_resnet_depths_and_resnet32x4_channels():
    def n_blocks(m):
        return sum(len(getattr(m, f"layer{i}")) for i in (1, 2, 3))

    assert n_blocks(build_model("resnet20", 10, (3, 32, 32))) == 9
    r = build_model("resnet32", 100, (3, 32, 32), width=4)
    assert n_blocks(r) == 15
    # resnet32x4 of CRD / "Simon Says": stem 32, stages 64, 128, 256 channels
    assert r.conv1.out_channels == 32 and r.layer1[0].conv1.out_channels == 64 and r.fc.in_features == 256
    assert 7.3e6 < sum(p.numel() for p in r.parameters()) < 7.5e6
    r18 = build_model("resnet18", 2, (3, 64, 64))
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert isinstance(r18.maxpool, torch.nn.Identity)


def test_build_model_errors_and_seeded_init():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", 10, (3, 32, 32), width=2)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("smallcnn", 10, (8, 8))
    a = build_model("resnet20", 10, (3, 8, 8), seed=1)
    b = build_model("resnet20", 10, (3, 8, 8), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_seeded_init_leaves_the_global_random_state_alone(monkeypatch):
    # the CPU generator is restored; a CUDA generator this process has not started is not seeded
    # (torch.manual_seed would queue a seed that CUDA applies whenever it starts, after the build)
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is running in this process: its generators are seeded and restored instead")
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seeds.append(seed))
    torch.random.default_generator.manual_seed(123)
    expected = torch.rand(3)
    torch.random.default_generator.manual_seed(123)
    build_model("smallcnn", 10, (1, 8, 8), seed=7)
    assert torch.equal(torch.rand(3), expected)  # as if no model had been built
    assert cuda_seeds == []
    # the weights are those of the seed, as torch.manual_seed(7) would give on the CPU
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(7)
        ref = build_model("smallcnn", 10, (1, 8, 8), seed=None)
    assert all(torch.equal(p, q) for p, q in zip(build_model("smallcnn", 10, (1, 8, 8), seed=7).state_dict().values(),
                                                  ref.state_dict().values()))


def _train(bundle, seed):
    # On the CPU whatever the test device: bit-for-bit reproducible training is a CPU promise
    # (docs/performance.md; CUDA kernels may sum in another order from run to run).
    model = build_model("smallcnn", bundle.n_classes, bundle.input_shape, seed=seed)
    return train_model(model, bundle, epochs=2, seed=seed, device="cpu", log=None)


def test_training_is_deterministic_on_cpu(small_digits):
    (a, ha), (b, hb) = _train(small_digits, 0), _train(small_digits, 0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    c, _ = _train(small_digits, 1)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_training_learns_and_reports_progress(digits, capsys, device):
    model = build_model("smallcnn", digits.n_classes, digits.input_shape, seed=0)
    model, history = train_model(model, digits, epochs=3, seed=0, device=device)
    assert model_device(model).type == device.type
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] epoch")]
    assert len(lines) == 3 and "loss" in lines[0] and "acc" in lines[0]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, digits).accuracy > 0.85


def test_training_with_augmentation_is_deterministic(imagefolder_split_root):
    from compbias.jobs import load_dataset

    b = load_dataset("imagefolder", root=imagefolder_split_root)
    assert b.augment
    # bit-for-bit: a CPU promise (see _train), so on the CPU whatever the test device
    runs = [train_model(build_model("smallcnn", 3, b.input_shape, seed=0), b, epochs=2, batch_size=8, seed=0, device="cpu",
                        log=None)[0] for _ in range(2)]
    assert torch.equal(runs[0].fc.weight, runs[1].fc.weight)


def test_gradual_pruning_from_scratch_during_training(small_digits, device):
    model = build_model("smallcnn", 10, small_digits.input_shape, seed=0)
    model, history = train_model(model, small_digits, epochs=4, seed=0, device=device, log=None,
                                 prune={"kind": "magnitude", "sparsity": 0.8})
    sparsity, _ = measure_sparsity(model)
    assert abs(sparsity - 0.8) < 0.005
    scheduled = [h["sparsity"] for h in history]
    assert scheduled == sorted(scheduled) and scheduled[0] < 0.8 and scheduled[-1] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown prune option"):
        train_model(model, small_digits, epochs=1, device=device, log=None, prune={"sparsity": 0.5, "when": 3})

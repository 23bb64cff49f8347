"""Model zoo: a small CNN for digits, CIFAR-style ResNets, ResNet-18 with a small-image stem.

Every model built by :func:`build_model` carries

* ``model.compbias_spec`` -- the arguments that rebuild it (``arch``,
  ``n_classes``, ``input_shape``, ``width``), stored with its weights;
* ``model.block_names`` -- the names of its blocks (stages), whose outputs
  :func:`layer_activations` returns and the distillation losses compare.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ARCHS", "build_model", "layer_activations", "capture_blocks", "model_input_dtype", "model_device"]

ARCHS = ("smallcnn", "resnet20", "resnet32", "resnet18")


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)


class SmallCNN(nn.Module):
    """Three conv blocks (16w, 32w, 64w channels; the last two with stride 2), global pool, linear.

    About 23k parameters at width 1: trains on digits in seconds on one CPU core.
    """

    block_names = ("block1", "block2", "block3")

    def __init__(self, n_classes: int, in_channels: int, width: float = 1):
        super().__init__()
        c = [max(1, int(round(16 * width))), max(1, int(round(32 * width))), max(1, int(round(64 * width)))]
        self.block1 = ConvBNReLU(in_channels, c[0])
        self.block2 = ConvBNReLU(c[0], c[1], stride=2)
        self.block3 = ConvBNReLU(c[1], c[2], stride=2)
        self.fc = nn.Linear(c[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; a 1x1 convolution + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2).

    Stages of ``n`` basic blocks with 16w, 32w, 64w channels. The stem has
    16 channels at width 1 and 8w channels above (so ``resnet32`` with
    ``width=4`` is the resnet32x4 of CRD / "Simon Says": 32, 64, 128, 256).
    """

    block_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, n_classes: int, in_channels: int, width: float = 1):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stem = 16 if width <= 1 else int(round(8 * width))
        stages = [max(1, int(round(16 * width))), max(1, int(round(32 * width))), max(1, int(round(64 * width)))]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        layers, c_in = [], stem
        for i, c in enumerate(stages):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet18(n_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    # Small-image stem: 3x3 stride-1 convolution, no max pooling.
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model.block_names = ("layer1", "layer2", "layer3", "layer4")
    return model


def build_model(
    arch: str,
    n_classes: int,
    input_shape: Sequence[int],
    width: float = 1,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build an untrained classifier.

    Parameters
    ----------
    arch : {'smallcnn', 'resnet20', 'resnet32', 'resnet18'}
    n_classes : int
        Number of outputs (logits).
    input_shape : sequence of int
        ``(C, H, W)`` of one input.
    width : float
        Channel multiplier (``smallcnn`` and the CIFAR ResNets; ``resnet18``
        only accepts 1).
    seed : int, optional
        Seed of the weight initialisation (the global RNG is left untouched).

    Returns
    -------
    torch.nn.Module
        In training mode, with ``compbias_spec`` and ``block_names`` attributes.

    Examples
    --------
    >>> m = build_model("resnet32", 100, (3, 32, 32), width=4)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    width = int(width) if float(width).is_integer() else float(width)
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(int(seed))
        c = input_shape[0]
        if arch == "smallcnn":
            model = SmallCNN(n_classes, c, width)
        elif arch == "resnet20":
            model = CifarResNet(20, n_classes, c, width)
        elif arch == "resnet32":
            model = CifarResNet(32, n_classes, c, width)
        else:
            if width != 1:
                raise ValueError("resnet18 has no width multiplier; use width 1 (or a CIFAR ResNet)")
            model = _resnet18(n_classes, c)
    model.compbias_spec = {"arch": arch, "n_classes": int(n_classes), "input_shape": list(input_shape), "width": width}
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model expects as input (float16/bfloat16 after half-precision PTQ)."""
    return getattr(model, "compbias_input_dtype", torch.float32)


@contextlib.contextmanager
def capture_blocks(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of a model's blocks during forward passes (gradients kept).

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`build_model` (or any module with ``block_names``).
    names : sequence of str, optional
        Submodule names to record; default ``model.block_names``.

    Yields
    ------
    dict
        Filled with ``name -> output tensor`` by each forward pass.
    """
    names = list(names if names is not None else getattr(model, "block_names", ()))
    if not names:
        raise ValueError("model has no block_names; build it with compbias.jobs.build_model")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"model has no submodule(s) {missing}")
    store: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        handles.append(modules[n].register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_activations(model: nn.Module, x: torch.Tensor | np.ndarray, *, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Outputs of every block and the logits, for SVCCA / CKA.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`build_model` (float, pruned or quantized).
    x : torch.Tensor or numpy.ndarray
        Inputs ``(N, C, H, W)`` scaled as the dataset yields them.
    batch_size : int

    Returns
    -------
    dict of str to numpy.ndarray
        ``block name -> (N, C, H, W)`` float32 and ``'logits' -> (N, K)``, in
        block order.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    dtype = model_input_dtype(model)
    outputs: dict[str, list[np.ndarray]] = {}
    try:
        with capture_blocks(model) as store:
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device=device, dtype=dtype)
                logits = model(xb)
                for name in model.block_names:
                    outputs.setdefault(name, []).append(store[name].float().cpu().numpy())
                outputs.setdefault("logits", []).append(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in outputs.items()}

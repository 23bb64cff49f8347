"""The built-in architectures: a small CNN for digits, CIFAR-style ResNets, ResNet-18 with a small-image stem.

:func:`compbias.jobs.models.build_model` builds them by name
(:data:`compbias.jobs.vocabulary.ARCHS`); each class names its blocks
(``block_names``), whose outputs the distillation losses and the SVCCA audit
compare.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvBNReLU", "SmallCNN", "BasicBlock", "CifarResNet", "resnet18_small_images", "seeded"]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Initialise weights under ``seed`` without touching the global RNG (no-op for None).

    The CPU generator is seeded and restored. CUDA generators are seeded (and
    restored) only when CUDA is already initialised in this process: seeding
    them otherwise (``torch.manual_seed``) would queue a seed that CUDA applies
    whenever it starts, after this block, changing the process's CUDA random
    state for good. A factory that builds its model directly on a GPU that
    this process has not used yet is therefore not seeded on the GPU side;
    build on the CPU and move it (as compbias does) to get seeded weights.
    """
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if devices:
            torch.manual_seed(int(seed))  # CPU and every initialised GPU, all restored on exit
        else:
            torch.random.default_generator.manual_seed(int(seed))  # the CPU only
        yield


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


def resnet18_small_images(n_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max pooling, for small images."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    # Small-image stem: 3x3 stride-1 convolution, no max pooling.
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model.block_names = ("layer1", "layer2", "layer3", "layer4")
    return model

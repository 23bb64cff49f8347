"""Shared helpers of the bring-your-own tests: the user's own module, a tiny RGB dataset."""

from __future__ import annotations

import textwrap
import uuid

import numpy as np
import pandas as pd
import torch

from compbias.jobs.data import DatasetBundle, TensorImageDataset

USER_MODULE = '''
import torch
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, hidden=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                      nn.Conv2d(hidden, 2 * hidden, 3, padding=1, stride=2), nn.BatchNorm2d(2 * hidden), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def tiny(num_classes=10, hidden=8):
    return Tiny(num_classes=num_classes, hidden=hidden)


def not_a_module(**kwargs):
    return "a string"


CALLS = []


def scale_weights(model, bundle, level, seed):
    """A custom compression: multiply every conv/linear weight by the level; records its arguments and the model's device."""
    CALLS.append((float(level), int(seed), len(bundle.train), next(model.parameters()).device))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(float(level))
    return model


def halve_channels(model, bundle, level, seed):
    """A custom compression that shrinks the first conv (and what it feeds): shapes change, keys do not."""
    import torch_pruning as tp
    ex = torch.zeros(1, *bundle.input_shape, device=next(model.parameters()).device)  # where the model is
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=ex)
    conv = model.features[0]
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels // 2)))
    group.prune()
    return model


def leave_masks(model, bundle, level, seed):
    from torch.nn.utils import prune
    prune.l1_unstructured(model.head, "weight", amount=0.5)
    return model


def returns_none(model, bundle, level, seed):
    return None


def wrong_classes(model, bundle, level, seed):
    model.head = nn.Linear(model.head.in_features, 3)
    return model


def raises(model, bundle, level, seed):
    raise RuntimeError("my compression broke")
'''


def user_module(tmp_path, monkeypatch, *, on_path: bool = True) -> str:
    """Write the user's own module (a unique name) into ``tmp_path``; return its name.

    ``on_path=False`` only makes ``tmp_path`` the working directory (compbias must find it there).
    """
    name = f"usernets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    if on_path:
        monkeypatch.syspath_prepend(str(tmp_path))
    else:
        monkeypatch.chdir(tmp_path)
    return name


def rgb_bundle(n_train: int = 48, n_test: int = 24, size: int = 16) -> DatasetBundle:
    """A tiny 3-class RGB set (3 x size x size) whose label is the dominant colour."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 3
        x = torch.rand(n, 3, size, size, generator=g) * 0.5
        x[torch.arange(n), y] += 0.5
        return TensorImageDataset(x, y, 1.0)

    train, test = split(n_train), split(n_test)

    def frame(d):
        return pd.DataFrame({"example_id": np.arange(len(d.labels)), "label": d.labels.numpy()})

    return DatasetBundle(kind="digits", train=train, test=test, n_classes=3, class_names=["r", "g", "b"],
                         input_shape=(3, size, size), test_frame=frame(test), train_frame=frame(train), group_columns=[])

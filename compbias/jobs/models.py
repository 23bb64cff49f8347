"""Building models: the built-in architectures by name, users' factories by import path, saved models again.

:func:`build_model` builds the architectures of :mod:`.architectures` (a
small CNN for digits, CIFAR-style ResNets, ResNet-18 with a small-image stem)
and the factories of :mod:`.factories`; :func:`reshape_to_state` and
:func:`load_weights` rebuild saved (possibly channel-pruned) models. Running
them (device, input dtype, block outputs) is :mod:`.activations`; every name
of those modules that callers use is importable from here as well.

Every model built by :func:`build_model` carries

* ``model.compbias_spec`` -- the arguments that rebuild it (``arch``,
  ``n_classes``, ``input_shape``, ``width``), stored with its weights;
* ``model.block_names`` -- the names of its blocks (stages), whose outputs
  :func:`layer_activations` returns and the distillation losses compare.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .activations import capture_blocks, layer_activations, model_device, model_input_dtype
from .architectures import CifarResNet, SmallCNN, resnet18_small_images, seeded
from .factories import build_factory, check_model_output, import_object, is_factory
from .vocabulary import ARCHS

__all__ = [
    "ARCHS", "build_model", "layer_activations", "capture_blocks", "model_input_dtype", "model_device",
    "is_factory", "import_object", "check_model_output", "reshape_to_state", "load_weights",
]


def build_model(
    arch: str,
    n_classes: int,
    input_shape: Sequence[int],
    width: float = 1,
    *,
    seed: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    blocks: Sequence[str] | None = None,
) -> nn.Module:
    """Build an untrained classifier.

    Parameters
    ----------
    arch : {'smallcnn', 'resnet20', 'resnet32', 'resnet18'} or str
        A built-in architecture, or the import path of any ``nn.Module``
        factory, ``'package.module:callable'`` (e.g.
        ``'torchvision.models:resnet18'``), called as ``callable(**kwargs)``.
        A factory's model is run once on a batch of zeros of ``input_shape``
        and must return logits ``(N, n_classes)``.
    n_classes : int
        Number of outputs (logits).
    input_shape : sequence of int
        ``(C, H, W)`` of one input.
    width : float
        Channel multiplier (``smallcnn`` and the CIFAR ResNets; ``resnet18``
        only accepts 1).
    seed : int, optional
        Seed of the weight initialisation (the global RNG is left untouched).
    kwargs : dict, optional
        Keyword arguments of a factory (factories only).
    blocks : sequence of str, optional
        A factory model's block (submodule) names, used by the ``at``/``pkt``
        mitigations and the SVCCA audit; default: the model's own
        ``block_names`` attribute if it has one.

    Returns
    -------
    torch.nn.Module
        In training mode, with ``compbias_spec`` and ``block_names``
        attributes; on the CPU (a factory's model where the factory put it).
        The jobs functions take it on any device (``model.to(device)``).

    Examples
    --------
    >>> m = build_model("resnet32", 100, (3, 32, 32), width=4)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    factory = is_factory(arch)
    if not factory:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}, or give an import path 'package.module:callable'")
        if kwargs or blocks:
            raise ValueError(f"kwargs and blocks apply to a factory import path, not to the built-in {arch!r}")
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if factory:
        return build_factory(arch, n_classes, input_shape, width, seed=seed, kwargs=kwargs, blocks=blocks)
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    width = int(width) if float(width).is_integer() else float(width)
    with seeded(seed):
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
            model = resnet18_small_images(n_classes, c)
    model.compbias_spec = {"arch": arch, "n_classes": int(n_classes), "input_shape": list(input_shape), "width": width}
    return model


def reshape_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Give a model's layers the shapes of a state dict (a channel-pruned model's), in place.

    For each parameter or buffer whose saved shape differs (Torch-Pruning's
    physical channel removal), the tensor is replaced by an empty one of the
    saved shape and the module's shape attributes (``in_channels``,
    ``out_channels``, ``in_features``, ``out_features``, ``num_features``)
    follow, so that ``load_state_dict`` fills it. Grouped convolutions keep
    their ``groups`` when the channels stay divisible.

    Returns
    -------
    list of str
        The names of the reshaped tensors.
    """
    changed = []
    modules = dict(model.named_modules())
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, saved in state.items():
        current = own.get(name)
        if current is None or tuple(current.shape) == tuple(saved.shape):
            continue
        mod_name, _, attr = name.rpartition(".")
        module = modules[mod_name]
        fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            module._buffers[attr] = fresh
        changed.append(name)
        if attr == "weight":
            if isinstance(module, nn.modules.conv._ConvNd):
                groups = module.groups
                if groups > 1 and groups == module.in_channels == module.out_channels:  # depthwise: stays depthwise
                    groups = module.groups = int(saved.shape[0])
                module.out_channels = int(saved.shape[0])
                module.in_channels = int(saved.shape[1]) * groups
                if groups > 1 and module.out_channels % groups:
                    raise ValueError(f"{mod_name}: {module.out_channels} output channels do not divide into {groups} groups")
            elif isinstance(module, nn.Linear):
                module.out_features, module.in_features = int(saved.shape[0]), int(saved.shape[1])
        if isinstance(module, nn.modules.batchnorm._NormBase) and saved.ndim == 1:
            module.num_features = int(saved.shape[0])
    return changed


def load_weights(path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from its factory reference and safetensors weights (see :func:`compbias.jobs.io.load_weights`)."""
    from .io import load_weights as _load_weights

    return _load_weights(path, device=device)

"""Model zoo: a small CNN for digits, CIFAR-style ResNets, ResNet-18 with a small-image stem.

Every model built by :func:`build_model` carries

* ``model.compbias_spec`` -- the arguments that rebuild it (``arch``,
  ``n_classes``, ``input_shape``, ``width``), stored with its weights;
* ``model.block_names`` -- the names of its blocks (stages), whose outputs
  :func:`layer_activations` returns and the distillation losses compare.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ARCHS", "build_model", "layer_activations", "capture_blocks", "model_input_dtype", "model_device",
    "is_factory", "import_object", "check_model_output", "reshape_to_state", "load_weights",
]

from .vocabulary import ARCHS
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_factory(arch: str) -> bool:
    """Whether ``arch`` is an import path ``package.module:callable`` (rather than a built-in name)."""
    return isinstance(arch, str) and ":" in arch


def import_object(path: str, *, what: str = "model factory") -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted).

    The module is looked up on ``sys.path``; when it is not found there, the
    working directory (and ``$PWD``, the directory the user's shell launched
    compbias from, which Ray workers inherit) are tried as well.

    Raises
    ------
    ValueError
        Naming the path, what failed and what to do.
    """
    if not isinstance(path, str) or not _FACTORY_PATTERN.match(path):
        raise ValueError(f"{what} {path!r} is not an import path; write 'package.module:callable', e.g. 'torchvision.models:resnet18'")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        module = None
        for extra in dict.fromkeys([os.getcwd(), os.environ.get("PWD") or ""]):
            if extra and extra not in sys.path and os.path.isdir(extra):
                sys.path.append(extra)
                try:
                    module = importlib.import_module(module_name)
                    break
                except ModuleNotFoundError:
                    continue
        if module is None:
            raise ValueError(
                f"cannot import module {module_name!r} of {what} {path!r} ({type(exc).__name__}: {exc}); "
                "the module must be importable from the working directory or PYTHONPATH"
            ) from None
    except Exception as exc:
        raise ValueError(f"importing module {module_name!r} of {what} {path!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {path!r}); check the name after the ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r} is a {type(obj).__name__}, not a callable")
    return obj


@torch.no_grad()
def check_model_output(model: nn.Module, input_shape: Sequence[int], n_classes: int, *, source: str = "the model",
                       x: torch.Tensor | None = None) -> None:
    """Run ``model`` on one batch of two inputs and check it returns logits ``(2, n_classes)``.

    The model is put in eval mode for the check (batch-norm statistics are
    not touched) and its mode restored.

    Parameters
    ----------
    x : torch.Tensor, optional
        The batch to use; default zeros of ``(2, *input_shape)``.

    Raises
    ------
    ValueError
        When the forward pass fails or the output is not ``(2, n_classes)``.
    """
    shape = (2, *[int(s) for s in input_shape])
    if x is None:
        x = torch.zeros(shape, device=model_device(model), dtype=model_input_dtype(model))
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise ValueError(
            f"{source} fails on a batch of the dataset's inputs, shape {tuple(x.shape)} (N, C, H, W): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; make it accept {shape[1]}-channel "
            f"{shape[2]}x{shape[3]} images (e.g. replace its first layer in your own factory)"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{source} returns a {type(out).__name__} on a batch, not a tensor of logits (N, {n_classes})")
    if tuple(out.shape) != (shape[0], int(n_classes)):
        raise ValueError(
            f"{source} outputs shape {tuple(out.shape)} on a batch of {shape[0]}; the dataset has {n_classes} classes, "
            f"so it must output ({shape[0]}, {n_classes}): give the factory the number of classes in model.kwargs "
            f"(e.g. num_classes: {n_classes})"
        )


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
        In training mode, with ``compbias_spec`` and ``block_names`` attributes.

    Examples
    --------
    >>> m = build_model("resnet32", 100, (3, 32, 32), width=4)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    if is_factory(arch):
        return _build_factory(arch, n_classes, input_shape, width, seed=seed, kwargs=kwargs, blocks=blocks)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}, or give an import path 'package.module:callable'")
    if kwargs or blocks:
        raise ValueError(f"kwargs and blocks apply to a factory import path, not to the built-in {arch!r}")
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


def _build_factory(arch: str, n_classes: int, input_shape: Sequence[int], width: float, *, seed: int | None,
                   kwargs: Mapping[str, Any] | None, blocks: Sequence[str] | None) -> nn.Module:
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if width != 1:
        raise ValueError(f"width applies to the built-in architectures; the factory {arch!r} takes its own kwargs")
    kwargs = dict(kwargs or {})
    factory = import_object(arch)
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise ValueError(f"model factory {arch!r} failed when called with kwargs {kwargs}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    source = f"the model of factory {arch!r} (kwargs {kwargs})"
    check_model_output(model, input_shape, int(n_classes), source=source)
    names = list(blocks) if blocks else list(getattr(model, "block_names", ()) or ())
    if names:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"model.blocks names {missing}, which {source} does not have; its top-level children are "
                             f"{[n for n, _ in model.named_children()]}")
        model.block_names = tuple(names)
    spec: dict[str, Any] = {"arch": arch, "n_classes": int(n_classes), "input_shape": list(input_shape), "width": 1,
                            "kwargs": kwargs}
    if blocks:
        spec["blocks"] = list(blocks)
    model.compbias_spec = spec
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
        raise ValueError("model has no block_names; build it with compbias.jobs.build_model (a factory model: give model.blocks)")
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
        block order; only ``'logits'`` for a factory model without blocks.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    dtype = model_input_dtype(model)
    outputs: dict[str, list[np.ndarray]] = {}
    if not getattr(model, "block_names", ()):
        model.block_names = ()
    try:
        with (capture_blocks(model) if model.block_names else contextlib.nullcontext({})) as store:
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device=device, dtype=dtype)
                logits = model(xb)
                for name in model.block_names:
                    outputs.setdefault(name, []).append(store[name].float().cpu().numpy())
                outputs.setdefault("logits", []).append(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in outputs.items()}

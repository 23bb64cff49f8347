"""Models the user brings: any ``nn.Module`` factory given by import path (``'package.module:callable'``).

:func:`import_object` imports it (from ``sys.path``, else the working
directory), :func:`build_factory` calls it with the study's ``kwargs`` and
:func:`check_model_output` checks on one batch that it returns logits
``(N, n_classes)``; the custom compression method imports its function the
same way.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .activations import model_device, model_input_dtype
from .architectures import seeded

__all__ = ["is_factory", "import_object", "check_model_output", "build_factory"]

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
    not touched) and its mode restored. It runs where the model is: the
    batch is moved to the model's device and cast to its input dtype
    (:func:`~compbias.jobs.activations.model_device`,
    :func:`~compbias.jobs.activations.model_input_dtype`).

    Parameters
    ----------
    x : torch.Tensor, optional
        The batch to use, on any device; default zeros of ``(2, *input_shape)``.

    Raises
    ------
    ValueError
        When the forward pass fails or the output is not ``(2, n_classes)``.
    """
    shape = (2, *[int(s) for s in input_shape])
    x = torch.zeros(shape) if x is None else x
    x = x.to(device=model_device(model), dtype=model_input_dtype(model))
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



def build_factory(arch: str, n_classes: int, input_shape: tuple[int, int, int], width: float, *, seed: int | None,
                  kwargs: Mapping[str, Any] | None, blocks: Sequence[str] | None) -> nn.Module:
    """Build a factory's model for :func:`compbias.jobs.models.build_model`, which has checked ``n_classes`` and ``input_shape``.

    Parameters
    ----------
    arch : str
        The factory's import path.
    n_classes : int
    input_shape : tuple of int
        ``(C, H, W)``.
    width : float
        Must be 1 (a factory takes its own ``kwargs``).
    seed : int, optional
    kwargs : mapping, optional
        The factory's keyword arguments.
    blocks : sequence of str, optional
        Block names (default: the model's own ``block_names``).

    Returns
    -------
    torch.nn.Module
        With ``compbias_spec`` (and ``block_names`` when known).

    Raises
    ------
    ValueError
        The factory cannot be imported, fails, returns no module, a module of
        the wrong output shape, or ``blocks`` it does not have.
    """
    if width != 1:
        raise ValueError(f"width applies to the built-in architectures; the factory {arch!r} takes its own kwargs")
    kwargs = dict(kwargs or {})
    factory = import_object(arch)
    with seeded(seed):
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

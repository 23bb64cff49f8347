"""Running a model: its device and input dtype, and the outputs of its blocks (for distillation and SVCCA / CKA)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["model_device", "model_input_dtype", "capture_blocks", "layer_activations"]


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
        A model from :func:`build_model` (float, pruned or quantized), on any
        device: it runs there.
    x : torch.Tensor or numpy.ndarray
        Inputs ``(N, C, H, W)`` scaled as the dataset yields them, on any
        device (each batch is moved to the model's device and cast to its
        input dtype).
    batch_size : int

    Returns
    -------
    dict of str to numpy.ndarray
        ``block name -> (N, C, H, W)`` float32 and ``'logits' -> (N, K)``, in
        block order (copied to the CPU); only ``'logits'`` for a factory model
        without blocks.
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

"""What a compressed model costs: parameters, stored size and CPU latency, before and after.

Every bring-your-own method (:mod:`compbias.jobs.byo`) records these in its
info dict through :func:`measured`: ``params`` / ``baseline_params``,
``size_bytes`` / ``baseline_size_bytes`` and ``latency_ms`` /
``baseline_latency_ms`` (median CPU wall time of one forward pass over the
same batch of test inputs, measured in this process, one after the other).

The latency is a CPU number on purpose, whatever device the model is on:
:func:`measure_latency` times a CPU copy of a model that is elsewhere, so
that ``latency_ms`` means the same in every study (a GPU time would depend
on the card, the batch and the synchronisation).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .data import DatasetBundle
from .models import model_input_dtype
from .prune import model_size_bytes

__all__ = ["count_params", "measure_latency", "latency_batch", "footprint", "stored_size_bytes", "measured"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (torchao/quantized weights count their logical elements)."""
    return int(sum(p.numel() for p in model.parameters()))


def latency_batch(bundle: DatasetBundle, n: int) -> torch.Tensor:
    """The first ``n`` test inputs (at least one, at most the test split), on the CPU: the batch latency is measured on.

    A function that runs a model on it moves it to that model's device
    (:func:`compbias.jobs.models.check_model_output` does).
    """
    n = max(1, min(int(n), len(bundle.test)))
    return bundle.test.batch(torch.arange(n))[0].cpu()


@torch.no_grad()
def measure_latency(model: nn.Module, x: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in milliseconds of ``model(x)`` on the CPU (eval mode, no gradients).

    The model may be on any device: when any of its parameters or buffers is
    elsewhere, a CPU copy is timed (the model is left where it is), and ``x``
    (on any device) is sent to the CPU. The measurement uses torch's current
    intra-op thread count.
    """
    m = model
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        m = copy.deepcopy(model).cpu()
    was_training = m.training
    m.eval()
    x = x.to(device="cpu", dtype=model_input_dtype(m))
    try:
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            m(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        m.train(was_training)
    return float(statistics.median(times))


def footprint(model: nn.Module, x: torch.Tensor, prefix: str = "") -> dict[str, Any]:
    """``{prefix}params``, ``{prefix}latency_ms`` (on ``x``) and ``{prefix}size_bytes`` of a model."""
    return {f"{prefix}params": count_params(model), f"{prefix}latency_ms": measure_latency(model, x),
            f"{prefix}size_bytes": stored_size_bytes(model)}


def stored_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (a torchao model's as saved: its flattened state)."""
    quant = getattr(model, "compbias_quantization", None)
    if isinstance(quant, dict) and quant.get("mode") == "torchao":
        from .torchao_quant import flatten_state

        tensors, _ = flatten_state(model.state_dict())
        return int(sum(t.numel() * t.element_size() for t in tensors.values()))
    return model_size_bytes(model)["size_bytes"]


def measured(baseline: nn.Module, bundle: DatasetBundle, batch: int,
              compress: Callable[[torch.Tensor], tuple[nn.Module, dict[str, Any]]]) -> tuple[nn.Module, dict[str, Any]]:
    """Run ``compress(x)`` between the baseline's and the result's footprint on the same latency batch ``x``.

    ``batch`` is the number of test inputs in ``x`` (:func:`latency_batch`).

    Returns
    -------
    model, info
        ``info``: the baseline's footprint (``baseline_`` keys), the model's,
        then what ``compress`` returned.
    """
    x = latency_batch(bundle, batch)
    before = footprint(baseline, x, "baseline_")
    model, extra = compress(x)
    return model, {**before, **footprint(model, x), **extra}

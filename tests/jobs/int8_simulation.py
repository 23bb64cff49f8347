"""compbias's first int8 implementation, the float64 simulator: the tests' independent reference for the torch.ao models.

It builds a model of format 1 (:mod:`compbias.jobs.quantize.formats`): every
conv/linear of the batch-norm-folded model becomes one of the package's
simulated modules (:class:`~compbias.jobs.quantize.legacy.QuantizedConv2d`,
:class:`~compbias.jobs.quantize.legacy.QuantizedLinear`), which the package
keeps only to load old saves; the steps that *build* them from a float model
(the weight grid, the input calibration) live here. It uses none of
torch.ao, so agreement with :func:`compbias.jobs.quantize.quantize_model`
checks both, and a model it builds, saved, is an old-format save.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from compbias.jobs.quantize.graph import fold_batchnorm, mark_float_input, quantizable_layers, set_submodule
from compbias.jobs.quantize.legacy import SIMULATION_BACKEND, QuantizedConv2d, QuantizedLinear
from compbias.jobs.quantize.static import calibrate

__all__ = ["quantize_weight", "set_input_range", "set_weight", "simulate_int8"]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns ``(q int8, scale float32 per channel)``."""
    w = w.detach().float()
    amax = w.flatten(1).abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -128, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def set_weight(layer: QuantizedConv2d | QuantizedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put a float weight on ``layer``'s int8 grid (:func:`quantize_weight`) and keep the bias in float32."""
    q, s = quantize_weight(weight)
    layer.weight_int8.copy_(q)
    layer.weight_scale.copy_(s)
    layer.bias.copy_(bias.detach().float() if bias is not None else torch.zeros_like(layer.bias))


@torch.no_grad()
def set_input_range(layer: QuantizedConv2d | QuantizedLinear, lo: float, hi: float) -> None:
    """Affine uint8 parameters for inputs in ``[lo, hi]`` (the range always holds 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(min(255, max(0, round(-lo / scale))))
    layer.input_scale.fill_(scale)
    layer.input_zero_point.fill_(zero_point)


@torch.no_grad()
def simulate_int8(model: nn.Module, level: str, *, calibration: Iterable[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """compbias's first int8 implementation: an exact integer simulation, used as an independent check.

    Weights on a symmetric per-channel int8 grid (``s_c = max|w_c| / 127``);
    for ``int8_static`` every conv/linear input quantized to uint8
    (min/max calibration, full 8 bits), the bias rounded onto the int32 grid
    of ``s_x * s_c``, products summed exactly (float64 holds every such
    integer sum) and scaled back to float32 -- outputs are not requantized.
    It uses none of torch.ao, so agreement with
    :func:`compbias.jobs.quantize.quantize_model` checks both.

    Parameters
    ----------
    model : torch.nn.Module
        Trained float model (left unchanged).
    level : {'int8_weight', 'int8_static'}
    calibration : iterable of torch.Tensor, optional
        Required for ``int8_static``.

    Returns
    -------
    model : torch.nn.Module
    info : dict
        ``quantization`` (with ``backend`` = :data:`~compbias.jobs.quantize.legacy.SIMULATION_BACKEND`) and ``n_layers``.
    """
    if level not in ("int8_weight", "int8_static"):
        raise ValueError(f"simulate_int8 covers int8_weight and int8_static, not {level!r}")
    folded, pairs = fold_batchnorm(copy.deepcopy(model).cpu().eval())
    layers = quantizable_layers(folded)
    ranges: dict[str, list[float]] = {}
    if level == "int8_static":
        hooks = []
        for name, m in layers:
            def observe(_m, args, name=name):
                x = args[0].detach()
                lo, hi = float(x.min()), float(x.max())
                r = ranges.setdefault(name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            hooks.append(m.register_forward_pre_hook(observe))
        try:
            calibrate(folded, calibration)
        finally:
            for h in hooks:
                h.remove()
    for name, m in layers:
        q = QuantizedConv2d(m, level) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, level)
        set_weight(q, m.weight, m.bias)
        if level == "int8_static":
            if name not in ranges:
                raise RuntimeError(f"layer {name} saw no calibration input")
            set_input_range(q, *ranges[name])
        set_submodule(folded, name, q)
    info = {
        "quantization": {
            "mode": level,
            "backend": SIMULATION_BACKEND,
            "weight": {"dtype": "int8", "granularity": "per_output_channel", "scheme": "symmetric", "range": [-128, 127]},
            "activation": {"dtype": "uint8", "granularity": "per_tensor", "scheme": "affine", "observer": "minmax"} if level == "int8_static" else None,
            "accumulation": "exact integer (float64)" if level == "int8_static" else "float32 on dequantized int8 weights",
            "batchnorm_folded": len(pairs),
        },
        "n_layers": len(layers),
    }
    return mark_float_input(folded), info

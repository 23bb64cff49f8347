"""``int8_weight``: weight-only int8 (int8 weights per output channel, float32 compute).

The weights are put on the same per-channel symmetric grid as
``int8_static``'s, computed with torch's own observer and
``torch.quantize_per_channel``; each layer computes float32 activations times
the dequantized weights, which is what weight-only int8 kernels compute
(:class:`Int8WeightOnlyConv2d`, :class:`Int8WeightOnlyLinear`). The state
dict holds plain tensors (int8 weights, per-channel scales and zero points,
float biases). See the package docstring of :mod:`compbias.jobs.quantize`
and docs/methods.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization as tq
import torch.nn as nn
import torch.nn.functional as F

from .engine import TORCH_AO_BACKEND, per_channel_qweight, quiet, store_scale, store_zero_points
from .graph import quantizable_layers, set_submodule

__all__ = ["WEIGHT_ONLY_TYPES", "Int8WeightOnlyConv2d", "Int8WeightOnlyLinear", "quantize_weight_only", "weight_only_structure"]


def _weight_only_qparams(weight: torch.Tensor) -> torch.Tensor:
    """The per-channel symmetric qint8 weight, from torch's observer and ``quantize_per_channel``."""
    observer = tq.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    w = weight.detach().float()
    observer(w)
    with quiet():
        scale, zero_point = observer.calculate_qparams()
        return torch.quantize_per_channel(w, scale.to(torch.float64), zero_point.to(torch.int64), 0, torch.qint8)


class _WeightOnly(nn.Module):
    """Int8 weight (per output channel), float32 compute on the dequantized weight."""

    def __init__(self, weight_shape: tuple[int, ...]):
        super().__init__()
        out = weight_shape[0]
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out, dtype=torch.float32))

    @classmethod
    def from_float(cls, layer: nn.Module) -> "_WeightOnly":
        """Quantize a float ``Conv2d`` / ``Linear`` layer's weight (the subclass matching the layer)."""
        m = cls(layer)
        m.set_weight_bias(layer.weight, layer.bias)
        return m

    @torch.no_grad()
    def set_weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize a float weight onto the per-channel symmetric int8 grid and keep the bias in float32."""
        q = _weight_only_qparams(weight)
        self.weight_int8.copy_(q.int_repr())
        self.weight_scale = store_scale(q.q_per_channel_scales())
        self.weight_zero_point = store_zero_points(q.q_per_channel_zero_points())
        self.bias.copy_(bias.detach().float() if bias is not None else torch.zeros_like(self.bias))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # scales may be float32 or float64 and zero points int32 or int64 (see store_scale): take them as stored
        for name in ("weight_scale", "weight_zero_point"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight(self) -> torch.Tensor:
        """The weight as a per-channel ``torch.qint8`` tensor."""
        return per_channel_qweight(self.weight_int8, self.weight_scale, self.weight_zero_point)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight on the int8 grid (``torch`` dequantization of :meth:`weight`)."""
        return self.weight().dequantize()


class Int8WeightOnlyConv2d(_WeightOnly):
    """A Conv2d with int8 weights and float32 activations (weight-only quantization).

    Parameters
    ----------
    conv : torch.nn.Conv2d
        Geometry (and, through :meth:`from_float`, weights) to copy.
    """

    def __init__(self, conv: nn.Conv2d):
        if conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be quantized")
        super().__init__(tuple(conv.weight.shape))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.float(), self.dequantized_weight().to(x.device), self.bias.to(x.device), self.stride,
                        self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight_int8.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, weight=int8"


class Int8WeightOnlyLinear(_WeightOnly):
    """A Linear layer with int8 weights and float32 activations (weight-only quantization).

    Parameters
    ----------
    linear : torch.nn.Linear
    """

    def __init__(self, linear: nn.Linear):
        super().__init__(tuple(linear.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized_weight().to(x.device), self.bias.to(x.device))

    def extra_repr(self) -> str:
        o, i = self.weight_int8.shape
        return f"in_features={i}, out_features={o}, weight=int8"


#: The module types of an ``int8_weight`` model.
WEIGHT_ONLY_TYPES = (Int8WeightOnlyConv2d, Int8WeightOnlyLinear)


def _weight_only_info(n_folded: int) -> dict[str, Any]:
    return {
        "mode": "int8_weight",
        "backend": f"{TORCH_AO_BACKEND} (PerChannelMinMaxObserver + torch.quantize_per_channel; float32 compute)",
        "weight": {"dtype": "int8", "granularity": "per_output_channel", "scheme": "symmetric",
                   "observer": "PerChannelMinMaxObserver", "range": [-128, 127]},
        "activation": None,
        "accumulation": "float32 on dequantized int8 weights",
        "batchnorm_folded": n_folded,
    }


def quantize_weight_only(folded: nn.Module, n_folded: int) -> tuple[nn.Module, dict[str, Any]]:
    """``int8_weight`` of a batch-norm-folded float model, in place (see :func:`compbias.jobs.quantize.quantize_model`).

    Returns
    -------
    model : torch.nn.Module
        ``folded``, with every conv/linear layer replaced by its weight-only int8 module.
    info : dict
        ``quantization`` (the record) and ``n_layers``.
    """
    layers = quantizable_layers(folded)
    for name, m in layers:
        cls = Int8WeightOnlyConv2d if isinstance(m, nn.Conv2d) else Int8WeightOnlyLinear
        set_submodule(folded, name, cls.from_float(m))
    return folded, {"quantization": _weight_only_info(n_folded), "n_layers": len(layers)}


def weight_only_structure(model: nn.Module) -> nn.Module:
    """The module structure of a saved ``int8_weight`` model (placeholder values), in place, for loading.

    ``model`` is the batch-norm-folded float model of the saved architecture.
    """
    for name, m in quantizable_layers(model):
        set_submodule(model, name, Int8WeightOnlyConv2d(m) if isinstance(m, nn.Conv2d) else Int8WeightOnlyLinear(m))
    return model

"""Independent int64 references for int8_static layers, shared by the quantization tests and the CPU-path probe.

Each takes a layer's *float* input and computes what the documented formula
gives, with integer tensors only: the input quantized to the layer's quint8
grid and clamped to ``[0, qmax]`` (``compbias.jobs.quantize.activation_qmax``),
exact int64 sums of the int8 x uint8 products, the bias on the accumulator's
grid, then the output requantized (hidden layers) or dequantized to float
(the classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compbias.jobs.quantize import Int8LinearFloatOut, Int8StaticLayer


def quantize_input(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, 0, qmax) - zero_point`` as int64 (float64 arithmetic)."""
    return torch.clamp(torch.round(x.double() / scale) + zero_point, 0, qmax).to(torch.int64) - zero_point


def hidden_layer(w: Int8StaticLayer, x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected uint8 output from the int64 formula, the module's own uint8 output) of one int8 layer for float input ``x``."""
    s_x, z_x = float(w.quant.scale), int(w.quant.zero_point)
    xi = quantize_input(x, s_x, z_x, qmax)
    weight = w.layer.weight()
    wi = weight.int_repr().to(torch.int64)
    s_w = weight.q_per_channel_scales().to(torch.float64)
    bias = w.layer.bias().to(torch.float64)
    if wi.ndim == 4:
        conv = w.layer
        cols = F.unfold(xi.to(torch.float64), conv.kernel_size, padding=conv.padding, stride=conv.stride)
        acc = torch.einsum("ok,nkl->nol", wi.flatten(1), cols.round().to(torch.int64))  # int64 sums
        out_h = (x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        acc, shape = acc.view(acc.shape[0], acc.shape[1], out_h, -1), (1, -1, 1, 1)
    else:
        acc, shape = xi @ wi.T, (1, -1)
    acc_scale = s_x * s_w
    acc = acc + torch.round(bias / acc_scale).to(torch.int64).view(shape)
    s_o, z_o = float(w.layer.scale), int(w.layer.zero_point)
    expected = torch.round(acc.to(torch.float64) * (acc_scale / s_o).view(shape)) + z_o
    lo = z_o if "ReLU" in type(w.layer).__name__ else 0
    expected = expected.clamp(lo, 255).to(torch.int64)
    with torch.no_grad():
        got = torch.round(w(x).double() / s_o).to(torch.int64) + z_o  # the module dequantizes: undo it exactly
    return expected, got


def float_output_layer(fc: Int8LinearFloatOut, x: torch.Tensor, qmax: int) -> torch.Tensor:
    """The classifier's logits from the int64 formula, in float64: ``s_x s_w sum((q_x - z_x) q_w) + b``."""
    s_x, z_x = float(fc.input_scale), int(fc.input_zero_point)
    acc = quantize_input(x, s_x, z_x, qmax) @ fc.weight_int8.to(torch.int64).T  # exact int64 sums
    return acc.double() * (s_x * fc.weight_scale.double()).view(1, -1) + fc.bias.double().view(1, -1)

"""Post-training quantization: fp16, bf16, int8 weight-only, int8 static.

Why our own modules and not ``torch.ao.quantization`` or torchao (see
``docs/methods.md`` for the full account): in torch 2.14 the eager/FX
``torch.ao.quantization`` flows still run but warn that they are deprecated
and scheduled for removal, and the quantized-tensor types they build on are
deprecated too; PT2E moved to torchao, whose converted models are reference
graphs (dequantize -> float32 conv) that only get int8 kernels after
``torch.compile`` lowering, and whose exported graphs do not round-trip
through safetensors. The modules here are small, serialise as plain int8 /
float tensors, and compute exactly what an int8 backend computes:

``int8_weight``
    weights on a symmetric per-output-channel int8 grid
    (``q = clamp(round(w / s_c), -128, 127)``, ``s_c = max|w_c| / 127``);
    activations stay float32 and each layer computes with ``q * s_c``.
``int8_static``
    the same weights, and the input of every convolution and linear layer
    quantized to uint8 with a per-tensor scale and zero point calibrated
    (min/max) on training data; the bias is rounded onto the int32 grid of
    ``s_x * s_c``; the product is accumulated **exactly in integers**
    (carried out in float64, which represents every int32 sum exactly),
    then scaled back to float32. ReLU, residual additions and pooling run
    in float32 between quantized layers, and the next layer re-quantizes
    its input, as in the PT2E reference representation.

Batch norms are folded into the preceding convolution before int8
quantization, as deployment does.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prune import conv_bn_pairs

__all__ = [
    "QUANT_LEVELS",
    "QuantizedConv2d",
    "QuantizedLinear",
    "quantize_model",
    "fold_batchnorm",
    "quantized_structure",
    "apply_half_precision",
]

QUANT_LEVELS = ("fp16", "bf16", "int8_weight", "int8_static")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns ``(q int8, scale float32 per channel)``."""
    w = w.detach().float()
    amax = w.flatten(1).abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -128, 127).to(torch.int8)
    return q, scale


class _QuantizedLayer(nn.Module):
    """Common storage: int8 weight, per-channel scale, float bias, input qparams."""

    def __init__(self, weight_shape: tuple[int, ...], mode: str):
        super().__init__()
        if mode not in ("int8_weight", "int8_static"):
            raise ValueError(f"unknown int8 mode {mode!r}")
        self.mode = mode
        out = weight_shape[0]
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out, dtype=torch.float32))
        if mode == "int8_static":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, s = _quantize_weight(weight)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(s)
        self.bias.copy_(bias.detach().float() if bias is not None else torch.zeros_like(self.bias))

    def set_input_range(self, lo: float, hi: float) -> None:
        """Affine uint8 parameters for inputs in ``[lo, hi]`` (the range always holds 0)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zero_point = int(min(255, max(0, round(-lo / scale))))
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)

    def _weight_shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.weight_int8.ndim - 1)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as float32 values on the int8 grid."""
        return self.weight_int8.float() * self.weight_scale.view(self._weight_shape())

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8_weight":
            return self._op(x.float(), self.dequantized_weight(), self.bias)
        s_x, z_x = self.input_scale, self.input_zero_point
        # uint8 activations: q_x = clamp(round(x / s_x) + z_x, 0, 255); use q_x - z_x.
        q_x = torch.clamp(torch.round(x.float() / s_x) + z_x, 0, 255) - z_x
        acc_scale = (s_x.double() * self.weight_scale.double())  # per output channel
        bias_int = torch.round(self.bias.double() / acc_scale)  # int32 bias grid
        acc = self._op(q_x.double(), self.weight_int8.double(), None)  # exact integer sums
        shape = (1, -1) + (1,) * (acc.ndim - 2)
        acc = acc + bias_int.view(shape)
        return (acc * acc_scale.view(shape)).float()


class QuantizedConv2d(_QuantizedLayer):
    """A Conv2d with int8 weights (and, in ``int8_static`` mode, uint8 inputs)."""

    def __init__(self, conv: nn.Conv2d, mode: str):
        super().__init__(tuple(conv.weight.shape), mode)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be quantized")

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight_int8.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, mode={self.mode}"


class QuantizedLinear(_QuantizedLayer):
    """A Linear layer with int8 weights (and, in ``int8_static`` mode, uint8 inputs)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__(tuple(linear.weight.shape), mode)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        o, i = self.weight_int8.shape
        return f"in_features={i}, out_features={o}, mode={self.mode}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (eval mode) with every conv->BN pair folded into the conv.

    Returns
    -------
    model : torch.nn.Module
        The folded copy; each folded BN is replaced by ``nn.Identity``.
    pairs : list of (conv name, bn name)
    """
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_weight = conv.weight * factor.view(-1, 1, 1, 1)
        new_bias = (bias - bn.running_mean) * factor + beta
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        folded.weight.copy_(new_weight)
        folded.bias.copy_(new_bias)
        _set_submodule(model, conv_name, folded)
        _set_submodule(model, bn_name, nn.Identity())
    return model, pairs


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantized_structure(model: nn.Module, mode: str) -> nn.Module:
    """Rebuild the module structure of a quantized model (empty buffers), for loading.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built float model of the same architecture.
    mode : {'fp16', 'bf16', 'int8_weight', 'int8_static'}
    """
    if mode in _HALF:
        return apply_half_precision(model, mode)
    if mode not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_LEVELS)}")
    model, _ = fold_batchnorm(model)
    for name, m in _quantizable(model):
        _set_submodule(model, name, QuantizedConv2d(m, mode) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, mode))
    model.compbias_input_dtype = torch.float32
    return model.eval()


def apply_half_precision(model: nn.Module, level: str) -> nn.Module:
    """Cast a model to float16 / bfloat16; inputs are cast on entry, logits returned as float32."""
    dtype = _HALF[level]
    model = copy.deepcopy(model).eval().to(dtype)
    model.compbias_input_dtype = dtype
    model.register_forward_pre_hook(lambda _m, args: tuple(a.to(dtype) if torch.is_tensor(a) else a for a in args))
    model.register_forward_hook(lambda _m, _args, out: out.float())
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, level: str, *, calibration: Iterable[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training quantization of a trained float model.

    Parameters
    ----------
    model : torch.nn.Module
        Trained float model (left unchanged; a quantized copy is returned).
    level : {'fp16', 'bf16', 'int8_weight', 'int8_static'}
    calibration : iterable of torch.Tensor, optional
        Input batches for ``int8_static`` (required there): the min/max of
        every quantized layer's input over these batches sets its scale.

    Returns
    -------
    model : torch.nn.Module
        The quantized model, in eval mode on the CPU.
    info : dict
        ``quantization`` parameters for the model spec and ``n_layers``.
    """
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {', '.join(QUANT_LEVELS)}")
    model = copy.deepcopy(model).cpu().eval()
    if level in _HALF:
        q = apply_half_precision(model, level)
        return q, {"quantization": {"mode": level, "dtype": str(_HALF[level]).replace("torch.", "")}, "n_layers": 0}

    folded, pairs = fold_batchnorm(model)
    layers = _quantizable(folded)
    ranges: dict[str, list[float]] = {}
    if level == "int8_static":
        if calibration is None:
            raise ValueError("int8_static needs calibration batches of training inputs")
        hooks = []
        for name, m in layers:
            def observe(_m, args, name=name):
                x = args[0].detach()
                lo, hi = float(x.min()), float(x.max())
                r = ranges.setdefault(name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            hooks.append(m.register_forward_pre_hook(observe))
        n_batches = 0
        for xb in calibration:
            folded(xb.float().cpu())
            n_batches += 1
        for h in hooks:
            h.remove()
        if n_batches == 0:
            raise ValueError("int8_static calibration got no batches")
    for name, m in layers:
        q = QuantizedConv2d(m, level) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, level)
        q.set_weight(m.weight, m.bias)
        if level == "int8_static":
            if name not in ranges:
                raise RuntimeError(f"layer {name} saw no calibration input")
            q.set_input_range(*ranges[name])
        _set_submodule(folded, name, q)
    folded.compbias_input_dtype = torch.float32
    info = {
        "quantization": {
            "mode": level,
            "weight": {"dtype": "int8", "granularity": "per_output_channel", "scheme": "symmetric", "range": [-128, 127]},
            "activation": {"dtype": "uint8", "granularity": "per_tensor", "scheme": "affine", "observer": "minmax"} if level == "int8_static" else None,
            "accumulation": "exact integer (float64)" if level == "int8_static" else "float32 on dequantized int8 weights",
            "batchnorm_folded": len(pairs),
        },
        "n_layers": len(layers),
    }
    return folded.eval(), info


def is_quantized(model: nn.Module) -> bool:
    """True for a model returned by :func:`quantize_model`."""
    return any(isinstance(m, _QuantizedLayer) for m in model.modules()) or hasattr(model, "compbias_input_dtype") and model.compbias_input_dtype != torch.float32


__all__.append("is_quantized")

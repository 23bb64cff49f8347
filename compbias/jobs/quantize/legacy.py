"""The int8 modules of compbias's first version (format 1): an exact integer simulation carried out in float64.

Why this is still in the package: models saved in that format (a
``quantization`` record without ``backend``, or with
:data:`SIMULATION_BACKEND`) hold these modules' buffers, and only these
modules' ``forward`` computes what those models computed, so
:func:`compbias.jobs.load_model` rebuilds them (:func:`legacy_structure`)
to load old saves. Only that minimum is kept: the buffers and the forward
pass. Building such a model from a float one (the simulator,
``simulate_int8``: per-channel weight grid ``s_c = max|w_c| / 127``,
min/max input calibration) is not the package's job any more; it lives in
the tests (``tests/jobs/int8_simulation.py``) as the independent reference
the torch.ao models are checked against.

Weights on a symmetric per-channel int8 grid; for ``int8_static`` every
conv/linear input quantized to uint8 (full 8 bits), the bias rounded onto
the int32 grid of ``s_x * s_c``, products summed exactly (float64 holds
every such integer sum) and scaled back to float32 -- outputs are not
requantized. ``int8_weight`` computes float32 activations times the
dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import quantizable_layers, set_submodule

__all__ = ["LEGACY_TYPES", "SIMULATION_BACKEND", "QuantizedConv2d", "QuantizedLinear", "legacy_structure"]

#: ``quantization["backend"]`` of models built by the first version's simulator (``simulate_int8``).
SIMULATION_BACKEND = "compbias.simulation"


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
    """Simulated int8 Conv2d of compbias's first version (exact integer sums in float64).

    Kept to load models saved in that format; the tests' simulator
    (``tests/jobs/int8_simulation.py``, ``simulate_int8``) builds it as the
    independent check of the torch.ao models.
    """

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
    """Simulated int8 Linear of compbias's first version (see :class:`QuantizedConv2d`)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__(tuple(linear.weight.shape), mode)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        o, i = self.weight_int8.shape
        return f"in_features={i}, out_features={o}, mode={self.mode}"


#: The module types of a model of the first version's format.
LEGACY_TYPES = (QuantizedConv2d, QuantizedLinear)


def legacy_structure(model: nn.Module, level: str) -> nn.Module:
    """Every conv/linear of the batch-norm-folded ``model`` replaced, in place, by its simulated int8 module (placeholder values)."""
    for name, m in quantizable_layers(model):
        set_submodule(model, name, QuantizedConv2d(m, level) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, level))
    return model

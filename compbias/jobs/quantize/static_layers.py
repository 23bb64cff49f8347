"""The int8 modules of ``int8_static``: torch.ao's int8 conv/linear with plain-tensor state, and the float-output classifier.

Every convolution and linear layer of an ``int8_static`` model is an
:class:`Int8StaticLayer` (``quant -> int8 layer -> dequant``) whose layer is
one of torch's ``torch.ao.nn.quantized`` / ``torch.ao.nn.intrinsic.quantized``
modules with a state dict of plain tensors (:class:`Int8Conv2d`,
:class:`Int8ConvReLU2d`, :class:`Int8Linear`, :class:`Int8LinearReLU`), so
``weights.safetensors`` needs no pickling and rebuilds bit-exactly; the
model's output layer is an :class:`Int8LinearFloatOut` (int32 accumulator
dequantized to float32 logits, not requantized). How they are built:
:mod:`compbias.jobs.quantize.static`; the arithmetic: docs/methods.md.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn as nn
from torch.ao.nn.quantized.modules.linear import LinearPackedParams

from .engine import activation_qmax, clamp_to_grid, per_channel_qweight, quiet, store_scale, store_zero_points, use_engine

__all__ = [
    "FLOAT_OUTPUT_KERNEL",
    "INT8_STATIC_TYPES",
    "Int8Conv2d",
    "Int8ConvReLU2d",
    "Int8Linear",
    "Int8LinearFloatOut",
    "Int8LinearReLU",
    "Int8StaticLayer",
]


def _pop(state_dict: dict, prefix: str, names: Iterable[str], missing_keys: list[str]) -> dict[str, torch.Tensor] | None:
    found = {}
    for name in names:
        if prefix + name in state_dict:
            found[name] = state_dict.pop(prefix + name)
        else:
            missing_keys.append(prefix + name)
    return found if len(found) == len(tuple(names)) else None


class _PlainState:
    """Mixin for ``torch.ao.nn.quantized`` conv/linear modules: a state dict of plain tensors.

    torch's own state dict holds a quantized weight tensor (and, for linear
    layers, a tuple and a dtype), which safetensors cannot store, and keeps
    the output scale as float32 although the module computes with a double.
    These modules save ``weight_int8`` (int8), ``weight_scale`` and
    ``weight_zero_point`` (per output channel), ``bias`` (float32; zeros
    when the layer has none), and the output ``scale`` (float64) and
    ``zero_point``; loading rebuilds the packed weights from them exactly.
    """

    _STATE = ("weight_int8", "weight_scale", "weight_zero_point", "bias", "scale", "zero_point")

    def __setstate__(self, state):
        # torch's quantized conv __setstate__ forgets nn.Module's hook dicts (unpickled modules cannot run)
        super().__setstate__(state)
        for key, value in nn.Module().__dict__.items():
            self.__dict__.setdefault(key, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w, b = self._weight_bias()
        if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or w.q_per_channel_axis() != 0:
            raise ValueError(f"{type(self).__name__}: expected per-output-channel weights, got {w.qscheme()}")
        destination[prefix + "weight_int8"] = w.int_repr()
        destination[prefix + "weight_scale"] = store_scale(w.q_per_channel_scales())
        destination[prefix + "weight_zero_point"] = store_zero_points(w.q_per_channel_zero_points())
        destination[prefix + "bias"] = (b.detach() if b is not None else torch.zeros(w.shape[0])).float()
        destination[prefix + "scale"] = torch.tensor(float(self.scale), dtype=torch.float64)
        destination[prefix + "zero_point"] = torch.tensor(int(self.zero_point), dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        parts = _pop(state_dict, prefix, self._STATE, missing_keys)
        if parts is not None:
            w = per_channel_qweight(parts["weight_int8"], parts["weight_scale"], parts["weight_zero_point"])
            if tuple(w.shape) != tuple(self._weight_bias()[0].shape):
                error_msgs.append(f"size mismatch for {prefix}weight_int8: copying {tuple(w.shape)}, "
                                  f"the layer has {tuple(self._weight_bias()[0].shape)}")
            else:
                # weights are packed for an engine: the one the model was quantized for
                with use_engine(getattr(self, "compbias_engine", None) or torch.backends.quantized.engine):
                    self.set_weight_bias(w, parts["bias"].float())
                self.scale = float(parts["scale"])
                self.zero_point = int(parts["zero_point"])
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _SilentPackedParams(LinearPackedParams):
    """Linear packed weights whose state the owning layer saves (as plain tensors)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _silence_packed_params(layer: nn.Module) -> None:
    old = layer._packed_params
    new = _SilentPackedParams(old.dtype)
    with quiet():
        new.set_weight_bias(*old._weight_bias())
    layer._packed_params = new


class Int8Conv2d(_PlainState, nnq.Conv2d):
    """``torch.ao.nn.quantized.Conv2d`` (int8 kernels) with a plain-tensor state dict."""


class Int8ConvReLU2d(_PlainState, nniq.ConvReLU2d):
    """``torch.ao.nn.intrinsic.quantized.ConvReLU2d`` (conv + ReLU, int8) with a plain-tensor state dict."""


class Int8Linear(_PlainState, nnq.Linear):
    """``torch.ao.nn.quantized.Linear`` (int8 kernels) with a plain-tensor state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _silence_packed_params(self)


class Int8LinearReLU(_PlainState, nniq.LinearReLU):
    """``torch.ao.nn.intrinsic.quantized.LinearReLU`` (linear + ReLU, int8) with a plain-tensor state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _silence_packed_params(self)


INT8_STATIC_TYPES = (Int8Conv2d, Int8ConvReLU2d, Int8Linear, Int8LinearReLU)


class Int8StaticLayer(nn.Module):
    """One int8 layer with float32 input and output: ``quant -> layer -> dequant``.

    Built around a float ``nn.Conv2d`` / ``nn.Linear`` (or
    ``torch.ao.nn.intrinsic`` ``ConvReLU2d`` / ``LinearReLU``); after
    ``torch.ao.quantization.convert`` ``quant`` is a ``Quantize`` (input scale
    and zero point), ``layer`` an int8 module of this module and ``dequant``
    a ``DeQuantize``. Inputs on another device are moved to the CPU, where
    the int8 kernels run.

    Parameters
    ----------
    layer : torch.nn.Module
        The float layer (its float weights are quantized by ``convert``).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.quant = tq.QuantStub()
        self.layer = layer
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.float()
        if isinstance(self.quant, nnq.Quantize):  # converted (not while calibrating): enforce the activation grid
            engine = getattr(self.layer, "compbias_engine", None) or torch.backends.quantized.engine
            x = clamp_to_grid(x, float(self.quant.scale), int(self.quant.zero_point), activation_qmax(engine))
        with quiet():
            return self.dequant(self.layer(self.quant(x)))


#: The torch kernel the output layer of ``int8_static`` runs on (int8 in, int32 accumulator, float32 out).
FLOAT_OUTPUT_KERNEL = "torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32"


def _float_output_kernel_available(packed, in_features: int) -> bool:
    """Whether the engine that packed ``packed`` has the float-output int8 linear kernel (fbgemm / x86 do, qnnpack not)."""
    try:
        with quiet():
            torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.zeros(1, in_features), 1.0, 0, packed)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class Int8LinearFloatOut(nn.Module):
    """The classifier of an ``int8_static`` model: int8 in, int8 weights, int32 accumulator, float32 logits.

    Like the other int8 layers, the input is quantized to quint8 with the
    scale and zero point its calibration observer gave (7 bits on x86 /
    fbgemm), the weights are per-output-channel symmetric qint8 and the
    products are summed in int32 by the engine's kernel. Unlike them, the
    output is not requantized to uint8: the accumulator is dequantized to
    float32 and the float bias added,
    ``y = s_x * s_w[c] * sum_k (q_x[k] - z_x) * q_w[c, k] + b[c]``,
    which is what int8 deployments do with the logits (an fp32-output int8
    GEMM as the last op). On the x86 and fbgemm engines this is torch's
    ``quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` kernel;
    engines without it (qnnpack) compute the same formula with an int64
    matrix product (``kernel`` says which). Requantizing the logits (a
    step of ~0.1 on 7 bits) made the two logits of a binary task exactly
    equal near the decision boundary, and ``argmax`` gives ties to class 0.

    The state dict holds plain tensors: ``weight_int8`` (int8),
    ``weight_scale``, ``weight_zero_point`` (per output channel), ``bias``
    (float32), ``input_scale`` (float64 scalar) and ``input_zero_point``
    (int64 scalar); the packed weights are rebuilt from them, bit-exactly.

    Parameters
    ----------
    in_features, out_features : int
    engine : str, optional
        The quantized engine to pack the weights for; default the current one.
    """

    def __init__(self, in_features: int, out_features: int, engine: str | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compbias_engine = engine or torch.backends.quantized.engine
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int64))
        self._packed = None
        self._use_kernel: bool | None = None

    @classmethod
    def from_static_layer(cls, wrapper: "Int8StaticLayer") -> "Int8LinearFloatOut":
        """The float-output version of a converted :class:`Int8StaticLayer` around a (non-ReLU) linear layer.

        Takes its input scale and zero point (from the calibration observer)
        and its int8 weights and bias unchanged; only the output
        requantization is dropped.

        Raises
        ------
        TypeError
            If ``wrapper`` does not hold a converted ``Int8Linear``.
        """
        layer = wrapper.layer
        if not isinstance(layer, Int8Linear) or not isinstance(wrapper.quant, nnq.Quantize):
            raise TypeError(f"expected a converted int8 linear layer (quant -> Int8Linear -> dequant), got {type(layer).__name__}")
        weight, bias = layer._weight_bias()
        engine = getattr(layer, "compbias_engine", None) or torch.backends.quantized.engine
        m = cls(weight.shape[1], weight.shape[0], engine)
        m.set_qparams(weight, bias, float(wrapper.quant.scale), int(wrapper.quant.zero_point))
        return m

    @torch.no_grad()
    def set_qparams(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float, input_zero_point: int) -> None:
        """Set the per-channel qint8 ``weight``, float ``bias`` and the input's quint8 scale and zero point.

        Raises
        ------
        ValueError
            If ``weight`` is not a per-output-channel quantized tensor of this layer's shape.
        """
        if not weight.is_quantized or weight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) \
                or weight.q_per_channel_axis() != 0:
            raise ValueError("Int8LinearFloatOut needs per-output-channel quantized int8 weights")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.in_features} -> {self.out_features} layer")
        self.weight_int8 = weight.int_repr().to(torch.int8).contiguous()
        self.weight_scale = store_scale(weight.q_per_channel_scales())
        self.weight_zero_point = store_zero_points(weight.q_per_channel_zero_points())
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).clone()
        self.input_scale = torch.tensor(float(input_scale), dtype=torch.float64)
        self.input_zero_point = torch.tensor(int(input_zero_point), dtype=torch.int64)
        self._packed = None

    def weight(self) -> torch.Tensor:
        """The weight as a per-channel ``torch.qint8`` tensor."""
        return per_channel_qweight(self.weight_int8, self.weight_scale, self.weight_zero_point)

    @property
    def kernel(self) -> str:
        """What computes the layer: torch's float-output int8 kernel, or the int64 formula where the engine lacks it."""
        self._pack()
        return (f"{FLOAT_OUTPUT_KERNEL} ({self.compbias_engine})" if self._use_kernel
                else f"int64 matrix product (the {self.compbias_engine} engine has no float-output int8 linear kernel)")

    def _pack(self):
        if self._packed is None:
            with use_engine(self.compbias_engine):
                self._packed = torch.ops.quantized.linear_prepack(self.weight().cpu(), self.bias.float().cpu())
            self._use_kernel = _float_output_kernel_available(self._packed, self.in_features)
        return self._packed

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"], state["_use_kernel"] = None, None  # packed weights are engine objects: rebuilt on use
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # scales may be float32 or float64 and zero points int32 or int64 (see store_scale): take them as stored
        for name in ("weight_scale", "weight_zero_point"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.float()
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1]).contiguous()
        packed = self._pack()
        s_x, z_x = float(self.input_scale), int(self.input_zero_point)
        x2 = clamp_to_grid(x2, s_x, z_x, activation_qmax(self.compbias_engine))
        with quiet():
            if self._use_kernel:
                out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, s_x, z_x, packed)
            else:
                qx = torch.quantize_per_tensor(x2, s_x, z_x, torch.quint8).int_repr().to(torch.int64) - z_x
                acc = qx @ (self.weight_int8.to(torch.int64) - self.weight_zero_point.to(torch.int64).view(-1, 1)).T
                out = (acc.to(torch.float64) * (s_x * self.weight_scale.to(torch.float64))).float() + self.bias.float()
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=int8, "
                f"input=quint8 (scale={float(self.input_scale):.6g}, zero_point={int(self.input_zero_point)}), output=float32")

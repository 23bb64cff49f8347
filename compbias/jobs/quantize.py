"""Post-training quantization: fp16, bf16, int8 weight-only, int8 static.

Which path (see ``docs/methods.md`` for the full account): the int8 levels
run on what torch itself still ships, ``torch.ao.quantization`` (eager mode),
with its real int8 CPU kernels. torchao was tried: its converted models are
reference graphs (dequantize -> float32 conv) that accumulate in float32
until ``torch.compile`` lowers them, and they did not round-trip through
safetensors.

``int8_static``
    Batch norms are folded into the preceding convolutions first. Then every
    convolution and linear layer becomes an :class:`Int8StaticLayer`:
    ``QuantStub -> conv/linear (with a directly following ReLU fused in) ->
    DeQuantStub``, prepared, calibrated on the training batches given and
    converted by ``torch.ao.quantization.prepare`` / ``convert``. The
    converted layer is a ``torch.ao.nn.quantized`` ``Conv2d`` / ``Linear``
    (``ConvReLU2d`` / ``LinearReLU`` when fused) with packed int8 weights:
    quint8 input, int8 x uint8 products accumulated in int32 by the engine's
    kernels (x86, else fbgemm, else qnnpack), bias added, the result
    requantized to quint8 with the output scale, then dequantized to float32.
    Weights are per-output-channel symmetric qint8
    (``PerChannelMinMaxObserver``, ``scale = max|w_c| / 127.5``); activations
    are per-tensor affine quint8 from a min/max observer. On the x86 and
    fbgemm engines activations use 7 bits (``[0, 127]``, what
    ``reduce_range=True`` means) because their kernels on CPUs without
    AVX-512 VNNI (AVX2-only CPUs, CUDA machines' hosts, older Xeons) sum
    pairs of uint8 x int8 products in int16, which saturates with 8-bit
    inputs; qnnpack gets the full ``[0, 255]``. The 7 bits are enforced at
    run time too (:func:`activation_qmax`): each layer clamps its input to
    the top of its grid before quantizing. ``reduce_range`` only narrows the
    calibrated scale, and the quantizer itself clamps at 255, so an input
    beyond the calibrated range used to reach the kernels as an 8-bit value:
    measured on the AVX2 path (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2
    ONEDNN_MAX_CPU_ISA=AVX2``), convolutions were then up to 17 output
    quanta (x86 engine) or 79 (fbgemm) off the integer formula and the
    float-output classifier 2% off, while AVX-512 VNNI CPUs were exact. With
    the clamp every CPU computes the same integers (docs/methods.md). Residual additions, pooling and
    unfused ReLUs run in float32 between the quantized layers; each layer
    re-quantizes its own input. The module hierarchy is kept (each layer is
    replaced in place), so block outputs can still be hooked by name.

    The exception is the model's output layer, the ``nn.Linear`` whose output
    is the model's output (``fc`` of every architecture in
    :mod:`compbias.jobs.models`; found by :func:`output_linear`). It becomes
    an :class:`Int8LinearFloatOut`: the same calibrated quint8 input and
    int8 per-channel weights, int32 accumulation, but its accumulator is
    dequantized to float32 logits (torch's
    ``quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` kernel), not
    requantized to uint8, as deployments keep the classifier's output.
    Requantized logits (a step of ~0.1 on 7 bits) tie near the decision
    boundary, and ``argmax`` gives ties to class 0. The spec's
    ``quantization["output_layer"]`` records it (``{"name": "fc", "output":
    "float32 ...", "kernel": ...}``; ``"name": None`` when the model's output
    is not a linear layer's, which is then requantized like the others).
    Models saved before this (no ``output_layer`` in the record) load with
    their requantized classifier, as they were.
``int8_weight``
    Weight-only int8: the same per-channel symmetric grid, computed with
    torch's own observer and ``torch.quantize_per_channel``; each layer
    computes float32 activations times the dequantized weights, which is
    what weight-only int8 kernels compute (:class:`Int8WeightOnlyConv2d`,
    :class:`Int8WeightOnlyLinear`).

Both save as plain tensors (int8 weights, per-channel scales and zero
points, float biases, activation scales and zero points), so
``weights.safetensors`` needs no pickling, and rebuild bit-exactly.

The modules of compbias's first version (:class:`QuantizedConv2d`,
:class:`QuantizedLinear`: an exact integer simulation carried out in
float64) are kept: models saved with them still load, and
:func:`simulate_int8` is the independent check of the torch.ao models.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from typing import Any, Iterable, Iterator

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.nn.quantized.modules.linear import LinearPackedParams as _LinearPackedParams

from .prune import conv_bn_pairs

__all__ = [
    "QUANT_LEVELS",
    "ENGINES",
    "TORCH_AO_BACKEND",
    "SIMULATION_BACKEND",
    "Int8StaticLayer",
    "Int8Conv2d",
    "Int8ConvReLU2d",
    "Int8Linear",
    "Int8LinearReLU",
    "Int8LinearFloatOut",
    "FLOAT_OUTPUT_KERNEL",
    "Int8WeightOnlyConv2d",
    "Int8WeightOnlyLinear",
    "QuantizedConv2d",
    "QuantizedLinear",
    "quantize_model",
    "output_linear",
    "simulate_int8",
    "select_engine",
    "activation_qmax",
    "fold_batchnorm",
    "quantized_structure",
    "apply_half_precision",
    "is_quantized",
]

QUANT_LEVELS = ("fp16", "bf16", "int8_weight", "int8_static")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Quantized engines in order of preference (the first one torch supports is used).
ENGINES = ("x86", "fbgemm", "qnnpack")
#: ``quantization["backend"]`` of models built on torch.ao (the engine is appended).
TORCH_AO_BACKEND = "torch.ao.quantization"
#: ``quantization["backend"]`` of models built by :func:`simulate_int8`.
SIMULATION_BACKEND = "compbias.simulation"
_REDUCE_RANGE_ENGINES = ("x86", "fbgemm")


def activation_qmax(engine: str) -> int:
    """The top of the quint8 activation grid of ``int8_static`` on ``engine``.

    Returns
    -------
    int
        127 (7-bit activations, ``reduce_range``) on the x86 and fbgemm
        engines, whose int8 kernels sum pairs of uint8 x int8 products in
        int16 on CPUs without AVX-512 VNNI (``2 * 127 * 128 = 32512`` fits,
        ``2 * 255 * 128`` does not); 255 on the others (qnnpack).
    """
    return 127 if engine in _REDUCE_RANGE_ENGINES else 255


def _clamp_to_grid(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """``x`` clamped to the largest value the quint8 grid ``(scale, zero_point)`` holds below ``qmax``.

    The quantizer rounds ``x / scale + zero_point`` and clamps it to
    ``[0, 255]``; clamping the float input at ``(qmax - zero_point) * scale``
    first makes that ``[0, qmax]``, so an input beyond the calibrated range
    saturates at ``qmax`` instead of reaching the kernel as an 8-bit value.
    """
    return x if qmax >= 255 else x.clamp(max=(qmax - zero_point) * scale)


# -- torch.ao plumbing -----------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the eager flow and quantized tensors still work)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        warnings.filterwarnings("ignore", message=r"(?s).*must run observer before calling calculate_qparams")
        yield


def select_engine(engine: str | None = None) -> str:
    """The quantized engine to use: ``engine`` if given, else the first of :data:`ENGINES` torch supports.

    Raises
    ------
    RuntimeError
        If ``engine`` (or every engine of :data:`ENGINES`) is not supported by
        this torch build; the message lists the supported ones.
    """
    supported = list(torch.backends.quantized.supported_engines)
    if engine is not None:
        if engine not in supported:
            raise RuntimeError(f"quantized engine {engine!r} is not supported by this torch build (supported: {supported})")
        return engine
    for name in ENGINES:
        if name in supported:
            return name
    raise RuntimeError(f"this torch build has none of the quantized engines {list(ENGINES)} (supported: {supported}); "
                       "int8 quantization needs one of them")


@contextlib.contextmanager
def _use_engine(engine: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` (weights are packed for it), restoring it afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with _quiet():
            yield
    finally:
        torch.backends.quantized.engine = previous


def _per_channel_qweight(int_repr: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """A per-output-channel qint8 tensor from its stored parts (bit-exact)."""
    with _quiet():
        return torch._make_per_channel_quantized_tensor(
            int_repr.to(torch.int8).contiguous(), scale.to(torch.float64), zero_point.to(torch.int64), 0
        )


def _store_scale(scale: torch.Tensor) -> torch.Tensor:
    """Per-channel scales as float32 when that is exact (it is for observer scales), else float64."""
    scale = scale.detach().to(torch.float64)
    as32 = scale.to(torch.float32)
    return as32 if torch.equal(as32.to(torch.float64), scale) else scale


def _store_zero_points(zp: torch.Tensor) -> torch.Tensor:
    zp = zp.detach().to(torch.int64)
    return zp.to(torch.int32) if bool((zp.abs() < 2**31).all()) else zp


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
        destination[prefix + "weight_scale"] = _store_scale(w.q_per_channel_scales())
        destination[prefix + "weight_zero_point"] = _store_zero_points(w.q_per_channel_zero_points())
        destination[prefix + "bias"] = (b.detach() if b is not None else torch.zeros(w.shape[0])).float()
        destination[prefix + "scale"] = torch.tensor(float(self.scale), dtype=torch.float64)
        destination[prefix + "zero_point"] = torch.tensor(int(self.zero_point), dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        parts = _pop(state_dict, prefix, self._STATE, missing_keys)
        if parts is not None:
            w = _per_channel_qweight(parts["weight_int8"], parts["weight_scale"], parts["weight_zero_point"])
            if tuple(w.shape) != tuple(self._weight_bias()[0].shape):
                error_msgs.append(f"size mismatch for {prefix}weight_int8: copying {tuple(w.shape)}, "
                                  f"the layer has {tuple(self._weight_bias()[0].shape)}")
            else:
                # weights are packed for an engine: the one the model was quantized for
                with _use_engine(getattr(self, "compbias_engine", None) or torch.backends.quantized.engine):
                    self.set_weight_bias(w, parts["bias"].float())
                self.scale = float(parts["scale"])
                self.zero_point = int(parts["zero_point"])
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _SilentPackedParams(_LinearPackedParams):
    """Linear packed weights whose state the owning layer saves (as plain tensors)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _silence_packed_params(layer: nn.Module) -> None:
    old = layer._packed_params
    new = _SilentPackedParams(old.dtype)
    with _quiet():
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


_INT8_STATIC_TYPES = (Int8Conv2d, Int8ConvReLU2d, Int8Linear, Int8LinearReLU)


class Int8StaticLayer(nn.Module):
    """One int8 layer with float32 input and output: ``quant -> layer -> dequant``.

    Built around a float ``nn.Conv2d`` / ``nn.Linear`` (or
    ``torch.ao.nn.intrinsic`` ``ConvReLU2d`` / ``LinearReLU``); after
    ``torch.ao.quantization.convert`` ``quant`` is a ``Quantize`` (input scale
    and zero point), ``layer`` an int8 module from this file and ``dequant``
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
            x = _clamp_to_grid(x, float(self.quant.scale), int(self.quant.zero_point), activation_qmax(engine))
        with _quiet():
            return self.dequant(self.layer(self.quant(x)))


#: The torch kernel the output layer of ``int8_static`` runs on (int8 in, int32 accumulator, float32 out).
FLOAT_OUTPUT_KERNEL = "torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32"


def _float_output_kernel_available(packed, in_features: int) -> bool:
    """Whether the engine that packed ``packed`` has the float-output int8 linear kernel (fbgemm / x86 do, qnnpack not)."""
    try:
        with _quiet():
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
        self.weight_scale = _store_scale(weight.q_per_channel_scales())
        self.weight_zero_point = _store_zero_points(weight.q_per_channel_zero_points())
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).clone()
        self.input_scale = torch.tensor(float(input_scale), dtype=torch.float64)
        self.input_zero_point = torch.tensor(int(input_zero_point), dtype=torch.int64)
        self._packed = None

    def weight(self) -> torch.Tensor:
        """The weight as a per-channel ``torch.qint8`` tensor."""
        return _per_channel_qweight(self.weight_int8, self.weight_scale, self.weight_zero_point)

    @property
    def kernel(self) -> str:
        """What computes the layer: torch's float-output int8 kernel, or the int64 formula where the engine lacks it."""
        self._pack()
        return (f"{FLOAT_OUTPUT_KERNEL} ({self.compbias_engine})" if self._use_kernel
                else f"int64 matrix product (the {self.compbias_engine} engine has no float-output int8 linear kernel)")

    def _pack(self):
        if self._packed is None:
            with _use_engine(self.compbias_engine):
                self._packed = torch.ops.quantized.linear_prepack(self.weight().cpu(), self.bias.float().cpu())
            self._use_kernel = _float_output_kernel_available(self._packed, self.in_features)
        return self._packed

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"], state["_use_kernel"] = None, None  # packed weights are engine objects: rebuilt on use
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # scales may be float32 or float64 and zero points int32 or int64 (see _store_scale): take them as stored
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
        x2 = _clamp_to_grid(x2, s_x, z_x, activation_qmax(self.compbias_engine))
        with _quiet():
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


def _static_qconfig(engine: str):
    activation = tq.MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                             quant_min=0, quant_max=activation_qmax(engine))
    weight = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=activation, weight=weight)


def _convert_mapping() -> dict:
    from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

    mapping = get_default_static_quant_module_mappings()
    mapping.update({nn.Conv2d: Int8Conv2d, nni.ConvReLU2d: Int8ConvReLU2d, nn.Linear: Int8Linear, nni.LinearReLU: Int8LinearReLU})
    return mapping


# -- weight-only int8 ------------------------------------------------------------------------


def _weight_only_qparams(weight: torch.Tensor) -> torch.Tensor:
    """The per-channel symmetric qint8 weight, from torch's observer and ``quantize_per_channel``."""
    observer = tq.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    w = weight.detach().float()
    observer(w)
    with _quiet():
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
        self.weight_scale = _store_scale(q.q_per_channel_scales())
        self.weight_zero_point = _store_zero_points(q.q_per_channel_zero_points())
        self.bias.copy_(bias.detach().float() if bias is not None else torch.zeros_like(self.bias))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # scales may be float32 or float64 and zero points int32 or int64 (see _store_scale): take them as stored
        for name in ("weight_scale", "weight_zero_point"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight(self) -> torch.Tensor:
        """The weight as a per-channel ``torch.qint8`` tensor."""
        return _per_channel_qweight(self.weight_int8, self.weight_scale, self.weight_zero_point)

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


# -- the first version's modules: exact integer simulation (old saves, and the check) ----------


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
    """Simulated int8 Conv2d of compbias's first version (exact integer sums in float64).

    Kept to load models saved in that format and as the independent check of
    the torch.ao models (:func:`simulate_int8`).
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


# -- shared steps ------------------------------------------------------------------------------


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


def _fusable_relus(model: nn.Module) -> dict[str, str]:
    """``layer name -> ReLU name`` for conv/linear layers whose only consumer is a ReLU module called once.

    Found by ``torch.fx`` tracing; identities left by folded batch norms in
    between are skipped. A ReLU module called more than once (torchvision's
    BasicBlock reuses one) is never fused, since it is then replaced by an
    identity.
    """
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    fused = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), (nn.Conv2d, nn.Linear)):
            continue
        cur = node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            target = str(nxt.target) if nxt.op == "call_module" else None
            if target is None or calls[target] != 1:
                break
            if isinstance(modules[target], nn.Identity):
                cur = nxt
                continue
            if type(modules[target]) is nn.ReLU:
                fused[str(node.target)] = target
            break
    return fused


def output_linear(model: nn.Module) -> str | None:
    """Name of the ``nn.Linear`` whose output is the model's output (the classifier), or None.

    Found by ``torch.fx`` tracing: the module called last before the graph's
    output, skipping identities left by folded batch norms. None when the
    output comes from anything else (a function, a ReLU, a tuple, ...).

    Parameters
    ----------
    model : torch.nn.Module
        A float model (batch norms folded or not).

    Returns
    -------
    str or None
    """
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    (out,) = [n for n in graph.nodes if n.op == "output"]
    node = out.args[0]
    while isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity):
        node = node.args[0] if node.args else None
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and type(modules.get(str(node.target))) is nn.Linear:
        return str(node.target)
    return None


_FLOAT_OUT = "float32 (int32 accumulator dequantized, not requantized)"
_REQUANT_OUT = "uint8 requantized like every layer (the model's output is not produced by a Linear layer)"


def _output_layer_record(name: str | None, kernel: str | None) -> dict[str, Any]:
    if name is None:
        return {"name": None, "output": _REQUANT_OUT}
    return {"name": name, "output": _FLOAT_OUT, "kernel": kernel}


def _float_output(model: nn.Module, name: str) -> Int8LinearFloatOut:
    """Replace the converted :class:`Int8StaticLayer` ``name`` of ``model`` by its :class:`Int8LinearFloatOut`."""
    m = Int8LinearFloatOut.from_static_layer(model.get_submodule(name))
    _set_submodule(model, name, m)
    return m


def _static_float_structure(folded: nn.Module, fused: dict[str, str]) -> list[tuple[str, Int8StaticLayer]]:
    """Wrap each conv/linear of a folded model in an :class:`Int8StaticLayer` (in place), fusing ReLUs."""
    wrapped = []
    for name, m in _quantizable(folded):
        if name in fused:
            m = nni.ConvReLU2d(m, nn.ReLU()) if isinstance(m, nn.Conv2d) else nni.LinearReLU(m, nn.ReLU())
        if isinstance(m, (nn.Conv2d, nni.ConvReLU2d)):
            conv = m if isinstance(m, nn.Conv2d) else m[0]
            if conv.padding_mode != "zeros":
                raise ValueError(f"{name}: only zero-padded convolutions can be quantized")
        w = Int8StaticLayer(m)
        _set_submodule(folded, name, w)
        wrapped.append((name, w))
    for relu in fused.values():
        _set_submodule(folded, relu, nn.Identity())
    return wrapped


def _backend_name(engine: str) -> str:
    return f"{TORCH_AO_BACKEND} (eager, {engine})"


def _static_info(engine: str, n_folded: int, fused: dict[str, str], n_batches: int,
                 output_layer: dict[str, Any]) -> dict[str, Any]:
    qmax = activation_qmax(engine)
    tail = ("each layer's output requantized to uint8" if output_layer["name"] is None else
            f"each layer's output requantized to uint8, except the output layer's ({output_layer['name']}: float32)")
    return {
        "mode": "int8_static",
        "backend": _backend_name(engine),
        "engine": engine,
        "weight": {"dtype": "int8", "granularity": "per_output_channel", "scheme": "symmetric",
                   "observer": "PerChannelMinMaxObserver", "range": [-128, 127]},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "scheme": "affine", "observer": "minmax",
                       "range": [0, qmax], "reduce_range": qmax < 255, "clamped_at_run_time": True},
        "accumulation": f"int32 in torch.ao.nn.quantized kernels ({engine}); {tail}",
        "output_layer": output_layer,
        "batchnorm_folded": n_folded,
        "fused_relu": sorted(fused),
        "calibration_batches": n_batches,
        # the CPU path the model was quantized on (torch's vector unit); its int8 arithmetic is the same on every path
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


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


def _finish(model: nn.Module) -> nn.Module:
    model.compbias_input_dtype = torch.float32
    return model.eval()


# -- structure for loading -----------------------------------------------------------------------


def _is_legacy(quantization: dict[str, Any]) -> bool:
    return quantization.get("backend") in (None, SIMULATION_BACKEND)


def quantized_structure(model: nn.Module, mode: str | dict[str, Any]) -> nn.Module:
    """Rebuild the module structure of a quantized model (placeholder values), for loading its state dict.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built float model of the same architecture.
    mode : str or dict
        The ``quantization`` record of the model spec (``{"mode": ...,
        "backend": ..., ...}``), or just its mode. A record without
        ``backend`` (models saved before compbias used torch.ao) or with
        :data:`SIMULATION_BACKEND` gives the simulated modules of the first
        version; a bare mode string means the current torch.ao format. For
        ``int8_static`` the layer named in ``output_layer`` becomes an
        :class:`Int8LinearFloatOut`; a torch.ao record without
        ``output_layer`` (saved before the float-output classifier) keeps a
        requantizing :class:`Int8StaticLayer` there, as it was saved.

    Returns
    -------
    torch.nn.Module
        In eval mode; load the saved state dict into it.
    """
    record = dict(mode) if isinstance(mode, dict) else {"mode": mode, "backend": TORCH_AO_BACKEND}
    level = record.get("mode")
    if level in _HALF:
        return apply_half_precision(model, level)
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization {level!r}; choose one of {', '.join(QUANT_LEVELS)}")
    model, _ = fold_batchnorm(model)
    if _is_legacy(record):
        for name, m in _quantizable(model):
            _set_submodule(model, name, QuantizedConv2d(m, level) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, level))
        return _finish(model)
    if level == "int8_weight":
        for name, m in _quantizable(model):
            _set_submodule(model, name, Int8WeightOnlyConv2d(m) if isinstance(m, nn.Conv2d) else Int8WeightOnlyLinear(m))
        return _finish(model)
    engine = record.get("engine") or select_engine()
    if engine not in torch.backends.quantized.supported_engines:
        fallback = select_engine()
        warnings.warn(f"the model was quantized for the {engine!r} engine, which this torch build lacks; "
                      f"using {fallback!r} (logits may differ by an output quantum)", RuntimeWarning, stacklevel=2)
        engine = fallback
    fused = _fusable_relus(model)
    if record.get("fused_relu") is not None:
        unknown = [n for n in record["fused_relu"] if n not in fused]
        if unknown:
            raise ValueError(f"the quantization record fuses a ReLU into {unknown}, which this architecture does not allow")
        fused = {n: fused[n] for n in record["fused_relu"]}
    wrapped = _static_float_structure(model, fused)
    with _use_engine(engine):
        for _, w in wrapped:
            m = w.layer
            if isinstance(m, (nn.Conv2d, nni.ConvReLU2d)):
                conv = m if isinstance(m, nn.Conv2d) else m[0]
                cls = Int8Conv2d if isinstance(m, nn.Conv2d) else Int8ConvReLU2d
                w.layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, True, "zeros")
            else:
                lin = m if isinstance(m, nn.Linear) else m[0]
                cls = Int8Linear if isinstance(m, nn.Linear) else Int8LinearReLU
                w.layer = cls(lin.in_features, lin.out_features)
            w.layer.compbias_engine = engine
            w.quant = nnq.Quantize(1.0, 0, torch.quint8)
            w.dequant = nnq.DeQuantize()
    # models saved before the float-output classifier have no "output_layer": every layer requantizes, as they did
    out_name = (record.get("output_layer") or {}).get("name")
    if out_name is not None:
        wrappers = dict(wrapped)
        if out_name not in wrappers or not isinstance(wrappers[out_name].layer, Int8Linear):
            raise ValueError(f"the quantization record's output layer {out_name!r} is not an unfused linear layer of this "
                             "architecture; the saved spec does not match the model")
        lin = wrappers[out_name].layer
        _set_submodule(model, out_name, Int8LinearFloatOut(lin.in_features, lin.out_features, engine))
    model.compbias_engine = engine
    return _finish(model)


def apply_half_precision(model: nn.Module, level: str) -> nn.Module:
    """Cast a model to float16 / bfloat16; inputs are cast on entry, logits returned as float32."""
    dtype = _HALF[level]
    model = copy.deepcopy(model).eval().to(dtype)
    model.compbias_input_dtype = dtype
    model.register_forward_pre_hook(lambda _m, args: tuple(a.to(dtype) if torch.is_tensor(a) else a for a in args))
    model.register_forward_hook(lambda _m, _args, out: out.float())
    return model


def _calibrate(model: nn.Module, calibration: Iterable[torch.Tensor] | None) -> int:
    if calibration is None:
        raise ValueError("int8_static needs calibration batches of training inputs (calibration=...)")
    n = 0
    for xb in calibration:
        model(torch.as_tensor(xb).float().cpu())
        n += 1
    if n == 0:
        raise ValueError("int8_static calibration got no batches; pass at least one batch of training inputs")
    return n


# -- entry points ----------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    level: str,
    *,
    calibration: Iterable[torch.Tensor] | None = None,
    engine: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training quantization of a trained float model.

    Parameters
    ----------
    model : torch.nn.Module
        Trained float model (left unchanged; a quantized copy is returned).
    level : {'fp16', 'bf16', 'int8_weight', 'int8_static'}
    calibration : iterable of torch.Tensor, optional
        Input batches of training data for ``int8_static`` (required there):
        the observers' min/max over them set each layer's input and output
        scales.
    engine : {'x86', 'fbgemm', 'qnnpack'}, optional
        The torch quantized engine for ``int8_static``; default the first of
        :data:`ENGINES` this torch build supports.

    Returns
    -------
    model : torch.nn.Module
        The quantized model, in eval mode on the CPU (the int8 kernels are
        CPU kernels).
    info : dict
        ``quantization`` (the record stored in the model spec: mode, backend,
        engine, weight and activation schemes, the output layer and what it
        outputs, folded batch norms, fused ReLUs) and ``n_layers``.

    Notes
    -----
    In ``int8_static`` the model's output layer (:func:`output_linear`)
    outputs float32 logits from its int32 accumulator
    (:class:`Int8LinearFloatOut`); every other layer requantizes its output.

    Raises
    ------
    ValueError
        For an unknown level, or ``int8_static`` without calibration batches.
    """
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {', '.join(QUANT_LEVELS)}")
    model = copy.deepcopy(model).cpu().eval()
    if level in _HALF:
        q = apply_half_precision(model, level)
        return q, {"quantization": {"mode": level, "backend": f"torch ({str(_HALF[level]).replace('torch.', '')} cast)",
                                    "dtype": str(_HALF[level]).replace("torch.", "")}, "n_layers": 0}
    folded, pairs = fold_batchnorm(model)
    if level == "int8_weight":
        layers = _quantizable(folded)
        for name, m in layers:
            cls = Int8WeightOnlyConv2d if isinstance(m, nn.Conv2d) else Int8WeightOnlyLinear
            _set_submodule(folded, name, cls.from_float(m))
        return _finish(folded), {"quantization": _weight_only_info(len(pairs)), "n_layers": len(layers)}

    if calibration is None:
        raise ValueError("int8_static needs calibration batches of training inputs (calibration=...)")
    engine = select_engine(engine)
    fused = _fusable_relus(folded)
    out_name = output_linear(folded)
    wrapped = _static_float_structure(folded, fused)
    qconfig = _static_qconfig(engine)
    for _, w in wrapped:
        w.qconfig = qconfig
    with _use_engine(engine):
        tq.prepare(folded, inplace=True)
        n_batches = _calibrate(folded, calibration)
        tq.convert(folded, mapping=_convert_mapping(), inplace=True)
    for name, w in wrapped:
        if not isinstance(w.layer, _INT8_STATIC_TYPES) or not isinstance(w.quant, nnq.Quantize):
            raise RuntimeError(f"torch.ao.quantization.convert left {name} unquantized ({type(w.layer).__name__})")
        w.layer.compbias_engine = engine
    kernel = _float_output(folded, out_name).kernel if out_name is not None else None
    folded.compbias_engine = engine
    info = _static_info(engine, len(pairs), fused, n_batches, _output_layer_record(out_name, kernel))
    return _finish(folded), {"quantization": info, "n_layers": len(wrapped)}


@torch.no_grad()
def simulate_int8(model: nn.Module, level: str, *, calibration: Iterable[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """compbias's first int8 implementation: an exact integer simulation, used as an independent check.

    Weights on a symmetric per-channel int8 grid (``s_c = max|w_c| / 127``);
    for ``int8_static`` every conv/linear input quantized to uint8
    (min/max calibration, full 8 bits), the bias rounded onto the int32 grid
    of ``s_x * s_c``, products summed exactly (float64 holds every such
    integer sum) and scaled back to float32 -- outputs are not requantized.
    It uses none of torch.ao, so agreement with :func:`quantize_model`
    checks both.

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
        ``quantization`` (with ``backend`` = :data:`SIMULATION_BACKEND`) and ``n_layers``.
    """
    if level not in ("int8_weight", "int8_static"):
        raise ValueError(f"simulate_int8 covers int8_weight and int8_static, not {level!r}")
    folded, pairs = fold_batchnorm(copy.deepcopy(model).cpu().eval())
    layers = _quantizable(folded)
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
            _calibrate(folded, calibration)
        finally:
            for h in hooks:
                h.remove()
    for name, m in layers:
        q = QuantizedConv2d(m, level) if isinstance(m, nn.Conv2d) else QuantizedLinear(m, level)
        q.set_weight(m.weight, m.bias)
        if level == "int8_static":
            if name not in ranges:
                raise RuntimeError(f"layer {name} saw no calibration input")
            q.set_input_range(*ranges[name])
        _set_submodule(folded, name, q)
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
    return _finish(folded), info


_QUANT_TYPES = (_QuantizedLayer, _WeightOnly, Int8LinearFloatOut, *_INT8_STATIC_TYPES)


def is_quantized(model: nn.Module) -> bool:
    """True for a model returned by :func:`quantize_model` or :func:`simulate_int8` (or loaded from one)."""
    return any(isinstance(m, _QUANT_TYPES) for m in model.modules()) or (
        hasattr(model, "compbias_input_dtype") and model.compbias_input_dtype != torch.float32)

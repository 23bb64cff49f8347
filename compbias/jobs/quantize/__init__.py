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
float64) are kept: models saved with them still load (format 1 of
:mod:`.formats`). The simulator that builds them, ``simulate_int8``, is the
independent check of the torch.ao models and lives with the tests
(``tests/jobs/int8_simulation.py``).

Where each part lives:

=====================  ==========================================================
:mod:`.levels`         the levels; fp16 / bf16 (:func:`apply_half_precision`)
:mod:`.engine`         quantized engines, 7-bit activations, per-channel storage
:mod:`.graph`          BN folding (``fuse_conv_bn_eval``), fusable ReLUs, classifier
:mod:`.static_layers`  ``int8_static``'s int8 modules (plain-tensor state dicts)
:mod:`.static`         ``int8_static``: qconfig, calibration, convert, rebuild
:mod:`.weight_only`    ``int8_weight``
:mod:`.legacy`         the first version's simulated modules (old saves)
:mod:`.formats`        the versioned ``quantization`` record; :func:`quantized_structure`
=====================  ==========================================================
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from .engine import ENGINES, TORCH_AO_BACKEND, activation_qmax, select_engine
from .formats import QUANT_FORMAT_VERSION, QUANT_FORMATS, quantization_format_version, quantized_structure
from .graph import fold_batchnorm, mark_float_input, output_linear
from .legacy import LEGACY_TYPES, SIMULATION_BACKEND, QuantizedConv2d, QuantizedLinear
from .levels import HALF_DTYPES, QUANT_LEVELS, apply_half_precision, half_precision_info
from .static import quantize_static
from .static_layers import FLOAT_OUTPUT_KERNEL, INT8_STATIC_TYPES, Int8Conv2d, Int8ConvReLU2d, Int8Linear, Int8LinearFloatOut
from .static_layers import Int8LinearReLU, Int8StaticLayer
from .weight_only import WEIGHT_ONLY_TYPES, Int8WeightOnlyConv2d, Int8WeightOnlyLinear, quantize_weight_only

__all__ = [
    "QUANT_LEVELS",
    "ENGINES",
    "TORCH_AO_BACKEND",
    "SIMULATION_BACKEND",
    "QUANT_FORMAT_VERSION",
    "QUANT_FORMATS",
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
    "select_engine",
    "activation_qmax",
    "fold_batchnorm",
    "quantized_structure",
    "quantization_format_version",
    "apply_half_precision",
    "is_quantized",
]


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
        Trained float model on any device (left unchanged where it is; the
        quantized copy is made on the CPU, where the int8 kernels and the
        fp16/bf16 casts run).
    level : {'fp16', 'bf16', 'int8_weight', 'int8_static'}
    calibration : iterable of torch.Tensor, optional
        Input batches of training data for ``int8_static`` (required there;
        on any device, they are read on the CPU):
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
        outputs, folded batch norms, fused ReLUs; for the int8 levels its
        ``format_version``, :data:`QUANT_FORMAT_VERSION`) and ``n_layers``.

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
    if level in HALF_DTYPES:
        return apply_half_precision(model, level), {"quantization": half_precision_info(level), "n_layers": 0}
    folded, pairs = fold_batchnorm(model)
    if level == "int8_weight":
        q, info = quantize_weight_only(folded, len(pairs))
    else:
        q, info = quantize_static(folded, len(pairs), calibration, engine)
    info["quantization"]["format_version"] = QUANT_FORMAT_VERSION
    return mark_float_input(q), info


_QUANT_TYPES = (*LEGACY_TYPES, *WEIGHT_ONLY_TYPES, Int8LinearFloatOut, *INT8_STATIC_TYPES)


def is_quantized(model: nn.Module) -> bool:
    """True for a model returned by :func:`quantize_model` or the tests' ``simulate_int8`` (or loaded from one)."""
    return any(isinstance(m, _QUANT_TYPES) for m in model.modules()) or (
        hasattr(model, "compbias_input_dtype") and model.compbias_input_dtype != torch.float32)

"""``int8_static``: building the int8 model with ``torch.ao.quantization`` (eager mode), and rebuilding it to load.

The flow (:func:`quantize_static`): every conv/linear of the batch-norm-folded
model is wrapped in an :class:`~compbias.jobs.quantize.static_layers.Int8StaticLayer`
(a directly following ReLU fused in), prepared with :func:`static_qconfig`,
calibrated on the training batches given, and converted by
``torch.ao.quantization.convert`` with :func:`convert_mapping` (torch's
mapping, with compbias's plain-state int8 modules); then the model's output
layer (:func:`compbias.jobs.quantize.graph.output_linear`) becomes an
:class:`~compbias.jobs.quantize.static_layers.Int8LinearFloatOut`. The
``quantization`` record it returns is what :func:`static_structure` reads back.
See the package docstring of :mod:`compbias.jobs.quantize` and docs/methods.md.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn as nn

from .engine import TORCH_AO_BACKEND, activation_qmax, select_engine, use_engine
from .graph import fusable_relus, output_linear, quantizable_layers, set_submodule
from .static_layers import (
    INT8_STATIC_TYPES,
    Int8Conv2d,
    Int8ConvReLU2d,
    Int8Linear,
    Int8LinearFloatOut,
    Int8LinearReLU,
    Int8StaticLayer,
)

__all__ = ["calibrate", "convert_mapping", "quantize_static", "static_float_structure", "static_qconfig", "static_structure"]

_FLOAT_OUT = "float32 (int32 accumulator dequantized, not requantized)"
_REQUANT_OUT = "uint8 requantized like every layer (the model's output is not produced by a Linear layer)"


def static_qconfig(engine: str) -> tq.QConfig:
    """Per-channel symmetric qint8 weights; per-tensor affine quint8 activations on ``[0, activation_qmax(engine)]``."""
    activation = tq.MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                             quant_min=0, quant_max=activation_qmax(engine))
    weight = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=activation, weight=weight)


def convert_mapping() -> dict:
    """torch's default static-quantization module mapping, converting to compbias's plain-state int8 modules."""
    from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

    mapping = get_default_static_quant_module_mappings()
    mapping.update({nn.Conv2d: Int8Conv2d, nni.ConvReLU2d: Int8ConvReLU2d, nn.Linear: Int8Linear, nni.LinearReLU: Int8LinearReLU})
    return mapping


def static_float_structure(folded: nn.Module, fused: dict[str, str]) -> list[tuple[str, Int8StaticLayer]]:
    """Wrap each conv/linear of a folded model in an :class:`Int8StaticLayer` (in place), fusing ReLUs."""
    wrapped = []
    for name, m in quantizable_layers(folded):
        if name in fused:
            m = nni.ConvReLU2d(m, nn.ReLU()) if isinstance(m, nn.Conv2d) else nni.LinearReLU(m, nn.ReLU())
        if isinstance(m, (nn.Conv2d, nni.ConvReLU2d)):
            conv = m if isinstance(m, nn.Conv2d) else m[0]
            if conv.padding_mode != "zeros":
                raise ValueError(f"{name}: only zero-padded convolutions can be quantized")
        w = Int8StaticLayer(m)
        set_submodule(folded, name, w)
        wrapped.append((name, w))
    for relu in fused.values():
        set_submodule(folded, relu, nn.Identity())
    return wrapped


def _output_layer_record(name: str | None, kernel: str | None) -> dict[str, Any]:
    if name is None:
        return {"name": None, "output": _REQUANT_OUT}
    return {"name": name, "output": _FLOAT_OUT, "kernel": kernel}


def _float_output(model: nn.Module, name: str) -> Int8LinearFloatOut:
    """Replace the converted :class:`Int8StaticLayer` ``name`` of ``model`` by its :class:`Int8LinearFloatOut`."""
    m = Int8LinearFloatOut.from_static_layer(model.get_submodule(name))
    set_submodule(model, name, m)
    return m


def _static_info(engine: str, n_folded: int, fused: dict[str, str], n_batches: int,
                 output_layer: dict[str, Any]) -> dict[str, Any]:
    qmax = activation_qmax(engine)
    tail = ("each layer's output requantized to uint8" if output_layer["name"] is None else
            f"each layer's output requantized to uint8, except the output layer's ({output_layer['name']}: float32)")
    return {
        "mode": "int8_static",
        "backend": f"{TORCH_AO_BACKEND} (eager, {engine})",
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


def calibrate(model: nn.Module, calibration: Iterable[torch.Tensor] | None) -> int:
    """Run the calibration batches through ``model`` (float32, CPU); returns how many there were.

    Raises
    ------
    ValueError
        If ``calibration`` is None or holds no batch.
    """
    if calibration is None:
        raise ValueError("int8_static needs calibration batches of training inputs (calibration=...)")
    n = 0
    for xb in calibration:
        model(torch.as_tensor(xb).float().cpu())
        n += 1
    if n == 0:
        raise ValueError("int8_static calibration got no batches; pass at least one batch of training inputs")
    return n


def quantize_static(folded: nn.Module, n_folded: int, calibration: Iterable[torch.Tensor] | None,
                    engine: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``int8_static`` of a batch-norm-folded float model, in place (see :func:`compbias.jobs.quantize.quantize_model`).

    Returns
    -------
    model : torch.nn.Module
        ``folded``, quantized (not yet in eval mode with its input dtype recorded).
    info : dict
        ``quantization`` (the record) and ``n_layers``.
    """
    if calibration is None:
        raise ValueError("int8_static needs calibration batches of training inputs (calibration=...)")
    engine = select_engine(engine)
    fused = fusable_relus(folded)
    out_name = output_linear(folded)
    wrapped = static_float_structure(folded, fused)
    qconfig = static_qconfig(engine)
    for _, w in wrapped:
        w.qconfig = qconfig
    with use_engine(engine):
        tq.prepare(folded, inplace=True)
        n_batches = calibrate(folded, calibration)
        tq.convert(folded, mapping=convert_mapping(), inplace=True)
    for name, w in wrapped:
        if not isinstance(w.layer, INT8_STATIC_TYPES) or not isinstance(w.quant, nnq.Quantize):
            raise RuntimeError(f"torch.ao.quantization.convert left {name} unquantized ({type(w.layer).__name__})")
        w.layer.compbias_engine = engine
    kernel = _float_output(folded, out_name).kernel if out_name is not None else None
    folded.compbias_engine = engine
    info = _static_info(engine, n_folded, fused, n_batches, _output_layer_record(out_name, kernel))
    return folded, {"quantization": info, "n_layers": len(wrapped)}


def static_structure(model: nn.Module, record: dict[str, Any], *, float_output: bool) -> nn.Module:
    """The module structure of a saved ``int8_static`` model (placeholder values), in place, for loading.

    Parameters
    ----------
    model : torch.nn.Module
        The batch-norm-folded float model of the saved architecture.
    record : dict
        The saved ``quantization`` record: its ``engine`` (else the first
        engine this torch build has; another engine than the recorded one
        gives a ``RuntimeWarning``), ``fused_relu`` and ``output_layer``.
    float_output : bool
        Whether the record's ``output_layer`` names an
        :class:`Int8LinearFloatOut` (saves from before the float-output
        classifier requantize every layer, and have none).

    Raises
    ------
    ValueError
        If the record fuses a ReLU, or names an output layer, that this
        architecture does not have.
    """
    engine = record.get("engine") or select_engine()
    if engine not in torch.backends.quantized.supported_engines:
        fallback = select_engine()
        warnings.warn(f"the model was quantized for the {engine!r} engine, which this torch build lacks; "
                      f"using {fallback!r} (logits may differ by an output quantum)", RuntimeWarning, stacklevel=3)
        engine = fallback
    fused = fusable_relus(model)
    if record.get("fused_relu") is not None:
        unknown = [n for n in record["fused_relu"] if n not in fused]
        if unknown:
            raise ValueError(f"the quantization record fuses a ReLU into {unknown}, which this architecture does not allow")
        fused = {n: fused[n] for n in record["fused_relu"]}
    wrapped = static_float_structure(model, fused)
    with use_engine(engine):
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
    out_name = (record.get("output_layer") or {}).get("name") if float_output else None
    if out_name is not None:
        wrappers = dict(wrapped)
        if out_name not in wrappers or not isinstance(wrappers[out_name].layer, Int8Linear):
            raise ValueError(f"the quantization record's output layer {out_name!r} is not an unfused linear layer of this "
                             "architecture; the saved spec does not match the model")
        lin = wrappers[out_name].layer
        set_submodule(model, out_name, Int8LinearFloatOut(lin.in_features, lin.out_features, engine))
    model.compbias_engine = engine
    return model

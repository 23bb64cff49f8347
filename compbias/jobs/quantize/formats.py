"""Saved quantized models: the versions of the ``quantization`` record, and the structure each one loads into.

A quantized model is saved as plain tensors (``weights.safetensors``) plus
its ``quantization`` record in ``model_spec.json``; the record says which
modules the tensors belong to. Its format version is read from the record
(:func:`quantization_format_version`):

====  ==========================================================================
1     compbias's first version: simulated int8 modules computing in float64
      (:class:`~compbias.jobs.quantize.legacy.QuantizedConv2d`,
      :class:`~compbias.jobs.quantize.legacy.QuantizedLinear`). Records without
      ``backend`` (saved before compbias used torch.ao) or with
      :data:`~compbias.jobs.quantize.legacy.SIMULATION_BACKEND`.
2     ``torch.ao.quantization`` modules, every ``int8_static`` layer requantized:
      torch.ao records without ``output_layer`` (saved before the float-output
      classifier); they load with their requantizing classifier, as they were.
3     ``torch.ao.quantization`` modules; ``int8_static``'s ``output_layer``
      names the :class:`~compbias.jobs.quantize.static_layers.Int8LinearFloatOut`
      classifier. Written by this version as ``"format_version": 3``.
====  ==========================================================================

Records written before the version was stored have none; theirs is inferred
from ``backend`` and ``output_layer`` as above. A version this compbias does
not know (a newer one) is refused with a clear error rather than loaded into
the wrong modules. fp16 / bf16 records need no version (the model is a cast).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .engine import TORCH_AO_BACKEND
from .graph import fold_batchnorm, mark_float_input
from .legacy import SIMULATION_BACKEND, legacy_structure
from .levels import HALF_DTYPES, QUANT_LEVELS, apply_half_precision
from .static import static_structure
from .weight_only import weight_only_structure

__all__ = ["QUANT_FORMATS", "QUANT_FORMAT_VERSION", "quantization_format_version", "quantized_structure"]

#: The format version this compbias writes into int8 ``quantization`` records.
QUANT_FORMAT_VERSION = 3
#: Every format version this compbias reads, and what it holds.
QUANT_FORMATS = {
    1: "simulated int8 modules of compbias's first version (float64 integer simulation)",
    2: "torch.ao.quantization int8 modules, every layer's output requantized",
    3: "torch.ao.quantization int8 modules, int8_static's output layer with float32 output",
}


def quantization_format_version(record: dict[str, Any]) -> int:
    """The format version of a saved int8 ``quantization`` record (see the table above).

    Parameters
    ----------
    record : dict
        The ``quantization`` record of a saved model spec.

    Returns
    -------
    int
        A key of :data:`QUANT_FORMATS`: the record's ``format_version``, or for
        records saved before it was written, 1 (no ``backend``, or
        :data:`~compbias.jobs.quantize.legacy.SIMULATION_BACKEND`), 3 (a
        torch.ao backend and an ``output_layer``) or 2 (a torch.ao backend
        without one).

    Raises
    ------
    ValueError
        If the version is not one of :data:`QUANT_FORMATS` (a model saved by a
        newer compbias), or, without a version, the backend is unknown.
    """
    if "format_version" in record:
        version = record["format_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version not in QUANT_FORMATS:
            raise ValueError(f"unknown quantization format_version {version!r}; this compbias reads versions "
                             f"{', '.join(map(str, QUANT_FORMATS))} (a newer compbias saved this model: load it with that version)")
        return version
    backend = record.get("backend")
    if backend is None or backend == SIMULATION_BACKEND:
        return 1
    if isinstance(backend, str) and backend.startswith(TORCH_AO_BACKEND):
        return 3 if "output_layer" in record else 2
    raise ValueError(f"unknown quantization backend {backend!r} in a record without format_version; this compbias reads "
                     f"records of {TORCH_AO_BACKEND!r} and {SIMULATION_BACKEND!r} (or without backend)")


def quantized_structure(model: nn.Module, mode: str | dict[str, Any]) -> nn.Module:
    """Rebuild the module structure of a quantized model (placeholder values), for loading its state dict.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built float model of the same architecture.
    mode : str or dict
        The ``quantization`` record of the model spec (``{"mode": ...,
        "backend": ..., ...}``), or just its mode. The record's format
        version (:func:`quantization_format_version`) picks the modules: a
        record without ``backend`` (models saved before compbias used
        torch.ao) or with
        :data:`~compbias.jobs.quantize.legacy.SIMULATION_BACKEND` gives the
        simulated modules of the first version; a bare mode string means a
        torch.ao record without ``output_layer``. For ``int8_static`` the
        layer named in ``output_layer`` becomes an
        :class:`~compbias.jobs.quantize.static_layers.Int8LinearFloatOut`; a
        torch.ao record without ``output_layer`` (saved before the
        float-output classifier) keeps a requantizing
        :class:`~compbias.jobs.quantize.static_layers.Int8StaticLayer` there,
        as it was saved.

    Returns
    -------
    torch.nn.Module
        In eval mode; load the saved state dict into it.

    Raises
    ------
    ValueError
        For an unknown level or format version, or a record that does not fit
        the architecture.
    """
    record = dict(mode) if isinstance(mode, dict) else {"mode": mode, "backend": TORCH_AO_BACKEND}
    level = record.get("mode")
    if level in HALF_DTYPES:
        return apply_half_precision(model, level)
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization {level!r}; choose one of {', '.join(QUANT_LEVELS)}")
    version = quantization_format_version(record)
    model, _ = fold_batchnorm(model)
    if version == 1:
        return mark_float_input(legacy_structure(model, level))
    if level == "int8_weight":
        return mark_float_input(weight_only_structure(model))
    if version == 3 and "output_layer" not in record:
        raise ValueError("an int8_static quantization record of format 3 names its output layer ('output_layer'); "
                         "this one has none: the saved spec is corrupt")
    return mark_float_input(static_structure(model, record, float_output=version >= 3))

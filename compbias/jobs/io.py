"""Weights I/O: ``weights.safetensors`` + ``model_spec.json``; nothing is pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .models import build_model
from .quantize import quantized_structure

__all__ = ["save_model", "load_model", "model_spec", "WEIGHTS_FILE", "SPEC_FILE"]

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model_spec.json"
FORMAT_VERSION = 1
_REQUIRED = ("arch", "n_classes", "input_shape", "width")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def model_spec(model: nn.Module, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec :func:`save_model` writes: architecture, compression and quantization records, plus ``spec``."""
    base = getattr(model, "compbias_spec", None)
    if base is None:
        raise ValueError("model has no compbias_spec; build it with compbias.jobs.build_model")
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, **base,
                           "compression": getattr(model, "compbias_compression", None),
                           "quantization": getattr(model, "compbias_quantization", None)}
    out.update(dict(spec or {}))
    return _jsonable(out)


def save_model(model: nn.Module, spec: Mapping[str, Any] | None, directory: str | os.PathLike) -> Path:
    """Write a model as ``weights.safetensors`` and ``model_spec.json``.

    Parameters
    ----------
    model : torch.nn.Module
        Float, pruned or quantized model from compbias.jobs.
    spec : dict, optional
        Extra JSON-serialisable entries for ``model_spec.json`` (e.g.
        ``class_names``, ``seed``, the study name). ``arch``, ``n_classes``,
        ``input_shape``, ``width``, ``compression`` and ``quantization`` are
        taken from the model.
    directory : path
        Created if missing.

    Returns
    -------
    pathlib.Path
        The directory.
    """
    full = model_spec(model, spec)
    for key in _REQUIRED:
        if key in dict(spec or {}) and _jsonable(dict(spec)[key]) != _jsonable(getattr(model, "compbias_spec")[key]):
            raise ValueError(f"spec[{key!r}] = {dict(spec)[key]!r} contradicts the model ({model.compbias_spec[key]!r})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "compbias_format_version": str(FORMAT_VERSION)})
    (directory / SPEC_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
    return directory


def load_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (quantized ones included).

    Parameters
    ----------
    directory : path
        Holds ``weights.safetensors`` and ``model_spec.json``.
    device : str
        Where to put the model (quantized models stay on the CPU).

    Notes
    -----
    int8 models are rebuilt from the spec's ``quantization`` record: on
    ``torch.ao.quantization`` modules (the weights re-packed for the
    recorded engine), or, when the record has no ``backend`` (models saved
    before compbias used torch.ao), on the first version's simulated int8
    modules. An ``int8_static`` record's ``output_layer`` names the layer
    rebuilt as a float-output int8 classifier; torch.ao records without it
    (saved before that change) get the requantizing classifier they were
    saved with. Either way the logits are bit-identical to the saved model's.

    Returns
    -------
    torch.nn.Module
        In eval mode, with the same ``compbias_*`` records it was saved with.

    Raises
    ------
    FileNotFoundError
        If ``model_spec.json`` or ``weights.safetensors`` is missing.
    ValueError
        If either file is corrupt, or the weights do not match the spec; the
        message names the file.
    """
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        spec = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{spec_path} is not valid JSON ({exc}); the saved model is corrupt: save or log it again") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_path} does not hold a JSON object; the saved model is corrupt: save or log it again")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"{spec_path} lacks {missing}")
    if int(spec.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{spec_path} has format_version {spec['format_version']}; this compbias reads up to {FORMAT_VERSION}")
    model = build_model(spec["arch"], spec["n_classes"], spec["input_shape"], spec["width"])
    quant = spec.get("quantization")
    if quant:
        if not isinstance(quant, dict) or "mode" not in quant:
            raise ValueError(f"{spec_path}: 'quantization' must be an object with a 'mode'; the saved model is corrupt")
        model = quantized_structure(model, quant)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own SafetensorError (or OSError) on a damaged file
        raise ValueError(
            f"{weights_path} is not a valid safetensors file ({type(exc).__name__}: {exc}); the weights are corrupt or "
            "truncated: save or log the model again (re-running the study remakes a model whose version is deleted)"
        ) from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights_path} does not match the {spec['arch']} described by {SPEC_FILE}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if not quant:
        model.to(device)
    model.compbias_spec = {k: spec[k] for k in _REQUIRED}
    model.compbias_compression = spec.get("compression")
    model.compbias_quantization = quant
    model.compbias_saved_spec = spec
    return model.eval()

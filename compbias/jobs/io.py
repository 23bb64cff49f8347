"""Weights I/O: ``weights.safetensors`` + ``model_spec.json``; nothing is pickled.

A model is rebuilt from its spec (a built-in ``arch`` or the import path of
an ``nn.Module`` factory with its ``kwargs``) and the safetensors weights. The
spec is also written into the safetensors header (``compbias_model_spec``), so
``weights.safetensors`` alone is enough for :func:`load_weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .models import build_model, reshape_to_state
from .quantize import quantized_structure

__all__ = ["save_model", "load_model", "load_weights", "load_state_file", "model_spec", "WEIGHTS_FILE", "SPEC_FILE",
           "SPEC_METADATA_KEY"]

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model_spec.json"
FORMAT_VERSION = 1
_REQUIRED = ("arch", "n_classes", "input_shape", "width")
_OPTIONAL = ("kwargs", "blocks")  # a factory model's keyword arguments and block names
#: The safetensors header entry holding the model spec (JSON), so that the weights file alone rebuilds the model.
SPEC_METADATA_KEY = "compbias_model_spec"
#: compression methods whose saved tensors have other shapes than the freshly built model's (channels removed)
_RESHAPING_METHODS = ("torch_pruning",)


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
        Float, pruned or quantized model from compbias.jobs, on any device
        (its tensors are copied to the CPU to be written; the model is left
        where it is).
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
    metadata = {"format": "pt", "compbias_format_version": str(FORMAT_VERSION)}
    quant = getattr(model, "compbias_quantization", None)
    if isinstance(quant, dict) and quant.get("mode") == "torchao":
        from .torchao_quant import flatten_state

        state, extra = flatten_state(model.state_dict())
        metadata.update(extra)
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata[SPEC_METADATA_KEY] = json.dumps(full, sort_keys=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata=metadata)
    (directory / SPEC_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
    return directory


def load_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (quantized ones included).

    Parameters
    ----------
    directory : path
        Holds ``weights.safetensors`` and ``model_spec.json``.
    device : str or torch.device
        Where to put a float or pruned model (default the CPU). Quantized
        models (int8, fp16/bf16, torchao) are rebuilt on the CPU whatever
        ``device`` says, as :func:`compbias.jobs.quantize_model` makes them.
        On the saving device the logits are bit-identical to the saved
        model's; across devices they agree within a tolerance
        (docs/performance.md, "Across devices").

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
    return _rebuild(spec, weights_path, device=device, described_by=SPEC_FILE)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError (or OSError) on a damaged file
        raise ValueError(
            f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc}); the weights are corrupt or "
            "truncated: save or log the model again (re-running the study remakes a model whose version is deleted)"
        ) from None
    return state, metadata


def _rebuild(spec: dict[str, Any], weights_path: Path, *, device: str | torch.device, described_by: str) -> nn.Module:
    extra = {k: spec[k] for k in _OPTIONAL if spec.get(k) is not None}
    model = build_model(spec["arch"], spec["n_classes"], spec["input_shape"], spec["width"], **extra)
    state, metadata = _read_safetensors(weights_path)
    compression = spec.get("compression") or {}
    if isinstance(compression, dict) and (compression.get("method") in _RESHAPING_METHODS or compression.get("reshaped")):
        reshape_to_state(model, state)
    quant = spec.get("quantization")
    if quant:
        if not isinstance(quant, dict) or "mode" not in quant:
            raise ValueError(f"{described_by}: 'quantization' must be an object with a 'mode'; the saved model is corrupt")
        if quant.get("mode") == "torchao":
            from .torchao_quant import torchao_structure, unflatten_state

            model = torchao_structure(model, quant)
            state = unflatten_state(state, metadata)
            result = model.load_state_dict(state, strict=False, assign=True)
        else:
            model = quantized_structure(model, quant)
            result = model.load_state_dict(state, strict=False)
    else:
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{weights_path} does not match the {spec['arch']} described by {described_by}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights_path} does not match the {spec['arch']} described by {described_by}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if not quant:
        model.to(device)
    model.compbias_spec = {**{k: spec[k] for k in _REQUIRED}, **extra}
    model.compbias_compression = spec.get("compression")
    model.compbias_quantization = quant
    model.compbias_saved_spec = spec
    return model.eval()


def load_weights(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from its factory reference and safetensors weights; nothing is unpickled.

    Parameters
    ----------
    path : path
        A directory written by :func:`save_model` (or an MLflow model's
        ``artifacts/model`` folder holding one), or a ``weights.safetensors``
        file written by it (its header carries the spec: the architecture or
        factory import path with its kwargs, compression and quantization).
    device : str or torch.device
        As in :func:`load_model`.

    Returns
    -------
    torch.nn.Module
        In eval mode, as :func:`load_model` returns it.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing path, a file without a compbias spec (weights saved outside
        compbias: build the model with :func:`compbias.jobs.build_model` and
        use :func:`load_state_file`), or weights that do not fit the spec.
    """
    p = Path(path)
    if p.is_dir():
        if (p / SPEC_FILE).is_file():
            return load_model(p, device=device)
        found = sorted(p.rglob(SPEC_FILE))
        if len(found) == 1 and (found[0].parent / WEIGHTS_FILE).is_file():
            return load_model(found[0].parent, device=device)
        raise FileNotFoundError(f"{p} holds no {SPEC_FILE} with {WEIGHTS_FILE} (found {len(found)}); give a directory written by save_model")
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; give a saved model directory or its {WEIGHTS_FILE}")
    _, metadata = _read_safetensors(p)
    text = metadata.get(SPEC_METADATA_KEY)
    if text is None:
        if (p.parent / SPEC_FILE).is_file():
            return load_model(p.parent, device=device)
        raise ValueError(
            f"{p} carries no compbias model spec in its header (key {SPEC_METADATA_KEY!r}): it was not written by "
            "compbias.jobs.save_model. Build the module (compbias.jobs.build_model with the factory import path and "
            "kwargs) and load it with compbias.jobs.load_state_file"
        )
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: the {SPEC_METADATA_KEY!r} header entry is not valid JSON ({exc})") from None
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"{p}: the model spec in its header lacks {missing}")
    return _rebuild(spec, p, device=device, described_by=f"the spec in {p.name}'s header")


def load_state_file(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict from a safetensors file into ``model``, checking every key and shape first.

    Used for a study baseline given as weights (``baseline: {weights: ...}``):
    the file may come from anywhere (the user's own training script,
    ``safetensors.torch.save_file(model.state_dict(), path)``) but must fit
    the module the study's ``model:`` builds exactly. The model may be on
    any device: the values are copied into its tensors where they are.

    Raises
    ------
    ValueError
        A pickled file (``.pt``/``.pth``/``.bin``/``.ckpt``: never unpickled),
        an unreadable file, or a state dict whose keys or shapes differ from
        the model's; the message lists the differences.
    """
    p = Path(path)
    if p.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"):
        raise ValueError(
            f"{p} looks like a pickled torch file; compbias does not unpickle weights (it would run code). Convert it "
            "once: safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        )
    if not p.is_file():
        raise FileNotFoundError(f"baseline weights {p} not found")
    state, _ = _read_safetensors(p)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        arch = (getattr(model, "compbias_spec", None) or {}).get("arch", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''} ({len(shapes)})")
        raise ValueError(
            f"baseline weights {p} do not fit the model {arch!r} of the study: {'; '.join(parts)}. "
            "Check model (factory and kwargs, e.g. num_classes) against the architecture the weights were trained with"
        )
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()})
    return model

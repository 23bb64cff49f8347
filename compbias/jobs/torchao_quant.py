"""Post-training quantization through torchao (``method: torchao``).

torchao's ``quantize_`` swaps the weights of ``nn.Linear`` layers for its
quantized tensor subclasses; convolutions are left in float (torchao's int8
tensors implement no ``aten.convolution``: asking for them raises
``NotImplementedError: Int8Tensor dispatch: attempting to run unimplemented
operator/function: func=aten.convolution``). Levels are torchao configs:

=====================  ===============================================  ===============================
level                  torchao config                                   on this CPU (torchao 0.18)
=====================  ===============================================  ===============================
int8_weight_only       ``Int8WeightOnlyConfig()``                       works
int8_dynamic           ``Int8DynamicActivationInt8WeightConfig()``      works
float8_weight_only     ``Float8WeightOnlyConfig()``                     works
int4_weight_only       ``Int4WeightOnlyConfig()``                       fails: ``ImportError: Requires mslk >= 1.0.0``
float8_dynamic         ``Float8DynamicActivationFloat8WeightConfig()``  fails: ``AssertionError: Float8 dynamic quantization
                                                                        requires CUDA compute capability ≥8.9 or MI300+ or XPU``
=====================  ===============================================  ===============================

A config that fails raises :class:`TorchaoUnavailable` naming torchao's own
error; one that quantizes no layer (e.g. ``int4_weight_only`` on layers
narrower than its group size) raises too, rather than silently returning the
float model. The quantized weights are saved with torchao's safetensors
helpers (the subclass flattened into plain tensors plus JSON attributes) and
rebuilt by applying the same config to a freshly built model: nothing is
pickled.

Everything here runs on the CPU, whatever device the baseline is on: the
quantized model is a CPU copy (the table above is what runs on a CPU; the
latency is measured there, and a saved model is rebuilt there by
:func:`compbias.jobs.load_model`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["TORCHAO_LEVELS", "TorchaoUnavailable", "torchao_quantize", "torchao_structure", "flatten_state", "unflatten_state"]

from .vocabulary import TORCHAO_LEVELS

_CONFIGS: dict[str, str] = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
    "float8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
}


class TorchaoUnavailable(RuntimeError):
    """A torchao config that cannot run here (torchao missing, or the config fails on this machine)."""


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            import torchao.quantization as q
    except ImportError as exc:
        raise TorchaoUnavailable(f"method torchao needs the torchao package ({exc}); pip install torchao") from None
    return torchao, q


def _config(level: str):
    if level not in _CONFIGS:
        raise ValueError(f"torchao level must be one of {', '.join(TORCHAO_LEVELS)}, got {level!r}")
    _, q = _torchao()
    return getattr(q, _CONFIGS[level])()


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _quantized_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and type(m.weight).__name__ not in ("Parameter", "Tensor")]


def torchao_structure(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Apply the recorded torchao config to a freshly built float model (for loading saved weights into it).

    The model is moved to the CPU first (in place), where :func:`torchao_quantize` made the saved one.
    """
    level = record.get("config")
    _, q = _torchao()
    model.cpu().eval()
    q.quantize_(model, _config(str(level)), filter_fn=_is_linear)
    return model


def torchao_quantize(baseline: nn.Module, level: str, *, check: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a copy of ``baseline``'s linear layers with a torchao config, on the CPU.

    Parameters
    ----------
    baseline : torch.nn.Module
        On any device; left unchanged where it is. The copy is quantized on the CPU.
    level : str
        One of :data:`TORCHAO_LEVELS`.
    check : callable, optional
        Called with the quantized CPU model (e.g. one forward pass on a CPU
        batch); an exception there is reported as the config failing here.

    Returns
    -------
    model : torch.nn.Module
        On the CPU, in eval mode, with ``compbias_quantization = {"mode": "torchao", "config": level, ...}``.
    info : dict
        ``quantization`` (that record), ``quantized_layers`` (count).

    Raises
    ------
    TorchaoUnavailable
        When torchao raises for this config here (the message names torchao's
        error), or when it quantized no layer.
    """
    torchao, q = _torchao()
    config = _config(level)
    model = copy.deepcopy(baseline).cpu().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_(model, config, filter_fn=_is_linear)
            if check is not None:
                with torch.no_grad():
                    check(model)
    except Exception as exc:
        raise TorchaoUnavailable(
            f"torchao {torchao.__version__} config {_CONFIGS[level]} (level {level}) fails on this machine: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. On a CPU use int8_weight_only, "
            "int8_dynamic or float8_weight_only (docs/methods.md, 'torchao')"
        ) from None
    layers = _quantized_layers(model)
    if not layers:
        raise TorchaoUnavailable(
            f"torchao {torchao.__version__} config {_CONFIGS[level]} (level {level}) quantized no layer of this model "
            "(torchao quantizes nn.Linear layers only, and skips those whose shape the config does not support); "
            "use int8_weight_only or int8_dynamic"
        )
    record = {"mode": "torchao", "config": level, "torchao_config": _CONFIGS[level], "torchao_version": torchao.__version__,
              "layers": layers}
    model.compbias_quantization = record
    return model, {"quantization": record, "quantized_layers": len(layers)}


def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A torchao model's state dict as plain tensors plus safetensors metadata (torchao's own format)."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(dict(state))
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {str(k): str(v) for k, v in metadata.items()}


def unflatten_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`flatten_state` (torchao rebuilds only its allow-listed tensor subclasses)."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    if "tensor_names" not in metadata:
        raise ValueError("the weights were saved as a torchao model but carry no torchao metadata ('tensor_names'); save it again")
    state, leftover = unflatten_tensor_state_dict(dict(tensors), dict(metadata))
    state.update(leftover)
    return state

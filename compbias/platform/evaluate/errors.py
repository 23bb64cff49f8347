"""Errors of an evaluation, the safe alternatives a refusal names, and the evaluation's logger."""

from __future__ import annotations

import logging

__all__ = ["EvaluationError", "PickleRefused", "SAFE_ALTERNATIVES", "first_line", "log"]

#: The logger of every evaluation module.
log = logging.getLogger("compbias.evaluate")

SAFE_ALTERNATIVES = (
    "log the model without pickle: a state dict (mlflow.pytorch.log_state_dict or a .safetensors file) "
    "with a factory named in the evaluation spec (state_dict.factory), an ONNX model (mlflow.onnx.log_model), "
    "a torch.export program (mlflow.pytorch.log_model(..., serialization_format='pt2')), or log the "
    "predictions only (compbias register / compbias.log_member)"
)


class EvaluationError(ValueError):
    """A version cannot be evaluated, or the spec is invalid; the message says what to do."""


class PickleRefused(EvaluationError):
    """Loading the model would unpickle data or run code stored with it, and the caller did not opt in."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), at most 300 characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

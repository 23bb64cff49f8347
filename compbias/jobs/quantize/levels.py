"""The quantization levels, and the two that are plain casts: fp16 and bf16."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..vocabulary import INT8_LEVELS, QUANT_LEVELS

__all__ = ["HALF_DTYPES", "INT8_LEVELS", "QUANT_LEVELS", "apply_half_precision", "half_precision_info"]

#: The levels that are a cast of the whole model, and their dtypes.
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def apply_half_precision(model: nn.Module, level: str) -> nn.Module:
    """Cast a model to float16 / bfloat16; inputs are cast on entry, logits returned as float32."""
    dtype = HALF_DTYPES[level]
    model = copy.deepcopy(model).eval().to(dtype)
    model.compbias_input_dtype = dtype
    model.register_forward_pre_hook(lambda _m, args: tuple(a.to(dtype) if torch.is_tensor(a) else a for a in args))
    model.register_forward_hook(lambda _m, _args, out: out.float())
    return model


def half_precision_info(level: str) -> dict[str, Any]:
    """The ``quantization`` record of an fp16 / bf16 model."""
    name = str(HALF_DTYPES[level]).replace("torch.", "")
    return {"mode": level, "backend": f"torch ({name} cast)", "dtype": name}

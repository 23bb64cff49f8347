"""The jobs layer's vocabularies and defaults, in one torch-free module.

Every name a study file may use (dataset kinds, architectures, methods,
schedules, levels, mitigations, method options) and every training default is
defined here once. The jobs modules use these constants in their checks and
signatures; :mod:`compbias.platform.config` builds the study file's schema from
them without importing torch (``import compbias.jobs.vocabulary`` does not
import torch: the package's ``__init__`` loads its torch modules lazily).
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = [
    "ARCHS", "BUILTIN_METHODS", "BYO_METHODS", "DATASET_KINDS", "FINETUNE_DEFAULTS", "INT8_LEVELS",
    "METHODS", "METHOD_OPTIONS", "MITIGATIONS", "PRUNING_METHODS", "QUANT_LEVELS", "SCHEDULES",
    "TORCHAO_LEVELS", "TORCH_PRUNE_STYLES", "TORCH_PRUNING_IMPORTANCES", "TRAIN_DEFAULTS", "check_level",
]

#: Dataset kinds :func:`compbias.jobs.load_dataset` reads.
DATASET_KINDS = ("digits", "imagefolder", "celeba", "cifar10", "cifar100")
#: Built-in architectures of :func:`compbias.jobs.build_model` (a factory import path is the alternative).
ARCHS = ("smallcnn", "resnet20", "resnet32", "resnet18")

#: Magnitude pruning of single weights, and of whole filters/neurons.
PRUNING_METHODS = ("magnitude", "structured")
#: compbias's own methods.
BUILTIN_METHODS = PRUNING_METHODS + ("quantize",)
#: Bring-your-own compression (compbias.jobs.byo): the user's function, Torch-Pruning, torch.nn.utils.prune, torchao.
BYO_METHODS = ("custom", "torch_pruning", "torch_prune", "torchao")
#: Every ``method:`` a compression entry may name.
METHODS = BUILTIN_METHODS + BYO_METHODS
#: When pruning happens: at once then fine-tune, gradually while fine-tuning, or while training from scratch.
SCHEDULES = ("oneshot", "gradual", "scratch")
#: Levels of ``method: quantize``.
QUANT_LEVELS = ("fp16", "bf16", "int8_weight", "int8_static")
#: The int8 levels (weights on an int8 grid).
INT8_LEVELS = ("int8_weight", "int8_static")
#: Levels of ``method: torchao`` (torchao configs; some need a GPU or extra packages).
TORCHAO_LEVELS = ("int8_weight_only", "int8_dynamic", "float8_weight_only", "int4_weight_only", "float8_dynamic")
#: Fine-tuning mitigations: distillation from the baseline, or the performance-weighted loss.
MITIGATIONS = ("kd", "at", "pkt", "at_kd", "pkt_kd", "pw")

#: Importance criteria of ``torch_pruning``.
TORCH_PRUNING_IMPORTANCES = ("l1", "l2", "random")
#: Styles of ``torch_prune`` (``torch.nn.utils.prune``).
TORCH_PRUNE_STYLES = ("global_unstructured", "l1_unstructured", "random_unstructured", "ln_structured")
#: The ``options:`` each method accepts, with what each option takes: a tuple of
#: allowed values, or a type (bool; int meaning a positive integer).
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "custom": {},  # the function gets (model, bundle, level, seed) and no options
    "torch_pruning": {"importance": TORCH_PRUNING_IMPORTANCES, "global_pruning": bool, "round_to": int},
    "torch_prune": {"style": TORCH_PRUNE_STYLES, "n": int},
    "torchao": {},
}

#: Baseline training (SGD with Nesterov momentum): :func:`compbias.jobs.train_model` and a study's ``train:``.
TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
#: Fine-tuning after pruning (:func:`compbias.jobs.compress_model`): schedule, epochs and learning rate.
FINETUNE_DEFAULTS = {"schedule": "gradual", "epochs": 3, "lr": 0.01, "calibration_size": 512}


#: What each method's levels name: a fraction in (0, 1) (what it measures), or a tuple of allowed names.
#: ``custom`` levels are anything the user's function reads (a number or a non-empty name).
_LEVEL_FRACTIONS = {"magnitude": "sparsity", "structured": "sparsity", "torch_pruning": "channel pruning ratio",
                    "torch_prune": "sparsity"}
_LEVEL_NAMES = {"quantize": ("quantization level", QUANT_LEVELS), "torchao": ("torchao level", TORCHAO_LEVELS)}


def check_level(method: str, level: Any) -> float | str:
    """The one rule for a compression level, used by the study file and by :func:`compbias.jobs.compress_model`.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    level : float or str
        A fraction in (0, 1) for the pruning methods (``magnitude``,
        ``structured``, ``torch_pruning``, ``torch_prune``); a name of
        :data:`QUANT_LEVELS` for ``quantize`` and of :data:`TORCHAO_LEVELS` for
        ``torchao``; a number or a non-empty name for ``custom``.

    Returns
    -------
    float or str
        The level as the method uses it (fractions as floats).

    Raises
    ------
    ValueError
        Saying what the level is not and what the method's levels are.

    Examples
    --------
    >>> check_level("magnitude", 0.9)
    0.9
    >>> check_level("quantize", "int4")
    Traceback (most recent call last):
    ...
    ValueError: 'int4' is not a quantization level; a quantize level is one of fp16, bf16, int8_weight, int8_static
    """
    if method in _LEVEL_FRACTIONS:
        what = _LEVEL_FRACTIONS[method]
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
            example = 0.9 if what == "sparsity" else 0.5
            raise ValueError(f"{level!r} is not a {what} in (0, 1); each {method} level is a fraction in (0, 1), "
                             f"> 0 and < 1, such as {example}")
        return float(level)
    if method in _LEVEL_NAMES:
        what, names = _LEVEL_NAMES[method]
        if level not in names:
            raise ValueError(f"{level!r} is not a {what}; a {method} level is one of {', '.join(names)}")
        return str(level)
    if method == "custom":
        if isinstance(level, bool) or not isinstance(level, (numbers.Real, str)) or level == "":
            raise ValueError(f"{level!r} is not a custom level; custom levels are numbers or names, passed to the function as written")
        return level
    raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")

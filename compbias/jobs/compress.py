"""Compress a trained baseline with a named method at one level.

=============  ============================================  =====================================
method         levels                                        schedules / mitigations
=============  ============================================  =====================================
magnitude      sparsity in (0, 1) (global, unstructured)     oneshot | gradual | scratch; any mitigation
structured     fraction of filters per conv in (0, 1) (L1)   oneshot | gradual | scratch; any mitigation
quantize       fp16 | bf16 | int8_weight | int8_static       none
custom         anything, passed to the user's function       none (the function does what it does)
torch_pruning  channel ratio in (0, 1) (Torch-Pruning)       finetune_epochs; any mitigation
torch_prune    sparsity in (0, 1) (torch.nn.utils.prune)     finetune_epochs; any mitigation
torchao        int8_weight_only | int8_dynamic | ...         none
=============  ============================================  =====================================

The last four (bring your own, :mod:`compbias.jobs.byo` and
:mod:`compbias.jobs.torchao_quant`) prune or quantize at once (no schedule)
and record the footprint before/after: ``params``, ``size_bytes`` and a
measured CPU ``latency_ms`` with their ``baseline_`` twins.

``gradual`` starts from the baseline's weights and prunes along Zhu & Gupta's
cubic schedule during the first 75% of ``finetune_epochs``, then fine-tunes
with the masks fixed. ``oneshot`` prunes the baseline at once, then fine-tunes
``finetune_epochs`` (0 for none) with the masks fixed. ``scratch`` trains a
fresh model for ``epochs`` while pruning it (schedule from 10% to 75% of the
steps), as Hooker et al. did. A mitigation (``kd``, ``at``, ``pkt``,
``at_kd``, ``pkt_kd``, ``pw``) replaces the fine-tuning objective, with the
uncompressed baseline as teacher.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .data import DatasetBundle
from .distill import MITIGATIONS, make_objective
from .models import build_model
from .prune import Pruner, PruneSchedule, measure_sparsity, model_size_bytes
from .quantize import quantize_model
from .train import fit, resolve_device

__all__ = ["METHODS", "SCHEDULES", "compress_model", "method_name"]

from .vocabulary import BUILTIN_METHODS, FINETUNE_DEFAULTS, METHOD_OPTIONS, METHODS, SCHEDULES, TRAIN_DEFAULTS, check_level


def method_name(method: str, mitigation: str | None = None) -> str:
    """The name used in tags and metric keys: ``method`` or ``method+mitigation``."""
    return method if mitigation is None else f"{method}+{mitigation}"


def compress_model(
    baseline: nn.Module,
    bundle: DatasetBundle,
    method: str,
    level: float | str,
    *,
    schedule: str = FINETUNE_DEFAULTS["schedule"],
    mitigation: str | None = None,
    finetune_epochs: int = FINETUNE_DEFAULTS["epochs"],
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = FINETUNE_DEFAULTS["lr"],
    momentum: float = TRAIN_DEFAULTS["momentum"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
    calibration_size: int = FINETUNE_DEFAULTS["calibration_size"],
    mitigation_options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    function: str | Callable | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``baseline`` (left unchanged) and return the compressed model and an info dict.

    Parameters
    ----------
    baseline : torch.nn.Module
        Trained model from :func:`compbias.jobs.build_model` /
        :func:`compbias.jobs.train_model` or :func:`compbias.jobs.load_model`,
        on any device (left unchanged where it is).
    bundle : DatasetBundle
        Its training split is used for fine-tuning and calibration.
    method : {'magnitude', 'structured', 'quantize', 'custom', 'torch_pruning', 'torch_prune', 'torchao'}
    level : float or str
        Sparsity for pruning; ``fp16``, ``bf16``, ``int8_weight`` or
        ``int8_static`` for ``quantize``; a channel ratio for
        ``torch_pruning``, a sparsity for ``torch_prune``, a torchao config
        name for ``torchao``, a number or a name for ``custom``
        (:func:`compbias.jobs.vocabulary.check_level`, the study file's rule).
    schedule : {'oneshot', 'gradual', 'scratch'}
        Pruning only (ignored for ``quantize``).
    mitigation : {None, 'kd', 'at', 'pkt', 'at_kd', 'pkt_kd', 'pw'}
        Fine-tuning objective with the baseline as teacher (pruning only).
    finetune_epochs : int
        Fine-tuning epochs after (oneshot) or during (gradual) pruning.
    epochs : int, optional
        Training epochs of the ``scratch`` schedule (required there).
    seed : int
        Seeds fine-tuning shuffles, the scratch initialisation and the
        calibration sample.
    batch_size, lr, momentum, weight_decay : float
        SGD settings of fine-tuning (and of scratch training).
    calibration_size : int
        Training examples used to calibrate ``int8_static``.
    mitigation_options : dict, optional
        E.g. ``{'temperature': 4}`` for KD, ``{'gamma': 5, 'min_weight': 0.75}`` for pw.
    device : str, optional
        Training device of fine-tuning, scratch training and a mitigation's
        teacher (default CUDA when present, else the CPU). Pruning keeps the
        model's device: the baseline's copy is pruned where the baseline is,
        and is returned there when nothing trains it (``finetune_epochs``
        0), on ``device`` when fine-tuned. ``quantize`` and ``torchao`` copy
        the baseline to the CPU and return a CPU model (their kernels are
        CPU kernels); for ``custom``, ``torch_pruning`` and ``torch_prune``
        see :mod:`compbias.jobs.byo`.
    log : callable, optional
        Progress printer.
    function : str or callable, optional
        ``custom`` only: ``'package.module:function'`` called as
        ``function(model, bundle, level, seed) -> model``.
    options : dict, optional
        Method options of ``torch_pruning`` (``importance``,
        ``global_pruning``, ``round_to``) and ``torch_prune`` (``style``, ``n``).

    Returns
    -------
    model : torch.nn.Module
        The compressed model (eval mode), carrying ``compbias_spec`` and a
        ``compbias_compression`` record used by :func:`compbias.jobs.save_model`.
    info : dict
        ``method`` (``method[+mitigation]``), ``level``, ``schedule``,
        ``mitigation``, ``sparsity`` (fraction of exactly-zero weights in
        the pruned layers), ``sparsity_per_layer``, ``size_bytes`` (stored
        size), ``size_bytes_sparse`` (pruning: bitmap + non-zeros),
        ``baseline_size_bytes``, ``history``, ``final_loss`` and the last
        epoch's loss parts, ``quantization`` (quantize), ``seconds``.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    level = check_level(method, level)
    spec = getattr(baseline, "compbias_spec", None)
    if spec is None:
        raise ValueError("baseline has no compbias_spec; build it with compbias.jobs.build_model or load_model")
    if int(spec["n_classes"]) != bundle.n_classes or tuple(spec["input_shape"]) != tuple(bundle.input_shape):
        raise ValueError(
            f"baseline was built for {spec['n_classes']} classes and inputs {tuple(spec['input_shape'])}, "
            f"the dataset has {bundle.n_classes} classes and inputs {tuple(bundle.input_shape)}"
        )
    if getattr(baseline, "compbias_compression", None):
        raise ValueError("baseline is already compressed; compress the uncompressed baseline")
    baseline_size = model_size_bytes(baseline)["size_bytes"]
    info: dict[str, Any] = {
        "method": method_name(method, mitigation), "level": level, "mitigation": mitigation,
        "baseline_size_bytes": baseline_size,
    }
    if method not in BUILTIN_METHODS:
        return _compress_byo(baseline, bundle, method, level, info, started=started, mitigation=mitigation,
                             finetune_epochs=finetune_epochs, seed=seed, device=device, log=log, function=function,
                             options=options, mitigation_options=mitigation_options,
                             train_options=dict(batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay))
    if function is not None or options:
        raise ValueError(f"'function' and 'options' apply to the methods custom, torch_pruning and torch_prune, not to {method!r}")

    if method == "quantize":
        if mitigation is not None:
            raise ValueError("mitigations apply to pruning only, not to quantize")
        calibration = None
        if level == "int8_static":
            n = min(int(calibration_size), len(bundle.train))
            idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(bundle.train), n, replace=False)))
            calibration = [bundle.train.batch(idx[i : i + 128])[0] for i in range(0, n, 128)]
        model, qinfo = quantize_model(baseline, level, calibration=calibration)
        sizes = model_size_bytes(model)
        info.update(schedule=None, sparsity=0.0, **sizes, **qinfo, history=[], final_loss=None)
        model.compbias_compression = {"method": method, "level": level, "schedule": None, "mitigation": None}
        model.compbias_quantization = qinfo["quantization"]
        info["seconds"] = time.perf_counter() - started
        if log is not None:
            log(f"[quantize {level}] size {sizes['size_bytes']} bytes (baseline {baseline_size}) in {info['seconds']:.1f}s")
        return model, info

    kind = method
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pruning schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if mitigation is not None and mitigation not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {mitigation!r}; choose one of {', '.join(MITIGATIONS)} or null")
    device = resolve_device(device)
    teacher = copy.deepcopy(baseline).to(device).eval() if mitigation is not None else None
    objective = make_objective(mitigation, teacher, **dict(mitigation_options or {}))

    if schedule == "scratch":
        if not epochs:
            raise ValueError("the scratch schedule trains a new model: give epochs (the training epochs)")
        model = build_model(spec["arch"], spec["n_classes"], spec["input_shape"], spec["width"], seed=seed)
        run_epochs, window = int(epochs), PruneSchedule(start=0.1, end=0.75)
    elif schedule == "gradual":
        if finetune_epochs < 1:
            raise ValueError("the gradual schedule prunes during fine-tuning: finetune_epochs must be at least 1")
        model = copy.deepcopy(baseline)
        run_epochs, window = int(finetune_epochs), PruneSchedule(start=0.0, end=0.75)
    else:
        model = copy.deepcopy(baseline)
        run_epochs, window = int(finetune_epochs), PruneSchedule(start=0.0, end=0.0)

    def factory(m: nn.Module, total: int) -> Pruner:
        start, end, freq = window.steps(total)
        return Pruner(m, kind, level, start_step=start, end_step=end, frequency=freq)

    tag = f"{method_name(method, mitigation)} {schedule} {level}"
    history: list[dict[str, Any]] = []
    if run_epochs > 0:
        model, history, _ = fit(model, bundle, epochs=run_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                weight_decay=weight_decay, seed=seed, device=device, objective=objective,
                                pruner_factory=factory, log=log, tag=tag)
    else:
        factory(model, 0).prune_to(level)
    model.eval()
    sparsity, per_layer = measure_sparsity(model, kind)
    sizes = model_size_bytes(model, sparse_kind=kind)
    last = history[-1] if history else {}
    info.update(
        schedule=schedule, sparsity=sparsity, sparsity_per_layer=per_layer, **sizes, history=history,
        final_loss=last.get("loss"), **{f"final_{k}": v for k, v in last.items() if k in ("ce", "kd", "at", "pkt", "pw")},
    )
    model.compbias_compression = {"method": method, "level": level, "schedule": schedule, "mitigation": mitigation}
    info["seconds"] = time.perf_counter() - started
    if log is not None:
        log(f"[{tag}] sparsity {sparsity:.4f}, size {sizes['size_bytes_sparse']} bytes sparse / {sizes['size_bytes']} dense in {info['seconds']:.1f}s")
    return model, info



def _compress_byo(baseline: nn.Module, bundle: DatasetBundle, method: str, level: Any, info: dict[str, Any], *, started: float,
                  mitigation: str | None, finetune_epochs: int, seed: int, device, log, function, options,
                  mitigation_options, train_options) -> tuple[nn.Module, dict[str, Any]]:
    """The bring-your-own methods (:mod:`compbias.jobs.byo`, :mod:`compbias.jobs.torchao_quant`)."""
    from . import byo

    if not METHOD_OPTIONS[method]:  # custom and torchao: no options, no fine-tuning to mitigate
        if mitigation is not None:
            raise ValueError(f"mitigations apply to the pruning methods, not to {method}")
        if options:
            raise ValueError(f"{method} takes no options (got {sorted(options)})")
    if method != "custom" and function is not None:
        raise ValueError(f"'function' applies to method custom only, not to {method}")
    reshaped = False
    if method == "custom":
        if function is None:
            raise ValueError("method custom needs function: 'package.module:function', called as function(model, bundle, level, seed)")
        model, extra = byo.custom_compress(baseline, bundle, level, function=function, seed=seed)
        reshaped = bool(extra.pop("reshaped"))
    elif method == "torchao":
        model, extra = byo.torchao_compress(baseline, bundle, str(level))
    else:
        fn = byo.torch_pruning_compress if method == "torch_pruning" else byo.torch_prune_compress
        model, extra = fn(baseline, bundle, level, seed=seed, options=options, finetune_epochs=int(finetune_epochs or 0),
                          mitigation=mitigation, mitigation_options=mitigation_options, train_options=train_options,
                          device=device, log=log)
        reshaped = method == "torch_pruning"
    info.update(schedule=None, history=[], final_loss=None)
    info.update(extra)
    record: dict[str, Any] = {"method": method, "level": level, "schedule": None, "mitigation": mitigation}
    if method == "custom":
        record["function"] = info.get("function")
    if options:
        record["options"] = dict(options)
    if reshaped:
        record["reshaped"] = True
    model.compbias_compression = record
    if method != "torchao":
        model.compbias_quantization = None
    info["seconds"] = time.perf_counter() - started
    if log is not None:
        log(f"[{method} {level}] params {info['baseline_params']} -> {info['params']}, size {info['baseline_size_bytes']} -> "
            f"{info['size_bytes']} bytes, CPU latency {info['baseline_latency_ms']:.2f} -> {info['latency_ms']:.2f} ms "
            f"in {info['seconds']:.1f}s")
    return model, info

"""Bring-your-own compression: the user's function, Torch-Pruning, ``torch.nn.utils.prune``, torchao.

=============  ==========================================  ==============================================
method         levels                                      what it does
=============  ==========================================  ==============================================
custom         anything (numbers or names), passed as is   calls ``function(model, bundle, level, seed)``
torch_pruning  channel pruning ratio in (0, 1)             Torch-Pruning: removes output channels of every
                                                           conv/linear layer but the classifier
                                                           (L1 magnitude, dependency-aware): the model
                                                           really shrinks
torch_prune    sparsity in (0, 1)                          ``torch.nn.utils.prune`` masks (global L1 by
                                                           default), made permanent with ``prune.remove``
torchao        int8_weight_only, int8_dynamic, ...         torchao's ``quantize_`` on the linear layers
                                                           (:mod:`compbias.jobs.torchao_quant`)
=============  ==========================================  ==============================================

Every method here records, in its info dict, ``params`` / ``baseline_params``
(parameter counts), ``size_bytes`` / ``baseline_size_bytes`` (stored size)
and ``latency_ms`` / ``baseline_latency_ms`` (median CPU wall time of one
forward pass over a batch of ``latency_batch`` test inputs, measured in this
process, one after the other, on the same batch).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .data import DatasetBundle
from .models import check_model_output, import_object, model_input_dtype
from .prune import measure_sparsity, model_size_bytes

__all__ = [
    "BYO_METHODS", "TORCH_PRUNE_STYLES", "count_params", "measure_latency", "custom_compress", "torch_pruning_compress",
    "torch_prune_compress",
]

from .vocabulary import BYO_METHODS, METHOD_OPTIONS, TORCH_PRUNE_STYLES


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (torchao/quantized weights count their logical elements)."""
    return int(sum(p.numel() for p in model.parameters()))


def _latency_batch(bundle: DatasetBundle, n: int) -> torch.Tensor:
    n = max(1, min(int(n), len(bundle.test)))
    return bundle.test.batch(torch.arange(n))[0]


@torch.no_grad()
def measure_latency(model: nn.Module, x: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in milliseconds of ``model(x)`` on the CPU (eval mode, no gradients).

    The model is copied to the CPU when it is elsewhere; the measurement uses
    torch's current intra-op thread count.
    """
    m = model
    if any(p.device.type != "cpu" for p in model.parameters()):
        m = copy.deepcopy(model).cpu()
    was_training = m.training
    m.eval()
    x = x.to(device="cpu", dtype=model_input_dtype(m))
    try:
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            m(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        m.train(was_training)
    return float(statistics.median(times))


def _footprint(model: nn.Module, x: torch.Tensor, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}params": count_params(model), f"{prefix}latency_ms": measure_latency(model, x),
            f"{prefix}size_bytes": _size_bytes(model)}


def _size_bytes(model: nn.Module) -> int:
    quant = getattr(model, "compbias_quantization", None)
    if isinstance(quant, dict) and quant.get("mode") == "torchao":
        from .torchao_quant import flatten_state

        tensors, _ = flatten_state(model.state_dict())
        return int(sum(t.numel() * t.element_size() for t in tensors.values()))
    return model_size_bytes(model)["size_bytes"]


def _finetune(model: nn.Module, bundle: DatasetBundle, *, epochs: int, mitigation: str | None, baseline: nn.Module,
              mitigation_options: Mapping[str, Any] | None, train_options: Mapping[str, Any], seed: int, device,
              log, tag: str) -> tuple[nn.Module, list[dict[str, Any]]]:
    if epochs <= 0:
        if mitigation is not None:
            raise ValueError(f"mitigation {mitigation!r} changes fine-tuning; give finetune_epochs >= 1 with it")
        return model, []
    from .distill import MITIGATIONS, make_objective
    from .train import fit, resolve_device

    if mitigation is not None and mitigation not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {mitigation!r}; choose one of {', '.join(MITIGATIONS)} or null")
    device = resolve_device(device)
    teacher = copy.deepcopy(baseline).to(device).eval() if mitigation is not None else None
    objective = make_objective(mitigation, teacher, **dict(mitigation_options or {}))
    model, history, _ = fit(model, bundle, epochs=int(epochs), seed=seed, device=device, objective=objective,
                            log=log, tag=tag, **dict(train_options))
    return model, history


def _output_layer(model: nn.Module, x: torch.Tensor, n_classes: int) -> list[nn.Module]:
    """The leaf module(s) whose output is the logits: kept whole by channel pruning."""
    seen: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, _i, out: seen.append(mod) if isinstance(out, torch.Tensor)
                                       and out.ndim == 2 and out.shape[-1] == n_classes else None)
               for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen[-1:]


def torch_pruning_compress(
    baseline: nn.Module, bundle: DatasetBundle, level: float, *, seed: int = 0, options: Mapping[str, Any] | None = None,
    finetune_epochs: int = 0, mitigation: str | None = None, mitigation_options: Mapping[str, Any] | None = None,
    train_options: Mapping[str, Any] | None = None, device=None, latency_batch: int = 64, log=None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Structured channel pruning with Torch-Pruning: channels are removed, not masked.

    Parameters
    ----------
    level : float
        Pruning ratio in (0, 1): the fraction of output channels removed from
        each prunable layer (``pruning_ratio`` of ``tp.pruner.MetaPruner``);
        the parameter count falls roughly by ``1 - (1 - level)^2``.
    options : dict, optional
        ``importance`` (``l1`` default, ``l2``, ``random``), ``global_pruning``
        (bool, default False), ``round_to`` (channel multiple).
    finetune_epochs : int
        Fine-tuning epochs of the smaller model after pruning (SGD with the
        study's settings; ``mitigation`` as for the built-in pruning).

    Returns
    -------
    model, info
        ``info`` holds the footprint before/after (``params``, ``size_bytes``,
        ``latency_ms`` and their ``baseline_`` twins) and ``sparsity``: the
        fraction of the baseline's parameters removed.
    """
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise ValueError(f"method torch_pruning needs the torch-pruning package ({exc}); pip install torch-pruning") from None
    options = dict(options or {})
    unknown = set(options) - set(METHOD_OPTIONS["torch_pruning"])
    if unknown:
        raise ValueError(f"torch_pruning options {sorted(unknown)} unknown; allowed: {', '.join(METHOD_OPTIONS['torch_pruning'])}")
    importance_name = str(options.get("importance", "l1"))
    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                   "random": lambda: tp.importance.RandomImportance()}
    if importance_name not in importances:
        raise ValueError(f"torch_pruning importance must be one of {', '.join(importances)}, got {importance_name!r}")
    spec = baseline.compbias_spec
    x = _latency_batch(bundle, latency_batch)
    before = _footprint(baseline, x, "baseline_")
    model = copy.deepcopy(baseline).cpu().eval()
    example = torch.zeros(1, *spec["input_shape"], dtype=model_input_dtype(model))
    ignored = _output_layer(model, example, int(spec["n_classes"]))
    torch.manual_seed(int(seed))  # RandomImportance
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importances[importance_name](), pruning_ratio=float(level),
            global_pruning=bool(options.get("global_pruning", False)), ignored_layers=ignored,
            round_to=options.get("round_to"),
        )
        pruner.step()
    except Exception as exc:
        raise ValueError(f"Torch-Pruning could not prune this model at ratio {level}: {type(exc).__name__}: {exc}") from None
    check_model_output(model, spec["input_shape"], int(spec["n_classes"]), source="the Torch-Pruning-pruned model")
    tag = f"torch_pruning {level}"
    model, history = _finetune(model, bundle, epochs=finetune_epochs, mitigation=mitigation, baseline=baseline,
                               mitigation_options=mitigation_options, train_options=train_options or {}, seed=seed,
                               device=device, log=log, tag=tag)
    model.eval()
    after = _footprint(model, x)
    info = {**before, **after, "sparsity": 1.0 - after["params"] / max(1, before["baseline_params"]),
            "importance": importance_name, "history": history, "final_loss": history[-1].get("loss") if history else None}
    return model, info


def torch_prune_compress(
    baseline: nn.Module, bundle: DatasetBundle, level: float, *, seed: int = 0, options: Mapping[str, Any] | None = None,
    finetune_epochs: int = 0, mitigation: str | None = None, mitigation_options: Mapping[str, Any] | None = None,
    train_options: Mapping[str, Any] | None = None, device=None, latency_batch: int = 64, log=None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Pruning with ``torch.nn.utils.prune``: masks (``weight_orig`` x ``weight_mask``), made permanent.

    Parameters
    ----------
    level : float
        ``amount`` in (0, 1).
    options : dict, optional
        ``style``: ``global_unstructured`` (default: L1 over every conv and
        linear weight together), ``l1_unstructured`` / ``random_unstructured``
        (each layer by itself), ``ln_structured`` (output channels of each
        convolution by their L``n`` norm, ``n`` default 1; channels are
        zeroed, not removed).
    finetune_epochs : int
        Fine-tuning with the masks in place (the pruned weights stay zero),
        before ``prune.remove`` makes them permanent.

    Returns
    -------
    model, info
        The model has plain ``weight`` parameters again (no ``weight_orig``,
        no ``weight_mask``, no hooks); ``info`` has ``sparsity`` (zeros among
        the pruned layers' weights) and the footprint before/after.
    """
    from torch.nn.utils import prune

    options = dict(options or {})
    unknown = set(options) - set(METHOD_OPTIONS["torch_prune"])
    if unknown:
        raise ValueError(f"torch_prune options {sorted(unknown)} unknown; allowed: {', '.join(METHOD_OPTIONS['torch_prune'])}")
    style = str(options.get("style", "global_unstructured"))
    if style not in TORCH_PRUNE_STYLES:
        raise ValueError(f"torch_prune style must be one of {', '.join(TORCH_PRUNE_STYLES)}, got {style!r}")
    x = _latency_batch(bundle, latency_batch)
    before = _footprint(baseline, x, "baseline_")
    model = copy.deepcopy(baseline)
    kinds = (nn.Conv2d,) if style == "ln_structured" else (nn.Conv2d, nn.Linear)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, kinds)]
    if not targets:
        raise ValueError(f"torch_prune ({style}) found no {'/'.join(k.__name__ for k in kinds)} layer to prune")
    amount = float(level)
    torch.manual_seed(int(seed))  # random_unstructured
    if style == "global_unstructured":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in targets:
            if style == "l1_unstructured":
                prune.l1_unstructured(module, name, amount=amount)
            elif style == "random_unstructured":
                prune.random_unstructured(module, name, amount=amount)
            else:
                prune.ln_structured(module, name, amount=amount, n=int(options.get("n", 1)), dim=0)
    tag = f"torch_prune {style} {level}"
    model, history = _finetune(model, bundle, epochs=finetune_epochs, mitigation=mitigation, baseline=baseline,
                               mitigation_options=mitigation_options, train_options=train_options or {}, seed=seed,
                               device=device, log=log, tag=tag)
    for module, name in targets:
        prune.remove(module, name)  # weight = weight_orig * weight_mask, the hook and the mask dropped
    model.eval()
    sparsity, per_layer = measure_sparsity(model, "structured" if style == "ln_structured" else "magnitude")
    after = _footprint(model, x)
    info = {**before, **after, "sparsity": sparsity, "sparsity_per_layer": per_layer, "style": style,
            "size_bytes_sparse": model_size_bytes(model, sparse_kind="structured" if style == "ln_structured" else "magnitude")["size_bytes_sparse"],
            "history": history, "final_loss": history[-1].get("loss") if history else None}
    return model, info


def custom_compress(
    baseline: nn.Module, bundle: DatasetBundle, level: Any, *, function: str | Callable, seed: int = 0,
    latency_batch: int = 64,
) -> tuple[nn.Module, dict[str, Any]]:
    """Call the user's ``function(model, bundle, level, seed) -> model`` on a copy of the baseline.

    Parameters
    ----------
    function : str or callable
        ``'package.module:function'`` (importable from the working directory
        or PYTHONPATH) or the function itself. It gets a deep copy of the
        baseline (in train mode, as :func:`compbias.jobs.load_model` returns
        it but trainable), the :class:`DatasetBundle`, the level as written in
        the study file and the seed, and returns the compressed module. It may
        fine-tune, change values and shrink conv/linear/batch-norm shapes; it
        must keep the module structure (same state-dict keys), because the
        model is saved as safetensors and rebuilt from the architecture.

    Returns
    -------
    model, info
        ``info`` has ``sparsity`` (zeros among conv/linear weights),
        ``function`` and the footprint before/after.

    Raises
    ------
    ValueError
        The function cannot be imported, fails, returns something else than a
        module, a module whose outputs are not ``(N, n_classes)``, or one whose
        state dict cannot be saved and rebuilt (other keys, tensor subclasses).
    """
    name = function if isinstance(function, str) else f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', function)}"
    fn = import_object(function, what="custom compression function") if isinstance(function, str) else function
    spec = baseline.compbias_spec
    x = _latency_batch(bundle, latency_batch)
    before = _footprint(baseline, x, "baseline_")
    work = copy.deepcopy(baseline).train()
    work.compbias_compression = None
    try:
        model = fn(work, bundle, level, int(seed))
    except Exception as exc:
        raise ValueError(f"custom compression function {name!r} failed at level {level!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"custom compression function {name!r} returned a {type(model).__name__}; it must return the compressed torch.nn.Module")
    model = model.cpu().eval() if all(p.device.type == "cpu" for p in model.parameters()) else model.eval()
    check_model_output(model, spec["input_shape"], int(spec["n_classes"]), source=f"the model returned by {name!r}",
                       x=x[:2].to(next(iter(model.parameters())).device) if any(True for _ in model.parameters()) else None)
    own, base = model.state_dict(), baseline.state_dict()
    if set(own) != set(base):
        extra, gone = sorted(set(own) - set(base)), sorted(set(base) - set(own))
        hint = " (torch.nn.utils.prune masks left in place: call prune.remove, or use method torch_prune)" if any(k.endswith(("_orig", "_mask")) for k in extra) else ""
        raise ValueError(
            f"the model returned by {name!r} has other state-dict keys than the architecture (new {extra[:5]}, gone {gone[:5]}){hint}; "
            "compbias saves weights as safetensors and rebuilds the module from the architecture, so a custom method must keep "
            "the module structure (values and conv/linear/batch-norm shapes may change)"
        )
    odd = [k for k, v in own.items() if type(v) not in (torch.Tensor, nn.Parameter)]
    if odd:
        raise ValueError(f"the model returned by {name!r} holds tensor subclasses ({odd[:3]}) that safetensors cannot store; "
                         "use method torchao for torchao quantization")
    reshaped = any(tuple(own[k].shape) != tuple(base[k].shape) for k in own)
    if not hasattr(model, "compbias_spec"):
        model.compbias_spec = dict(spec)
    if hasattr(baseline, "block_names") and not hasattr(model, "block_names"):
        model.block_names = baseline.block_names
    sparsity, _ = measure_sparsity(model, "magnitude")
    after = _footprint(model, x)
    info = {**before, **after, "sparsity": sparsity, "function": name, "reshaped": reshaped}
    return model, info

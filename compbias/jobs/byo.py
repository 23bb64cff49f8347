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
process, one after the other, on the same batch; :mod:`compbias.jobs.footprint`).

Devices: the baseline may be on any device and is left where it is. The
pruning methods and ``custom`` work on a copy on the baseline's device (their
example and check batches follow the model); fine-tuning moves the model to
the fine-tuning device (:class:`FineTuning`), as :func:`compbias.jobs.fit`
does. ``torchao`` quantizes a CPU copy (:mod:`compbias.jobs.torchao_quant`).
The latency is always measured on a CPU copy.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .data import DatasetBundle
from .footprint import count_params, measure_latency, measured
from .models import check_model_output, import_object, model_device, model_input_dtype
from .prune import measure_sparsity, model_size_bytes
from .vocabulary import BYO_METHODS, METHOD_OPTIONS, TORCH_PRUNE_STYLES

__all__ = [
    "BYO_METHODS", "TORCH_PRUNE_STYLES", "FineTuning", "count_params", "measure_latency", "custom_compress",
    "library_prune", "torch_pruning_compress", "torch_prune_compress", "torchao_compress",
]


@dataclass(frozen=True)
class FineTuning:
    """How a model pruned by a library is fine-tuned afterwards: what the built-in pruning takes.

    :func:`library_prune` takes these fields as keyword arguments
    (``compress_model`` passes them).

    Attributes
    ----------
    finetune_epochs : int
        Epochs of SGD fine-tuning; 0 (the default) skips it.
    mitigation : str, optional
        A mitigation of :data:`compbias.jobs.distill.MITIGATIONS` (the baseline
        is the teacher); needs ``finetune_epochs >= 1``.
    mitigation_options : mapping, optional
        Options of that mitigation's objective.
    train_options : mapping, optional
        Keyword arguments of :func:`compbias.jobs.train.fit` (batch size,
        learning rate, momentum, weight decay).
    device : str or torch.device, optional
        Where the model is fine-tuned (and returned, when it is); default
        CUDA when present, else the CPU (:func:`compbias.jobs.train.resolve_device`).
        Unused without fine-tuning.
    log : callable, optional
        Progress messages of the fine-tuning.
    """

    finetune_epochs: int = 0
    mitigation: str | None = None
    mitigation_options: Mapping[str, Any] | None = None
    train_options: Mapping[str, Any] | None = None
    device: Any = None
    log: Callable[[str], None] | None = None

    def run(self, model: nn.Module, baseline: nn.Module, bundle: DatasetBundle, *, seed: int,
            tag: str) -> tuple[nn.Module, dict[str, Any]]:
        """Fine-tune ``model`` in place, on :attr:`device` (the teacher of a mitigation is a copy of ``baseline`` there).

        Returns
        -------
        model : torch.nn.Module
            On :attr:`device` when fine-tuned; else ``model`` as given, where it is.
        info : dict
            ``history`` (per-epoch dicts; empty without fine-tuning) and
            ``final_loss`` (None without fine-tuning).

        Raises
        ------
        ValueError
            A mitigation without fine-tuning epochs, or an unknown mitigation.
        """
        if self.finetune_epochs <= 0:
            if self.mitigation is not None:
                raise ValueError(f"mitigation {self.mitigation!r} changes fine-tuning; give finetune_epochs >= 1 with it")
            return model, {"history": [], "final_loss": None}
        from .distill import MITIGATIONS, make_objective
        from .train import fit, resolve_device

        if self.mitigation is not None and self.mitigation not in MITIGATIONS:
            raise ValueError(f"unknown mitigation {self.mitigation!r}; choose one of {', '.join(MITIGATIONS)} or null")
        device = resolve_device(self.device)
        teacher = copy.deepcopy(baseline).to(device).eval() if self.mitigation is not None else None
        objective = make_objective(self.mitigation, teacher, **dict(self.mitigation_options or {}))
        model, history, _ = fit(model, bundle, epochs=int(self.finetune_epochs), seed=seed, device=device,
                                objective=objective, log=self.log, tag=tag, **dict(self.train_options or {}))
        return model, {"history": history, "final_loss": history[-1].get("loss") if history else None}


def _checked_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict; ValueError naming the ones ``method`` does not know (:data:`METHOD_OPTIONS`)."""
    options = dict(options or {})
    unknown = set(options) - set(METHOD_OPTIONS[method])
    if unknown:
        raise ValueError(f"{method} options {sorted(unknown)} unknown; allowed: {', '.join(METHOD_OPTIONS[method])}")
    return options


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


def library_prune(
    method: str, baseline: nn.Module, bundle: DatasetBundle, level: float, *, seed: int = 0,
    options: Mapping[str, Any] | None = None, latency_batch: int = 64, **finetune: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of the baseline with a library's own pruning, fine-tune it, and measure both.

    Parameters
    ----------
    method : {'torch_pruning', 'torch_prune'}
        ``torch_pruning``: structured channel pruning with Torch-Pruning;
        channels are removed, not masked. ``torch_prune``: pruning with
        ``torch.nn.utils.prune`` masks (``weight_orig`` x ``weight_mask``),
        made permanent.
    baseline : torch.nn.Module
        Left unchanged, on any device: the copy is pruned on the baseline's
        device (Torch-Pruning's example input is made there).
    bundle : DatasetBundle
    level : float
        ``torch_pruning``: the pruning ratio in (0, 1), the fraction of output
        channels removed from each prunable layer (``pruning_ratio`` of
        ``tp.pruner.MetaPruner``; the parameter count falls roughly by
        ``1 - (1 - level)^2``). ``torch_prune``: the ``amount`` in (0, 1).
    seed : int
        Seeds the random importance / random styles and the fine-tuning.
    options : dict, optional
        ``torch_pruning``: ``importance`` (``l1`` default, ``l2``,
        ``random``), ``global_pruning`` (bool, default False), ``round_to``
        (channel multiple). ``torch_prune``: ``style``,
        ``global_unstructured`` (default: L1 over every conv and linear weight
        together), ``l1_unstructured`` / ``random_unstructured`` (each layer by
        itself) or ``ln_structured`` (output channels of each convolution by
        their L``n`` norm, ``n`` default 1; channels are zeroed, not removed).
    latency_batch : int
        Test inputs in the batch the CPU latency is measured on.
    **finetune
        Fine-tuning after pruning (SGD with the study's settings, as for the
        built-in pruning): the fields of :class:`FineTuning`
        (``finetune_epochs``, ``mitigation``, ...). ``torch_prune``
        fine-tunes with the masks in place (the pruned weights stay zero),
        before ``prune.remove`` makes them permanent.

    Returns
    -------
    model, info
        ``model`` is in eval mode on the baseline's device, or on the
        fine-tuning device when fine-tuned.
        ``info`` holds the footprint before/after (``params``, ``size_bytes``,
        ``latency_ms`` and their ``baseline_`` twins), ``history``,
        ``final_loss`` and ``sparsity``: for ``torch_pruning`` the fraction of
        the baseline's parameters removed (and ``importance``); for
        ``torch_prune`` the zeros among the pruned layers' weights (and
        ``sparsity_per_layer``, ``style``, ``size_bytes_sparse``), whose model
        has plain ``weight`` parameters again (no ``weight_orig``, no
        ``weight_mask``, no hooks).
    """
    steps = {"torch_pruning": _torch_pruning, "torch_prune": _torch_prune}
    if method not in steps:
        raise ValueError(f"library_prune prunes with {' or '.join(steps)}, not {method!r}")
    return steps[method](baseline, bundle, level, seed=seed, options=options, tuning=FineTuning(**finetune),
                         latency_batch=latency_batch)


#: ``compress_model``'s names of the two libraries: :func:`library_prune` with the method given.
torch_pruning_compress = functools.partial(library_prune, "torch_pruning")
torch_prune_compress = functools.partial(library_prune, "torch_prune")


def _torch_pruning(baseline: nn.Module, bundle: DatasetBundle, level: float, *, seed: int, options: Mapping[str, Any] | None,
                   tuning: FineTuning, latency_batch: int) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning's ``MetaPruner`` on a copy on the baseline's device, the classifier kept whole (see :func:`library_prune`)."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise ValueError(f"method torch_pruning needs the torch-pruning package ({exc}); pip install torch-pruning") from None
    options = _checked_options("torch_pruning", options)
    importance_name = str(options.get("importance", "l1"))
    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                   "random": lambda: tp.importance.RandomImportance()}
    if importance_name not in importances:
        raise ValueError(f"torch_pruning importance must be one of {', '.join(importances)}, got {importance_name!r}")
    spec = baseline.compbias_spec

    def prune(_x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(baseline).eval()
        example = torch.zeros(1, *spec["input_shape"], dtype=model_input_dtype(model), device=model_device(model))
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
        model, tuned = tuning.run(model, baseline, bundle, seed=seed, tag=f"torch_pruning {level}")
        model.eval()
        removed = 1.0 - count_params(model) / max(1, count_params(baseline))
        return model, {"sparsity": removed, "importance": importance_name, **tuned}

    return measured(baseline, bundle, latency_batch, prune)


def _torch_prune(baseline: nn.Module, bundle: DatasetBundle, level: float, *, seed: int, options: Mapping[str, Any] | None,
                 tuning: FineTuning, latency_batch: int) -> tuple[nn.Module, dict[str, Any]]:
    """``torch.nn.utils.prune`` on a copy, fine-tuned with its masks, then ``prune.remove`` (see :func:`library_prune`)."""
    from torch.nn.utils import prune as torch_prune

    options = _checked_options("torch_prune", options)
    style = str(options.get("style", "global_unstructured"))
    if style not in TORCH_PRUNE_STYLES:
        raise ValueError(f"torch_prune style must be one of {', '.join(TORCH_PRUNE_STYLES)}, got {style!r}")
    kind = "structured" if style == "ln_structured" else "magnitude"

    def prune(_x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(baseline)
        kinds = (nn.Conv2d,) if style == "ln_structured" else (nn.Conv2d, nn.Linear)
        targets = [(m, "weight") for m in model.modules() if isinstance(m, kinds)]
        if not targets:
            raise ValueError(f"torch_prune ({style}) found no {'/'.join(k.__name__ for k in kinds)} layer to prune")
        amount = float(level)
        torch.manual_seed(int(seed))  # random_unstructured
        if style == "global_unstructured":
            torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
        else:
            for module, name in targets:
                if style == "l1_unstructured":
                    torch_prune.l1_unstructured(module, name, amount=amount)
                elif style == "random_unstructured":
                    torch_prune.random_unstructured(module, name, amount=amount)
                else:
                    torch_prune.ln_structured(module, name, amount=amount, n=int(options.get("n", 1)), dim=0)
        model, tuned = tuning.run(model, baseline, bundle, seed=seed, tag=f"torch_prune {style} {level}")
        for module, name in targets:
            torch_prune.remove(module, name)  # weight = weight_orig * weight_mask, the hook and the mask dropped
        model.eval()
        sparsity, per_layer = measure_sparsity(model, kind)
        return model, {"sparsity": sparsity, "sparsity_per_layer": per_layer, "style": style,
                       "size_bytes_sparse": model_size_bytes(model, sparse_kind=kind)["size_bytes_sparse"], **tuned}

    return measured(baseline, bundle, latency_batch, prune)


def torchao_compress(baseline: nn.Module, bundle: DatasetBundle, level: str, *,
                     latency_batch: int = 64) -> tuple[nn.Module, dict[str, Any]]:
    """torchao's ``quantize_`` on the linear layers (:func:`compbias.jobs.torchao_quant.torchao_quantize`), measured.

    The baseline may be on any device (left there); torchao quantizes a copy
    on the CPU, and the check batch is sent to the CPU with it.

    Returns
    -------
    model, info
        ``info`` has the footprint before/after, ``sparsity`` 0 and what
        :func:`~compbias.jobs.torchao_quant.torchao_quantize` records.
    """
    from .torchao_quant import torchao_quantize

    def quantize(x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
        model, extra = torchao_quantize(baseline, str(level), check=lambda m: m(x[:2].cpu()))  # a CPU model
        return model, {"sparsity": 0.0, **extra}

    return measured(baseline, bundle, latency_batch, quantize)


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
        baseline on the baseline's device (in train mode, as
        :func:`compbias.jobs.load_model` returns it but trainable), the
        :class:`DatasetBundle`, the level as written in
        the study file and the seed, and returns the compressed module. It may
        fine-tune, change values and shrink conv/linear/batch-norm shapes; it
        must keep the module structure (same state-dict keys), because the
        model is saved as safetensors and rebuilt from the architecture.

    Returns
    -------
    model, info
        ``model`` in eval mode, where the function left it (its output check
        runs there). ``info`` has ``sparsity`` (zeros among conv/linear weights),
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

    def compress(x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
        work = copy.deepcopy(baseline).train()
        work.compbias_compression = None
        try:
            model = fn(work, bundle, level, int(seed))
        except Exception as exc:
            raise ValueError(f"custom compression function {name!r} failed at level {level!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ValueError(f"custom compression function {name!r} returned a {type(model).__name__}; it must return the compressed torch.nn.Module")
        model.eval()
        check_model_output(model, spec["input_shape"], int(spec["n_classes"]), source=f"the model returned by {name!r}",
                           x=x[:2])  # moved to the model's device there
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
        return model, {"sparsity": sparsity, "function": name, "reshaped": reshaped}

    return measured(baseline, bundle, latency_batch, compress)

"""Pruning masks, schedules, measured sparsity and storage size.

Two kinds of pruning, both kept as explicit boolean masks re-applied after
every optimiser step (no re-parametrisation, so a pruned model's state dict
is that of a dense model with zeros):

``magnitude``
    global unstructured: the weights of every convolution and linear layer
    are ranked together by ``|w|`` and the smallest are zeroed.
``structured``
    L1 filter pruning: in every convolution, the output filters with the
    smallest L1 norm are zeroed, the same fraction in each layer, together
    with the batch-norm scale and shift of those channels (the channel is
    dead, as if removed).

The target sparsity follows Zhu & Gupta's (2017) cubic schedule
``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` between steps
``t_0`` and ``t_1``, updating the masks every ``frequency`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

__all__ = [
    "PRUNE_KINDS",
    "Pruner",
    "cubic_sparsity",
    "conv_bn_pairs",
    "prunable_weights",
    "measure_sparsity",
    "model_size_bytes",
]

PRUNE_KINDS = ("magnitude", "structured")


def cubic_sparsity(step: int, *, final: float, start_step: int, end_step: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual pruning schedule.

    Parameters
    ----------
    step : int
        Current optimiser step.
    final : float
        Target sparsity ``s_f`` reached at ``end_step`` and kept afterwards.
    start_step, end_step : int
        ``t_0`` and ``t_1``; before ``t_0`` the sparsity is ``initial``.
    initial : float
        ``s_i``.

    Returns
    -------
    float
        ``s_f + (s_i - s_f) (1 - (t - t_0)/(t_1 - t_0))^3``, clipped to the
        schedule's range.
    """
    if step < start_step:
        return initial
    if step >= end_step or end_step <= start_step:
        return final
    progress = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` for every BatchNorm2d fed only by a Conv2d.

    Found by tracing the model with ``torch.fx``, so it works for any
    traceable architecture (all of :func:`compbias.jobs.build_model`'s).
    """
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if (
                isinstance(src, torch.fx.Node)
                and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1
            ):
                pairs.append((str(src.target), str(node.target)))
    return pairs


def prunable_weights(model: nn.Module, kind: str) -> dict[str, nn.Parameter]:
    """Weights a pruning kind acts on: conv and linear (magnitude) or conv only (structured)."""
    if kind not in PRUNE_KINDS:
        raise ValueError(f"unknown pruning kind {kind!r}; choose one of {', '.join(PRUNE_KINDS)}")
    types = (nn.Conv2d, nn.Linear) if kind == "magnitude" else (nn.Conv2d,)
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, types)}


class Pruner:
    """Masks for one model, updated on a schedule and re-applied after each step.

    Parameters
    ----------
    model : torch.nn.Module
        On any device; the masks live on the device of the weights they
        mask (build the pruner after moving the model, as ``fit`` does).
    kind : {'magnitude', 'structured'}
    sparsity : float
        Final sparsity in ``[0, 1)``: the fraction of weights (magnitude) or
        of filters in each convolution (structured) set to zero.
    start_step, end_step : int
        The cubic schedule's ``t_0`` and ``t_1`` (equal for one-shot pruning).
    frequency : int
        Masks are recomputed every ``frequency`` steps inside the schedule.
    """

    def __init__(self, model: nn.Module, kind: str, sparsity: float, *, start_step: int = 0, end_step: int = 0, frequency: int = 1):
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"pruning level must be a sparsity in [0, 1), got {sparsity!r}")
        self.model = model
        self.kind = kind
        self.final = float(sparsity)
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.frequency = max(1, int(frequency))
        self.weights = prunable_weights(model, kind)
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.current = 0.0
        self._bn_of_conv = {}
        if kind == "structured":
            modules = dict(model.named_modules())
            self._bn_of_conv = {f"{c}.weight": modules[b] for c, b in conv_bn_pairs(model)}

    def target_at(self, step: int) -> float:
        """Scheduled sparsity at ``step``."""
        return cubic_sparsity(step, final=self.final, start_step=self.start_step, end_step=self.end_step)

    def update(self, step: int) -> bool:
        """Recompute the masks if ``step`` is a pruning step; return whether it was."""
        in_window = self.start_step <= step <= self.end_step
        due = step == self.end_step or (in_window and (step - self.start_step) % self.frequency == 0)
        target = self.target_at(step)
        if not due or target <= self.current:
            return False
        self.prune_to(target)
        return True

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Set the masks for ``sparsity`` now and zero the pruned weights."""
        if self.kind == "magnitude":
            flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in self.weights.values()])
            k = int(round(sparsity * flat.numel()))
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            if k > 0:
                keep[torch.argsort(flat, stable=True)[:k]] = False
            offset = 0
            for name, w in self.weights.items():
                n = w.numel()
                # Never revive a weight pruned earlier in the schedule.
                self.masks[name] = keep[offset : offset + n].view_as(w).to(w.device) & self.masks[name]
                offset += n
        else:
            for name, w in self.weights.items():
                n_out = w.shape[0]
                k = min(int(round(sparsity * n_out)), n_out - 1)
                dead = ~self.masks[name].flatten(1).any(dim=1)
                norms = w.detach().abs().flatten(1).sum(dim=1).float().cpu()
                norms[dead.cpu()] = -1.0  # already pruned filters stay pruned
                keep = torch.ones(n_out, dtype=torch.bool)
                if k > 0:
                    keep[torch.argsort(norms, stable=True)[:k]] = False
                self.masks[name] = keep.to(w.device).view(-1, *([1] * (w.ndim - 1))).expand_as(w).clone()
        self.current = float(sparsity)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights (and, for structured pruning, their BN channels)."""
        for name, w in self.weights.items():
            w.mul_(self.masks[name].to(w.dtype))
            bn = self._bn_of_conv.get(name)
            if bn is not None:
                channel = self.masks[name].flatten(1).any(dim=1).to(bn.weight.dtype)
                bn.weight.mul_(channel)
                bn.bias.mul_(channel)


def measure_sparsity(model: nn.Module, kind: str = "magnitude") -> tuple[float, dict[str, float]]:
    """Fraction of exactly-zero weights in the layers a pruning kind acts on.

    Parameters
    ----------
    model : torch.nn.Module
    kind : {'magnitude', 'structured'}
        ``magnitude`` counts conv and linear weights, ``structured`` conv only.

    Returns
    -------
    overall : float
        Zero weights / all weights over those layers.
    per_layer : dict
        ``weight name -> fraction of zeros``.
    """
    weights = prunable_weights(model, kind)
    zeros = total = 0
    per_layer = {}
    for name, w in weights.items():
        z = int((w.detach() == 0).sum())
        per_layer[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return (zeros / total if total else 0.0), per_layer


def model_size_bytes(model: nn.Module, *, sparse_kind: str | None = None) -> dict[str, int]:
    """Storage of a model's state dict.

    Parameters
    ----------
    model : torch.nn.Module
    sparse_kind : {'magnitude', 'structured'}, optional
        When given, also estimate a sparse encoding of the pruned layers: a
        one-bit-per-weight occupancy bitmap plus the non-zero values.

    Returns
    -------
    dict
        ``size_bytes`` (every tensor stored densely at its own dtype, i.e.
        what ``weights.safetensors`` holds, without its header) and, with
        ``sparse_kind``, ``size_bytes_sparse``.
    """
    state = model.state_dict()
    dense = sum(t.numel() * t.element_size() for t in state.values())
    out = {"size_bytes": int(dense)}
    if sparse_kind is not None:
        pruned = prunable_weights(model, sparse_kind)
        sparse = 0
        for name, t in state.items():
            if name in pruned:
                nnz = int((t != 0).sum())
                sparse += math.ceil(t.numel() / 8) + nnz * t.element_size()
            else:
                sparse += t.numel() * t.element_size()
        out["size_bytes_sparse"] = int(sparse)
    return out


@dataclass
class PruneSchedule:
    """Where in a run of ``total_steps`` the cubic schedule starts and ends, as fractions."""

    start: float = 0.0
    end: float = 0.75
    updates: int = 20

    def steps(self, total_steps: int) -> tuple[int, int, int]:
        """``(start_step, end_step, frequency)`` for a run of ``total_steps``."""
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"prune schedule needs 0 <= start <= end <= 1, got {self.start}, {self.end}")
        start = int(self.start * total_steps)
        end = max(start, int(self.end * total_steps) - 1)
        frequency = max(1, (end - start) // max(1, self.updates))
        return start, end, frequency

"""The training loop, shared by baseline training and every fine-tuning.

Read :func:`fit` top to bottom: pick the device, seed the shuffling, build
SGD with a cosine schedule, then for each epoch shuffle, (augment), step,
re-apply pruning masks, and print one progress line. Everything random is
drawn from generators seeded by ``seed``; on CPU the result is bit-for-bit
reproducible (``torch.use_deterministic_algorithms`` is on during the run).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DatasetBundle
from .prune import Pruner, PruneSchedule

__all__ = ["train_model", "fit", "resolve_device", "CrossEntropy"]

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CrossEntropy:
    """The plain objective: cross-entropy with the labels."""

    name = "ce"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, logits, {"ce": loss.detach()}


@contextlib.contextmanager
def _deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding (H/8 pixels)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(n)])


def fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    augment: bool | None = None,
    objective: Objective | None = None,
    pruner_factory: Callable[[nn.Module, int], Pruner] | None = None,
    log: Callable[[str], None] | None = print,
    tag: str = "train",
) -> tuple[nn.Module, list[dict[str, Any]], Pruner | None]:
    """Run SGD on ``bundle.train``; the loop behind :func:`train_model` and fine-tuning.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place (moved to ``device``).
    bundle : DatasetBundle
    epochs, batch_size, lr, momentum, weight_decay : training settings
        SGD with Nesterov momentum; the learning rate follows a cosine from
        ``lr`` to 0 over all steps.
    seed : int
        Seeds shuffling and augmentation.
    device : str, optional
        Default: CUDA when present (with autocast mixed precision), else CPU.
    augment : bool, optional
        Random flips and crops; default ``bundle.augment``.
    objective : callable, optional
        ``objective(model, x, y) -> (loss, logits, parts)``; default
        cross-entropy. ``parts`` are logged per epoch (e.g. ``kd``, ``at``).
    pruner_factory : callable, optional
        ``pruner_factory(model, total_steps) -> Pruner``; its masks are updated
        before and re-applied after every step.
    log : callable, optional
        Receives one progress line per epoch; ``None`` for silence.
    tag : str
        Prefix of the progress lines.

    Returns
    -------
    model, history, pruner
        ``history`` has one dict per epoch: ``epoch``, ``loss``, ``acc``
        (training accuracy), ``lr``, ``seconds``, the objective's parts and,
        when pruning, ``sparsity`` (scheduled target).
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    device = resolve_device(device)
    use_amp = device.type == "cuda"
    augment = bundle.augment if augment is None else augment
    objective = objective or CrossEntropy()
    data = bundle.train
    n = len(data)
    steps_per_epoch = max(1, n // batch_size if n % batch_size == 1 else math.ceil(n / batch_size))
    total_steps = epochs * steps_per_epoch

    model.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=momentum, nesterov=momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps))))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pruner = pruner_factory(model, total_steps) if pruner_factory is not None else None

    history: list[dict[str, Any]] = []
    step = 0
    with _deterministic():
        for epoch in range(epochs):
            model.train()
            started = time.perf_counter()
            order = torch.randperm(n, generator=generator)
            sums: dict[str, float] = {}
            seen = correct = 0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x, y = data.batch(idx)
                if augment:
                    x = _augment(x, generator)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if pruner is not None:
                    pruner.update(step)

                with torch.autocast(device_type=device.type, enabled=use_amp):
                    loss, logits, parts = objective(model, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{tag}: loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if pruner is not None:
                    pruner.apply()

                k = len(y)
                seen += k
                correct += int((logits.detach().argmax(1) == y).sum())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * k
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * k
                step += 1

            record = {"epoch": epoch + 1, **{k: v / seen for k, v in sums.items()}, "acc": correct / seen,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
            if pruner is not None:
                record["sparsity"] = pruner.current
            history.append(record)
            if log is not None:
                extra = "".join(f" {k} {record[k]:.4f}" for k in parts if k in record)
                sp = f" sparsity {record['sparsity']:.3f}" if pruner is not None else ""
                log(f"[{tag}] epoch {epoch + 1}/{epochs} loss {record['loss']:.4f}{extra} acc {record['acc']:.3f} lr {record['lr']:.4f}{sp} ({record['seconds']:.1f}s)")
    model.eval()
    return model, history, pruner


def train_model(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    augment: bool | None = None,
    prune: Mapping[str, Any] | None = None,
    objective: Objective | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a model (optionally pruning it gradually from scratch).

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`compbias.jobs.build_model` (build it with ``seed=`` for
        a reproducible initialisation).
    bundle : DatasetBundle
    epochs, batch_size, lr, momentum, weight_decay, seed, device, augment
        As in :func:`fit`.
    prune : dict, optional
        Gradual pruning during training (Hooker et al.'s "from scratch"):
        ``{'kind': 'magnitude' | 'structured', 'sparsity': 0.9,
        'start': 0.1, 'end': 0.75, 'updates': 20}``; start/end are fractions
        of all training steps.
    objective : callable, optional
        See :func:`fit`.
    log : callable, optional
        Progress printer (default ``print``).

    Returns
    -------
    model : torch.nn.Module
        The trained model, in eval mode.
    history : list of dict
        One record per epoch (see :func:`fit`).

    Examples
    --------
    >>> from compbias.jobs import load_dataset, build_model
    >>> b = load_dataset("digits")
    >>> m, h = train_model(build_model("smallcnn", 10, b.input_shape, seed=0), b, epochs=1, log=None)
    """
    factory = None
    if prune is not None:
        spec = dict(prune)
        kind = spec.pop("kind", "magnitude")
        sparsity = spec.pop("sparsity", None)
        if sparsity is None:
            raise ValueError("prune needs a 'sparsity' in [0, 1)")
        schedule = PruneSchedule(start=spec.pop("start", 0.1), end=spec.pop("end", 0.75), updates=spec.pop("updates", 20))
        if spec:
            raise ValueError(f"unknown prune option(s) {sorted(spec)}; allowed: kind, sparsity, start, end, updates")

        def factory(m: nn.Module, total: int) -> Pruner:
            start, end, freq = schedule.steps(total)
            return Pruner(m, kind, sparsity, start_step=start, end_step=end, frequency=freq)

    model, history, _ = fit(
        model, bundle, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        seed=seed, device=device, augment=augment, objective=objective, pruner_factory=factory, log=log,
        tag="train" if prune is None else "train+prune",
    )
    return model, history

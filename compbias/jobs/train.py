"""The training loop, shared by baseline training and every fine-tuning.

Read :func:`fit` top to bottom: pick the device and precision, seed the
shuffling, build SGD with a cosine schedule and the batch source, then for
each epoch draw the order and augmentation, step, re-apply pruning masks,
and print one progress line. Everything random is drawn from a CPU
generator seeded by ``seed``; on CPU the result is bit-for-bit reproducible
(``torch.use_deterministic_algorithms`` is on during the run). The batches
come from :mod:`compbias.jobs.pipeline` (resident on the device, augmented
there); nothing waits for the device more than once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DatasetBundle
from .pipeline import EpochPlan, steps_per_epoch, training_batches
from .prune import Pruner, PruneSchedule
from .vocabulary import TRAIN_DEFAULTS

__all__ = ["train_model", "fit", "resolve_device", "CrossEntropy", "TrainingRecipe", "training_recipe"]

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


class _EpochTally:
    """One epoch's per-step loss, objective parts and correct counts, kept on the device and read once.

    Each step writes its values into slot ``b`` (a copy on the device, no
    wait); :meth:`read` brings them to the host together at the epoch's end.
    """

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device = steps, device
        self.values: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros(steps, dtype=torch.int64, device=device)
        self.sizes: list[int] = []

    def add(self, b: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, parts: Mapping[str, Any]) -> None:
        self.sizes.append(int(y.shape[0]))
        self.correct[b] = (logits.detach().argmax(1) == y).sum()
        for key, value in (("loss", loss), *parts.items()):
            if key not in self.values:
                self.values[key] = torch.zeros(self.steps, dtype=torch.float32, device=self.device)
            self.values[key][b] = torch.as_tensor(value).detach()

    def read(self) -> tuple[dict[str, float], float, int | None]:
        """``(example-weighted means per key, accuracy, index of the first non-finite loss or None)``."""
        k = len(self.sizes)
        host = torch.stack([self.correct.double(), *(v.double() for v in self.values.values())]).cpu()[:, :k]
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        bad = torch.nonzero(~torch.isfinite(host[1])).flatten()
        means = {key: float((row * sizes).sum() / sizes.sum()) for key, row in zip(self.values, host[1:])}
        return means, float(host[0].sum() / sizes.sum()), int(bad[0]) if len(bad) else None


@dataclass(frozen=True)
class TrainingRecipe:
    """How :func:`fit` runs its steps on a device: autocast dtype, gradient scaler, memory format.

    Attributes
    ----------
    amp_dtype : torch.dtype or None
        The autocast dtype of the forward pass; None trains in full float32.
    scaler : bool
        Whether the loss is scaled (``torch.amp.GradScaler``; float16 needs it).
    channels_last : bool
        Whether model and batches use the channels-last memory format during
        training (the model is put back in the default layout afterwards).
    """

    amp_dtype: torch.dtype | None = None
    scaler: bool = False
    channels_last: bool = False


def training_recipe(device: torch.device) -> TrainingRecipe:
    """The recipe :func:`fit` uses on ``device``.

    CUDA: channels-last, with bfloat16 autocast where the card supports it
    (no scaler needed), else float16 with a gradient scaler. Every other
    device trains in float32 in the default layout, so CPU training stays
    bit-for-bit reproducible. (The tests force the CUDA recipes on the CPU,
    where autocast, the scaler and channels-last also run, to check the
    code paths a GPU takes.)
    """
    if device.type != "cuda":
        return TrainingRecipe()
    if torch.cuda.is_bf16_supported():
        return TrainingRecipe(torch.bfloat16, False, True)
    return TrainingRecipe(torch.float16, True, True)


def _optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov when ``momentum > 0``); no weight decay on biases and batch-norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True,
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate follows a cosine from its initial value to 0 over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps))))


def fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    epochs: int,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    momentum: float = TRAIN_DEFAULTS["momentum"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
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
        Trained in place (moved to ``device``), on any device.
    bundle : DatasetBundle
    epochs, batch_size, lr, momentum, weight_decay : training settings
        SGD with Nesterov momentum; the learning rate follows a cosine from
        ``lr`` to 0 over all steps. Defaults:
        :data:`compbias.jobs.vocabulary.TRAIN_DEFAULTS`.
    seed : int
        Seeds shuffling and augmentation (drawn on the CPU, so the same on
        every device).
    device : str, optional
        Default: CUDA when present, else CPU. On CUDA the forward pass runs
        under bfloat16 autocast (float16 with a gradient scaler on cards
        without bfloat16) in channels-last memory format; elsewhere float32.
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

    Raises
    ------
    FloatingPointError
        When the loss is NaN or infinite (checked once per epoch, naming the
        first bad step: the loop does not wait for the device every step).

    Notes
    -----
    The training split stays on the device when it fits, and each batch is
    indexed, flipped and cropped there (:mod:`compbias.jobs.pipeline`);
    loss and accuracy are summed on the device and read once per epoch.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    device = resolve_device(device)
    recipe = training_recipe(device)
    amp_dtype, channels_last = recipe.amp_dtype, recipe.channels_last
    augment = bundle.augment if augment is None else augment
    objective = objective or CrossEntropy()
    data = bundle.train
    n = len(data)
    steps = steps_per_epoch(n, batch_size)
    total_steps = epochs * steps

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = _optimizer(model, lr, momentum, weight_decay)
    scheduler = cosine_schedule(optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type) if recipe.scaler else None
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    pruner = pruner_factory(model, total_steps) if pruner_factory is not None else None
    batches = training_batches(data, device, batch_size, steps, channels_last=channels_last) if epochs else None
    height = int(bundle.input_shape[1])

    history: list[dict[str, Any]] = []
    step = 0
    with _deterministic(), warnings.catch_warnings():
        if scaler is not None:
            # A step the scaler skips (inf/NaN gradients while it calibrates its scale) still
            # advances the schedule, which counts steps, not updates: torch's warning about
            # it is expected here, not a misuse.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        for epoch in range(epochs):
            model.train()
            started = time.perf_counter()
            plan = EpochPlan.draw(n, height, generator, augment)
            tally = _EpochTally(steps, device)
            for b, (x, y) in enumerate(batches.epoch(plan, batch_size, steps)):
                if pruner is not None:
                    pruner.update(step)
                with autocast():
                    loss, logits, parts = objective(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                if pruner is not None:
                    pruner.apply()
                tally.add(b, loss, logits, y, parts)
                step += 1

            means, acc, bad = tally.read()  # the epoch's one wait for the device
            if bad is not None:
                raise FloatingPointError(f"{tag}: loss became non-finite at epoch {epoch + 1}, step {step - steps + bad}; lower the learning rate")
            record = {"epoch": epoch + 1, **means, "acc": acc,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
            if pruner is not None:
                record["sparsity"] = pruner.current
            history.append(record)
            if log is not None:
                extra = "".join(f" {k} {record[k]:.4f}" for k in means if k != "loss")
                sp = f" sparsity {record['sparsity']:.3f}" if pruner is not None else ""
                log(f"[{tag}] epoch {epoch + 1}/{epochs} loss {record['loss']:.4f}{extra} acc {record['acc']:.3f} lr {record['lr']:.4f}{sp} ({record['seconds']:.1f}s)")
    if channels_last:
        model.to(memory_format=torch.contiguous_format)  # saved weights and later users expect the default layout
    model.eval()
    return model, history, pruner


def train_model(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    epochs: int = TRAIN_DEFAULTS["epochs"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    momentum: float = TRAIN_DEFAULTS["momentum"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
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

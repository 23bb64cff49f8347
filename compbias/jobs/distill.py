"""Fine-tuning objectives that use the uncompressed baseline as a teacher.

Knowledge distillation variants (the mitigations of Blakeney et al.,
"Simon Says"), with the loss weights of the CRD code base they built on::

    loss = gamma * CE(student, y) + alpha * KD + beta * feature loss

==========  =====  =====  =======  ==========================================
mitigation  gamma  alpha  beta     feature loss
==========  =====  =====  =======  ==========================================
kd          0.1    0.9    0        --
at          1      0      1000     attention transfer over every block
pkt         1      0      30000    probabilistic knowledge transfer, penultimate
at_kd       0.1    0.9    1000     attention transfer
pkt_kd      0.1    0.9    30000    PKT
==========  =====  =====  =======  ==========================================

and the performance-weighted loss of Meyer (2023), ``pw``.

The attention-transfer loss is a mean over the ``H*W`` positions of each
block's map, so its size shrinks with the map; CRD's beta = 1000 was set
for 32x32 CIFAR inputs. The default AT weight is therefore
``1000 * (H * W) / (32 * 32)`` for inputs of ``H x W`` pixels: exactly
CRD's on CIFAR, and the same effective weight on other sizes (on 8x8
digits, beta = 1000 makes fine-tuning diverge at lr 0.01).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import capture_blocks, model_device

__all__ = [
    "MITIGATIONS",
    "Distillation",
    "PerformanceWeighted",
    "kd_loss",
    "attention_map",
    "at_loss",
    "pkt_loss",
    "pw_weights",
    "pw_targets",
    "make_objective",
]

from .vocabulary import MITIGATIONS

_WEIGHTS = {
    "kd": (0.1, 0.9, 0.0),
    "at": (1.0, 0.0, 1000.0),
    "pkt": (1.0, 0.0, 30000.0),
    "at_kd": (0.1, 0.9, 1000.0),
    "pkt_kd": (0.1, 0.9, 30000.0),
}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s distillation loss.

    .. math:: T^2 \\, \\mathrm{KL}(\\mathrm{softmax}(t/T) \\,\\|\\, \\mathrm{softmax}(s/T))

    averaged over the batch; the ``T^2`` keeps gradient magnitudes comparable
    across temperatures.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: channel mean of squares, L2-normalised.

    ``(N, C, H, W) -> (N, H*W)``.
    """
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_blocks: list[torch.Tensor], teacher_blocks: list[torch.Tensor]) -> torch.Tensor:
    """Attention transfer: sum over blocks of the mean squared attention-map difference."""
    return sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student_blocks, teacher_blocks))


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas' probabilistic knowledge transfer on ``(N, D)`` features.

    Cosine similarities between the examples of a batch, mapped to [0, 1]
    and normalised per row into conditional probabilities; the loss is the
    mean of ``p_t log(p_t / p_s)`` over all pairs.
    """
    s = F.normalize(student_features.float().flatten(1), dim=1)
    t = F.normalize(teacher_features.float().flatten(1), dim=1)
    s_sim = (s @ s.T + 1.0) / 2.0
    t_sim = (t @ t.T + 1.0) / 2.0
    s_sim = s_sim / s_sim.sum(dim=1, keepdim=True)
    t_sim = t_sim / t_sim.sum(dim=1, keepdim=True)
    return torch.mean(t_sim * torch.log((t_sim + eps) / (s_sim + eps)))


class Distillation:
    """Objective for pruning with distillation from a frozen teacher.

    Parameters
    ----------
    teacher : torch.nn.Module
        The uncompressed baseline (same architecture as the student), on any
        device: it is moved to the device of the batches it is given.
    mitigation : {'kd', 'at', 'pkt', 'at_kd', 'pkt_kd'}
    temperature : float
        KD temperature ``T`` (default 4).
    gamma, alpha, beta : float, optional
        Override the weights of CE, KD and the feature loss (see module doc;
        the default AT weight scales with the input size).
    """

    def __init__(self, teacher: nn.Module, mitigation: str, *, temperature: float = 4.0,
                 gamma: float | None = None, alpha: float | None = None, beta: float | None = None):
        if mitigation not in _WEIGHTS:
            raise ValueError(f"unknown distillation {mitigation!r}; choose one of {', '.join(_WEIGHTS)}")
        self.name = mitigation
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        g, a, b = _WEIGHTS[mitigation]
        self.gamma = g if gamma is None else gamma
        self.alpha = a if alpha is None else alpha
        self.beta = beta
        self._default_beta = b
        self.temperature = float(temperature)
        self.feature = "at" if mitigation.startswith("at") else "pkt" if mitigation.startswith("pkt") else None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        teacher = _teacher_on(self.teacher, x)
        with torch.no_grad(), capture_blocks(teacher) as t_blocks:
            t_logits = teacher(x)
        with capture_blocks(model) as s_blocks:
            logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        parts = {"ce": ce.detach()}
        loss = self.gamma * ce
        if self.alpha:
            kd = kd_loss(logits, t_logits, self.temperature)
            parts["kd"] = kd.detach()
            loss = loss + self.alpha * kd
        names = list(model.block_names)
        if self.beta is None:  # scale CRD's AT weight from 32x32 inputs to these (see module doc)
            scale = x.shape[-2] * x.shape[-1] / 1024.0 if self.feature == "at" else 1.0
            self.beta = self._default_beta * scale
        if self.feature == "at":
            at = at_loss([s_blocks[n] for n in names], [t_blocks[n] for n in names])
            parts["at"] = at.detach()
            loss = loss + self.beta * at
        elif self.feature == "pkt":
            last = names[-1]
            pkt = pkt_loss(s_blocks[last].mean(dim=(2, 3)), t_blocks[last].mean(dim=(2, 3)))
            parts["pkt"] = pkt.detach()
            loss = loss + self.beta * pkt
        return loss, logits, parts


def _teacher_on(teacher: nn.Module, x: torch.Tensor) -> nn.Module:
    """The frozen teacher on the batch's device (moved there once, when training put the student elsewhere)."""
    if model_device(teacher) != x.device:
        teacher.to(x.device)
    return teacher


def pw_weights(teacher_probs: torch.Tensor, labels: torch.Tensor, *, gamma: float = 5.0, min_weight: float = 0.75) -> torch.Tensor:
    """Meyer (2023) sample weights from the unpruned model's confidence in the true class.

    .. math:: w_i = m + (1 - m)(1 - p_{i, y_i})^{\\gamma}

    so examples the unpruned model gets right with confidence weigh ``m``
    and those it fails on weigh up to 1. Defaults ``gamma=5``, ``m=0.75``
    are those of the author's released code.
    """
    p_true = teacher_probs.gather(1, labels.view(-1, 1)).view(-1)
    return min_weight + (1.0 - min_weight) * (1.0 - p_true).pow(gamma)


def pw_targets(teacher_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft targets: the unpruned model's probabilities, replaced by the one-hot label where its top class is wrong."""
    wrong = teacher_probs.argmax(1) != labels
    onehot = F.one_hot(labels, teacher_probs.shape[1]).to(teacher_probs.dtype)
    return torch.where(wrong[:, None], onehot, teacher_probs)


class PerformanceWeighted:
    """Meyer (2023)'s performance-weighted loss for fine-tuning a pruned model.

    ``loss = mean_i w_i * CE(student_i, target_i)`` with :func:`pw_weights`
    and :func:`pw_targets` computed from the frozen unpruned model on the
    same (augmented) batch.
    """

    name = "pw"

    def __init__(self, teacher: nn.Module, *, gamma: float = 5.0, min_weight: float = 0.75):
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"min_weight must be in [0, 1], got {min_weight}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.gamma, self.min_weight = float(gamma), float(min_weight)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            probs = F.softmax(_teacher_on(self.teacher, x)(x).float(), dim=1)
            weights = pw_weights(probs, y, gamma=self.gamma, min_weight=self.min_weight)
            targets = pw_targets(probs, y)
        logits = model(x)
        per_example = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
        loss = (weights * per_example).mean()
        return loss, logits, {"pw": loss.detach(), "mean_weight": weights.mean()}


def make_objective(mitigation: str | None, teacher: nn.Module | None, **options):
    """The fine-tuning objective for a mitigation name (``None``: plain cross-entropy)."""
    from .train import CrossEntropy

    if mitigation is None:
        if options:
            raise ValueError(f"options {sorted(options)} need a mitigation")
        return CrossEntropy()
    if mitigation not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {mitigation!r}; choose one of {', '.join(MITIGATIONS)} or null")
    if teacher is None:
        raise ValueError(f"mitigation {mitigation!r} needs the uncompressed baseline as teacher")
    if mitigation == "pw":
        return PerformanceWeighted(teacher, **options)
    return Distillation(teacher, mitigation, **options)

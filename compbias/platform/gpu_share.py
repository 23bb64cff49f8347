"""How much of a GPU each model task asks for under ``resources.gpus_per_task: auto``.

On a Ray cluster with GPUs, the driver first runs one probe task on a whole
GPU (:func:`run_probe_on_ray`): it builds the study's model as the tasks do,
trains it for one step at the study's batch size on a batch of the dataset's
input shape and reports the peak of allocated CUDA memory, the bytes of the
training split when the split would stay resident on the card
(:func:`compbias.jobs.pipeline.fits_on_device`) and the card's total memory
(:func:`probe_training_memory`). :func:`gpu_share` turns these into the
fraction of a GPU every task asks for (``num_gpus``), so that several small
models train on one card at once; :func:`resolve_gpu_share` makes the
decision, and falls back to one GPU per task, with a warning naming why,
whenever the probe fails. A cluster without GPUs, or a fixed
``gpus_per_task``, runs no probe.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from compbias.platform.config import StudySpec, parse_study

__all__ = [
    "CUDA_CONTEXT_BYTES", "HEADROOM", "MAX_TASKS_PER_GPU", "PROBE_TIMEOUT_S", "MemoryProbe", "GpuShareDecision",
    "gpu_share", "probe_training_memory", "run_probe_on_ray", "resolve_gpu_share",
]

#: Memory a CUDA context takes outside torch's allocator (not in ``max_memory_allocated``), per task.
CUDA_CONTEXT_BYTES = 500 * 2**20
#: Factor on a task's measured need: allocator fragmentation, cuDNN autotuning, a distillation teacher's weights.
HEADROOM = 1.5
#: At most this many tasks share one GPU (the share is at least ``1 / MAX_TASKS_PER_GPU``).
MAX_TASKS_PER_GPU = 16
#: Seconds the driver waits for the probe (it loads the dataset, which may be downloaded first).
PROBE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class MemoryProbe:
    """What one training step of the study's model takes on a device.

    Attributes
    ----------
    device : str
        Where the step ran (``cuda:0 (NVIDIA H200)``, ``cpu``).
    batch_size : int
    param_grad_bytes : int
        Parameters and their gradients after the step (measurable on any device).
    split_bytes : int
        Bytes of the training split's images as held in memory (0 when the
        dataset does not hold them as one tensor).
    resident : bool
        Whether training would keep the split on ``device`` (always on the CPU).
    peak_bytes : int or None
        ``torch.cuda.max_memory_allocated`` over building the model and the
        step; None off CUDA (not measured, not guessed).
    total_bytes : int or None
        The card's total memory; None off CUDA.
    """

    device: str
    batch_size: int
    param_grad_bytes: int
    split_bytes: int
    resident: bool
    peak_bytes: int | None = None
    total_bytes: int | None = None


@dataclass(frozen=True)
class GpuShareDecision:
    """The share chosen by :func:`resolve_gpu_share`, and what it was chosen from.

    Attributes
    ----------
    share : float
        GPUs per task (``num_gpus``): ``1.0`` after a failed probe.
    probe : MemoryProbe or None
        None when the probe failed.
    error : str or None
        Why the probe failed (``Type: message``), else None.
    """

    share: float
    probe: MemoryProbe | None = None
    error: str | None = None

    def params(self) -> dict[str, str]:
        """The decision as MLflow params of the study's parent run (``resources.gpu_share``, ``resources.gpu_probe.*``)."""
        out = {"resources.gpu_share": f"{self.share:g}"}
        if self.probe is not None:
            p = self.probe
            out.update({
                "resources.gpu_probe.device": p.device,
                "resources.gpu_probe.peak_bytes": str(p.peak_bytes),
                "resources.gpu_probe.split_bytes": str(p.split_bytes if p.resident else 0),
                "resources.gpu_probe.total_bytes": str(p.total_bytes),
            })
        if self.error is not None:
            out["resources.gpu_probe.error"] = self.error[:500]
        return out

    def describe(self) -> str:
        """One line for the console."""
        if self.probe is None:
            return f"gpus_per_task: auto: 1 GPU per task (the memory probe failed: {self.error})"
        p, gib = self.probe, 2**30
        split = f"{p.split_bytes / gib:.2f} GiB resident" if p.resident else "streamed"
        return (f"gpus_per_task: auto: {self.share:g} GPU per task ({round(1 / self.share)} per GPU); one training step "
                f"at batch {p.batch_size} on {p.device} peaked at {p.peak_bytes / gib:.2f} GiB, training split {split}, "
                f"card {p.total_bytes / gib:.1f} GiB")


def gpu_share(peak_bytes: int, split_bytes: int, total_bytes: int, *, context_bytes: int = CUDA_CONTEXT_BYTES,
              headroom: float = HEADROOM, max_tasks: int = MAX_TASKS_PER_GPU) -> float:
    """The fraction of a GPU one task asks for, from its measured memory.

    The rule: a task needs ``need = (peak_bytes + split_bytes + context_bytes) * headroom``
    bytes; ``k = floor(total_bytes / need)`` tasks fit on the card, at most
    ``max_tasks``; the share is ``1 / k`` (the smallest ``1/k`` that is at least
    ``need / total_bytes``), rounded down to Ray's resolution of 0.0001 so
    that ``k`` shares fit on one GPU; ``1.0`` when not even two fit.

    Parameters
    ----------
    peak_bytes : int
        Peak allocated CUDA memory of one training step (model, optimizer, activations, the batch).
    split_bytes : int
        The training split held on the card (0 when it streams).
    total_bytes : int
        The card's total memory.
    context_bytes : int
        A CUDA context per task (default :data:`CUDA_CONTEXT_BYTES`, 500 MiB).
    headroom : float
        Safety factor (default :data:`HEADROOM`, 1.5).
    max_tasks : int
        Tasks per GPU at most (default :data:`MAX_TASKS_PER_GPU`, 16).

    Returns
    -------
    float
        In ``[~1 / max_tasks, 1]``: 1, 0.5, 0.3333, 0.25, ..., 0.0625.

    Raises
    ------
    ValueError
        Negative sizes, ``total_bytes <= 0``, ``headroom <= 0`` or ``max_tasks < 1``.

    Examples
    --------
    >>> gpu_share(4 * 2**30, 0, 12 * 2**30, context_bytes=0)   # needs 6 GiB of 12
    0.5
    """
    if min(peak_bytes, split_bytes, context_bytes) < 0 or total_bytes <= 0 or headroom <= 0 or max_tasks < 1:
        raise ValueError(f"gpu_share needs sizes >= 0, total_bytes > 0, headroom > 0 and max_tasks >= 1; got peak={peak_bytes}, "
                         f"split={split_bytes}, context={context_bytes}, total={total_bytes}, headroom={headroom}, max_tasks={max_tasks}")
    need = (peak_bytes + split_bytes + context_bytes) * headroom
    k = max_tasks if need == 0 else min(max_tasks, math.floor(total_bytes / need))
    if k <= 1:
        return 1.0
    return math.floor(10_000 / k) / 10_000


def probe_training_memory(spec_data: dict[str, Any], device: str | None = None) -> MemoryProbe:
    """Train the study's model for one step on a batch of the dataset's input shape, and measure it.

    The model is built as the tasks build it (``compbias.jobs.build_model``
    with the study's ``model`` section, seed 0) and trained by
    ``compbias.jobs.train_model`` (the tasks' loop: autocast and channels-last
    on CUDA) for one epoch of one batch of ``train.batch_size`` zero images in
    the training split's dtype.

    Parameters
    ----------
    spec_data : dict
        The resolved study (``StudySpec.resolved()``).
    device : str, optional
        Default: CUDA when present, else CPU. Off CUDA only ``param_grad_bytes``,
        ``split_bytes`` and ``resident`` are measured.

    Returns
    -------
    MemoryProbe
    """
    import torch

    from compbias import jobs
    from compbias.jobs.pipeline import fits_on_device
    from compbias.platform.tasks import study_dataset

    spec = parse_study(spec_data, source="gpu memory probe")
    device = jobs.resolve_device(device)
    bundle = study_dataset(spec)
    images = getattr(bundle.train, "images", None)
    split_bytes = int(images.numel() * images.element_size()) if images is not None else 0
    resident = images is not None and fits_on_device(split_bytes, device)
    bs = int(spec.train.batch_size)
    if images is not None:
        dtype = images.dtype
    elif hasattr(bundle.train, "raw_batch") and len(bundle.train):  # a split left in its files: decoded uint8
        dtype = bundle.train.raw_batch([0])[0].dtype
    else:
        dtype = torch.float32
    scale = float(getattr(bundle.train, "scale", 1.0))
    one_batch = dataclasses.replace(bundle, train=jobs.TensorImageDataset(
        torch.zeros((bs, *bundle.input_shape), dtype=dtype), torch.zeros(bs, dtype=torch.int64), scale))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = jobs.build_model(spec.model.arch, bundle.n_classes, bundle.input_shape, spec.model.width, seed=0,
                             kwargs=spec.model.kwargs, blocks=spec.model.blocks)
    train = spec.train
    model, _ = jobs.train_model(model, one_batch, epochs=1, batch_size=bs, lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay, seed=0, device=device, log=None)
    param_grad = sum(p.numel() * p.element_size() + (0 if p.grad is None else p.grad.numel() * p.grad.element_size())
                     for p in model.parameters())
    peak = total = None
    where = str(device)
    if cuda:
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        props = torch.cuda.get_device_properties(device)
        total, where = int(props.total_memory), f"{device} ({props.name})"
        del model
        torch.cuda.empty_cache()
    return MemoryProbe(device=where, batch_size=bs, param_grad_bytes=int(param_grad), split_bytes=split_bytes,
                       resident=bool(resident), peak_bytes=peak, total_bytes=total)


def run_probe_on_ray(ray, spec_data: dict[str, Any], *, num_cpus: float = 1,
                     timeout_s: float = PROBE_TIMEOUT_S) -> MemoryProbe:
    """Run :func:`probe_training_memory` as one Ray task on a whole GPU.

    Parameters
    ----------
    ray : module
        The connected ``ray`` module.
    spec_data : dict
    num_cpus : float
        The task's CPUs (the study's ``cpus_per_task``).
    timeout_s : float

    Returns
    -------
    MemoryProbe

    Raises
    ------
    TimeoutError
        The probe did not finish within ``timeout_s`` (it is cancelled).
    Exception
        The probe's own error, or Ray's.
    """
    # max_calls=1: the worker exits afterwards, giving back its CUDA context before the tasks start
    remote = ray.remote(num_gpus=1, num_cpus=num_cpus, max_calls=1, max_retries=0)(probe_training_memory)
    ref = remote.options(name="compbias-gpu-probe").remote(spec_data)
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"no answer within {timeout_s:g} s") from None


def resolve_gpu_share(spec: StudySpec, cluster_gpus: float, run_probe: Callable[[], MemoryProbe],
                      log: Callable[[str], None] | None = None) -> GpuShareDecision | None:
    """Decide the GPU share of ``gpus_per_task: auto`` on a cluster with ``cluster_gpus`` GPUs.

    Parameters
    ----------
    spec : StudySpec
    cluster_gpus : float
        ``ray.cluster_resources()["GPU"]`` (0 without GPUs).
    run_probe : callable
        ``run_probe() -> MemoryProbe``, e.g. :func:`run_probe_on_ray` bound to the study.
    log : callable, optional
        Receives the one line that says what was chosen.

    Returns
    -------
    GpuShareDecision or None
        None, and no probe run, unless ``gpus_per_task`` is ``auto`` and the
        cluster has at least one GPU. A probe that raises, or that ran without
        CUDA, gives share 1.0 and a ``RuntimeWarning`` naming why.
    """
    if spec.resources.gpus_per_task != "auto" or cluster_gpus < 1:
        return None
    try:
        probe = run_probe()
        if probe.peak_bytes is None or probe.total_bytes is None:
            raise RuntimeError(f"the probe ran on {probe.device}, not on a CUDA device (torch in the worker sees no GPU)")
        decision = GpuShareDecision(gpu_share(probe.peak_bytes, probe.split_bytes if probe.resident else 0,
                                              probe.total_bytes), probe)
    except Exception as exc:
        decision = GpuShareDecision(1.0, error=f"{type(exc).__name__}: {exc}")
        warnings.warn(f"gpus_per_task: auto: the GPU memory probe failed ({decision.error}); every task asks for 1 GPU",
                      RuntimeWarning, stacklevel=2)
        return decision
    if log is not None:
        log(decision.describe())
    return decision

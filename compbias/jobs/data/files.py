"""A split whose images stay in their files and are decoded when a batch is read.

For datasets whose decoded images do not fit in memory (full CelebA at 128
px is 10 GB as ``uint8``, an ImageNet-style folder far more):
:func:`compbias.jobs.load_dataset` returns this instead of a
:class:`~compbias.jobs.data.bundle.TensorImageDataset` when the decoded
splits would take more than :data:`MEMORY_FRACTION` of the available memory,
or when asked to (``in_memory=False``). Training streams it through a
``DataLoader`` whose worker processes decode batches (pinned memory and
prefetch on CUDA: :class:`compbias.jobs.pipeline.StreamedBatches`);
evaluation reads it batch by batch. The images, and so the models, are the
same as with the in-memory split: the same decoder, the same batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .images import decode_image, decode_images

__all__ = ["FileImageDataset", "MEMORY_FRACTION", "available_memory", "stream_from_files"]

#: Decoded splits may take at most this share of the memory available when the dataset is
#: loaded; beyond it they stay in their files. Each process that loads the dataset (one per
#: Ray task slot on a node) holds its own copy, hence a quarter, not all of it.
MEMORY_FRACTION = 0.25


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def stream_from_files(decoded_bytes: int, in_memory: bool | None) -> bool:
    """Whether splits of ``decoded_bytes`` stay in their files: ``in_memory`` when given, else by :data:`MEMORY_FRACTION`."""
    if in_memory is not None:
        return not in_memory
    available = available_memory()
    return available is not None and decoded_bytes > MEMORY_FRACTION * available


class FileImageDataset(Dataset):
    """Images read from their files on every access, as ``uint8`` ``(3, H, W)`` scaled by ``scale``.

    The same reading protocol as :class:`~compbias.jobs.data.bundle.TensorImageDataset`
    (``labels``, ``scale``, ``len``, ``[i]``, :meth:`batch`, :meth:`raw_batch`), without an
    ``images`` tensor.

    Parameters
    ----------
    files : sequence of path
        One image file per example.
    labels : array-like of int
        ``(N,)`` class ids.
    image_size : int or None
        Side of the square the images are cropped and resized to; None keeps
        their size, which must then be the same for every image.
    scale : float
        Factor applied when an item is read (``1/255``).
    shape : tuple of int, optional
        ``(3, H, W)`` of one decoded image; default: decode the first file.
    """

    def __init__(self, files: Sequence[str | Path], labels, image_size: int | None, scale: float = 1 / 255,
                 shape: tuple[int, int, int] | None = None):
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if self.labels.shape != (len(self.files),):
            raise ValueError(f"{len(self.files)} files but labels of shape {tuple(self.labels.shape)}: give one label per file")
        self.image_size = image_size
        self.scale = float(scale)
        if shape is None and self.files:
            shape = tuple(int(s) for s in decode_image(self.files[0], image_size).shape)
        self.shape = tuple(shape) if shape is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def _indices(self, index) -> list[int]:
        return torch.arange(len(self.files))[index].reshape(-1).tolist()

    def raw_batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 (n, 3, H, W), labels int64 (n,))`` of a batch of indices (a list, a tensor or a slice).

        Decoded on up to 4 threads in the main process, on one inside a
        ``DataLoader`` worker (the loader runs several workers already).

        Raises
        ------
        ValueError
            An image whose size differs from the others' when no ``image_size`` is set.
        """
        idx = self._indices(index)
        if not idx:
            return torch.zeros((0, *(self.shape or (3, 1, 1))), dtype=torch.uint8), self.labels[:0]
        files = [self.files[i] for i in idx]
        images = decode_images(files, self.image_size, threads=1 if get_worker_info() is not None else None)
        if self.shape is not None and images.shape[1:] != self.shape:
            raise ValueError(f"images have different sizes ({self.files[0].name}: {self.shape[2]}x{self.shape[1]}, "
                             f"{files[0].name} and others: {images.shape[3]}x{images.shape[2]}); set dataset.image_size")
        return torch.from_numpy(images), self.labels[torch.as_tensor(idx)]

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32, y int64)`` of a batch of indices, scaled as the in-memory split's."""
        images, labels = self.raw_batch(index)
        return images.float() * self.scale, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.raw_batch([int(index)])
        return images[0].float() * self.scale, int(labels[0])

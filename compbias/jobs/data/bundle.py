"""The containers every loader returns: in-memory image tensors and the bundle describing a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

__all__ = ["DatasetBundle", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, returned as scaled float tensors.

    Parameters
    ----------
    images : torch.Tensor
        ``(N, C, H, W)``, ``uint8`` (decoded images) or ``float32``.
    labels : torch.Tensor
        ``(N,)`` int64 class ids.
    scale : float
        Factor applied when an item is read (``1/255`` for ``uint8`` images),
        so that inputs lie in ``[0, 1]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must have one entry per image")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() * self.scale, int(self.labels[index])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` for a batch of indices as float32 / int64 tensors."""
        return self.images[index].float() * self.scale, self.labels[index]

    def raw_batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of a batch of indices, the images in their stored dtype, not scaled."""
        idx = torch.as_tensor(index, dtype=torch.int64) if not isinstance(index, slice) else index
        return self.images[idx], self.labels[idx]


@dataclass
class DatasetBundle:
    """Everything a job needs to know about one dataset configuration.

    Attributes
    ----------
    kind : str
        One of :data:`DATASET_KINDS`.
    train, test : TensorImageDataset
        ``(x, y)`` datasets; ``x`` is float32 ``(C, H, W)`` in ``[0, 1]``.
        ``test[i]`` is the example whose ``example_id`` is ``i``.
    n_classes : int
    class_names : list of str
    input_shape : tuple of int
        ``(C, H, W)``.
    test_frame : pandas.DataFrame
        One row per test example in ``example_id`` order: ``example_id``
        (int64, 0..N-1), ``label``, one int column per group attribute and
        ``path`` (relative to the root) when images come from files.
    train_frame : pandas.DataFrame
        The same for the training split (its ``example_id`` numbers training
        examples, independently of the test ids).
    group_columns : list of str
    group_levels : dict
        For each group column, the original value of every integer code.
    positive_class : int or None
        The class whose rates are reported per group for binary tasks.
    augment : bool
        Whether training should use random crops and flips (natural images).
    options : dict
        The options the bundle was built with (for the record).
    """

    kind: str
    train: TensorImageDataset
    test: TensorImageDataset
    n_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    test_frame: pd.DataFrame
    train_frame: pd.DataFrame
    group_columns: list[str]
    group_levels: dict[str, list[Any]] = field(default_factory=dict)
    positive_class: int | None = None
    augment: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def test_groups(self) -> np.ndarray:
        """Group codes of the test split as an ``(N, n_groups)`` int64 array."""
        return self.test_frame[self.group_columns].to_numpy(dtype=np.int64)


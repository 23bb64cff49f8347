"""Datasets: deterministic splits, stable example ids, decoded-once image tensors.

Every loader returns a :class:`DatasetBundle` whose ``train`` and ``test`` are
in-memory tensor datasets (images decoded once into a ``uint8`` tensor) or, for
image files too large to hold decoded, :class:`FileImageDataset` (decoded per
batch; ``load_dataset(..., in_memory=...)``), whose
``test_frame`` lists the test examples in a stable order with their
``example_id`` (0..N-1), label and integer-coded group columns, so that the
predictions of every model of a study line up example by example.

Supported layouts (see ``docs/methods.md`` for the details and choices):

``digits``
    scikit-learn's shipped 8x8 digits (no download); derived group ``ink``.
``imagefolder``
    ``root/<class>/*.png`` or ``root/train/<class>/...`` + ``root/test/<class>/...``,
    with an optional attributes CSV keyed by the image path relative to ``root``.
``celeba``
    the official layout: ``img_align_celeba/``, ``list_attr_celeba.txt`` and,
    when present, ``list_eval_partition.txt``.
``cifar10`` / ``cifar100``
    torchvision's python-pickle release under ``root`` (downloaded only when
    ``allow_download`` is true).
"""

from __future__ import annotations

from ..vocabulary import DATASET_KINDS
from .bundle import DatasetBundle, TensorImageDataset
from .files import FileImageDataset
from .layouts import IMAGE_EXTENSIONS
from .load import load_dataset

__all__ = [
    "DATASET_KINDS",
    "DatasetBundle",
    "FileImageDataset",
    "TensorImageDataset",
    "load_dataset",
]

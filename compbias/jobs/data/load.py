"""Loading a dataset layout into a :class:`~compbias.jobs.data.DatasetBundle`: the one entry point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from compbias._locations import CACHE_ENV
from compbias._locations import cache_dir as _cache_root  # the parameter cache_dir shadows the name

from ..vocabulary import DATASET_KINDS
from .bundle import DatasetBundle, TensorImageDataset
from .files import FileImageDataset, stream_from_files
from .images import decode_image, pool_images
from .layouts import celeba_pools, cifar_pools, digits_pools, imagefolder_pools
from .pools import (
    apply_imbalance, check_disjoint_classes, encode_levels, frame, imbalance_entries, resolve_positive_class,
    stratified_choice, take,
)

__all__ = ["load_dataset"]


def load_dataset(
    kind: str,
    *,
    root: str | os.PathLike | None = None,
    target: str | None = None,
    groups: Sequence[str] | None = None,
    attributes_csv: str | os.PathLike | None = None,
    positive_class: int | str | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    imbalance: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    in_memory: bool | None = None,
) -> DatasetBundle:
    """Load a dataset layout into a :class:`DatasetBundle`.

    Parameters
    ----------
    kind : {'digits', 'imagefolder', 'celeba', 'cifar10', 'cifar100'}
    root : path, optional
        Dataset root (all kinds but ``digits``).
    target : str, optional
        ``celeba``: the attribute used as the binary label (e.g. ``Blond_Hair``).
    groups : list of str, optional
        Group attributes carried into ``test_frame``. ``digits`` offers the
        derived ``ink`` (default ``['ink']``); ``celeba`` any of its 40
        attributes; ``imagefolder`` any column of ``attributes_csv``.
    attributes_csv : path, optional
        ``imagefolder``: CSV with a ``path`` column (image path relative to
        ``root``) and one column per attribute. Relative CSV locations are
        resolved against ``root``; every path must stay inside ``root``.
    positive_class : int or str, optional
        Class id or class name reported per group in binary tasks
        (``celeba`` defaults to 1, the attribute being present).
    image_size : int, optional
        Side of the square images (center crop to a square, then resize).
        Without it all images of a layout must share one size.
    test_fraction : float
        Share of examples held out when the layout has no split of its own.
    split_seed : int
        Seed of every random choice made here (split, subsampling, imbalance).
    max_train, max_test : int, optional
        Stratified seeded subsample sizes.
    imbalance : dict or list of dict, optional
        ``{'classes': [3, 5], 'keep': 0.1}`` keeps 10% of the training examples
        of classes 3 and 5; ``{'group': {'Male': 1}, 'keep': 0.2}`` keeps 20% of
        the training examples whose attributes all match. A list applies each
        entry in turn, e.g. the biased CIFAR of "Simon Says" with classes kept
        at 10%, 20% and 50%: ``[{'classes': [1], 'keep': 0.1}, {'classes': [3],
        'keep': 0.2}, {'classes': [5], 'keep': 0.5}]``; a class named by two
        class entries is an error.
    allow_download : bool
        ``cifar10`` / ``cifar100`` only: download when the files are missing.
    cache_dir : path, optional
        Directory for an on-disk ``.npy`` cache of decoded images, keyed by a
        hash of the files and options (default: ``$COMPBIAS_CACHE_DIR/datasets`` if that variable is set, else none).
        Decoded images are also kept in memory for the life of the process.
    in_memory : bool, optional
        Hold the decoded images of an image-file dataset (``imagefolder``,
        ``celeba``) in memory (``True``), or leave them in their files and
        decode each batch when it is read (``False``:
        :class:`compbias.jobs.data.FileImageDataset`; training streams it
        through a ``DataLoader``'s workers). Default: in memory unless the
        decoded splits would take more than
        :data:`compbias.jobs.data.files.MEMORY_FRACTION` of the memory
        available now. Either way the batches, and so the models, are the
        same. ``digits`` and CIFAR arrive decoded and are always in memory.

    Returns
    -------
    DatasetBundle

    Raises
    ------
    ValueError
        Unknown kind, bad option value, missing attribute, a path escaping
        the root, images of different sizes without ``image_size``.
    FileNotFoundError
        Missing root, image, attribute file or CIFAR files.

    Examples
    --------
    >>> bundle = load_dataset("digits", max_train=200)
    >>> bundle.input_shape
    (1, 8, 8)
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    for name, value in (("max_train", max_train), ("max_test", max_test), ("image_size", image_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
    groups = list(groups) if groups is not None else None
    options = dict(
        root=str(root) if root is not None else None, target=target, groups=groups,
        attributes_csv=str(attributes_csv) if attributes_csv is not None else None,
        positive_class=positive_class, image_size=image_size, test_fraction=float(test_fraction),
        split_seed=int(split_seed), max_train=max_train, max_test=max_test,
        imbalance=imbalance_entries(imbalance), allow_download=bool(allow_download),
    )
    if kind != "digits" and root is None:
        raise ValueError(f"dataset kind {kind!r} needs a root directory (dataset.root or --data-root)")
    if kind != "celeba" and target is not None:
        raise ValueError(f"'target' applies to celeba only, not to {kind!r}")
    if kind != "imagefolder" and attributes_csv is not None:
        raise ValueError(f"'attributes_csv' applies to imagefolder only, not to {kind!r}")
    if kind not in ("cifar10", "cifar100") and allow_download:
        raise ValueError(f"'allow_download' applies to cifar10/cifar100 only, not to {kind!r}")
    rng_seed = int(split_seed)
    root_path = Path(root).expanduser().resolve() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} does not exist or is not a directory")

    if kind == "digits":
        groups = ["ink"] if groups is None else groups
        train, test, class_names, scale = digits_pools(test_fraction, rng_seed)
    elif kind == "imagefolder":
        groups = [] if groups is None else groups
        train, test, class_names = imagefolder_pools(root_path, attributes_csv, groups, test_fraction, rng_seed)
        scale = 1.0 / 255.0
    elif kind == "celeba":
        groups = [] if groups is None else groups
        train, test, class_names = celeba_pools(root_path, target, groups, test_fraction, rng_seed)
        scale = 1.0 / 255.0
    else:
        groups = [] if groups is None else groups
        train, test, class_names = cifar_pools(kind, root_path, allow_download)
        scale = 1.0 / 255.0
    options["groups"] = list(groups)

    for pool in (train, test):
        for g in groups:
            if g not in pool.attrs:
                available = sorted(a for a in pool.attrs)
                raise ValueError(
                    f"group attribute {g!r} is not available for dataset kind {kind!r}; "
                    f"available: {available if available else 'none (give an attributes CSV)'}"
                )

    n_classes = len(class_names)
    if imbalance is not None:
        entries = imbalance_entries(imbalance)
        check_disjoint_classes(entries, class_names)
        for i, entry in enumerate(entries):
            # entry i draws from its own stream (the first keeps the single-entry one)
            train = apply_imbalance(train, entry, class_names, rng_seed + 100 * i)
    if max_train is not None and max_train < len(train.keys):
        train = take(train, stratified_choice(train.labels, max_train, rng_seed + 1))
    if max_test is not None and max_test < len(test.keys):
        test = take(test, stratified_choice(test.labels, max_test, rng_seed + 2))
    if len(train.keys) == 0 or len(test.keys) == 0:
        raise ValueError(f"empty split after selection: {len(train.keys)} train / {len(test.keys)} test examples")

    first = None  # the decoded shape of the first training image, when the memory rule needs it
    if train.images is not None or in_memory is True:
        stream = False
    else:
        first = tuple(int(s) for s in decode_image(root_path / train.paths[0], image_size).shape)
        stream = stream_from_files(int(np.prod(first)) * (len(train.paths) + len(test.paths)), in_memory)
    if stream:
        train_ds = FileImageDataset([root_path / p for p in train.paths], train.labels, image_size, scale, shape=first)
        test_ds = FileImageDataset([root_path / p for p in test.paths], test.labels, image_size, scale)
        shape, test_shape = train_ds.shape, test_ds.shape
    else:
        if cache_dir is None and os.environ.get(CACHE_ENV):
            cache_dir = str(_cache_root("datasets"))
        train_x = pool_images(train, root_path, image_size, cache_dir)
        test_x = pool_images(test, root_path, image_size, cache_dir)
        train_ds = TensorImageDataset(torch.from_numpy(train_x), torch.from_numpy(train.labels), scale)
        test_ds = TensorImageDataset(torch.from_numpy(test_x), torch.from_numpy(test.labels), scale)
        shape, test_shape = tuple(train_x.shape[1:]), tuple(test_x.shape[1:])
    if shape != test_shape:
        raise ValueError(f"train images are {shape} but test images {test_shape}; set dataset.image_size")

    levels: dict[str, list[Any]] = {}
    train_codes: dict[str, np.ndarray] = {}
    test_codes: dict[str, np.ndarray] = {}
    for g in groups:
        levels[g], (train_codes[g], test_codes[g]) = encode_levels(train.attrs[g], test.attrs[g])

    pos = resolve_positive_class(positive_class, class_names, default=1 if kind == "celeba" else None)
    return DatasetBundle(
        kind=kind,
        train=train_ds,
        test=test_ds,
        n_classes=n_classes,
        class_names=list(class_names),
        input_shape=tuple(int(s) for s in shape),
        test_frame=frame(test, groups, test_codes),
        train_frame=frame(train, groups, train_codes),
        group_columns=list(groups),
        group_levels=levels,
        positive_class=pos,
        augment=kind != "digits",
        options=options,
    )

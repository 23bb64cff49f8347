"""Datasets: deterministic splits, stable example ids, decoded-once image tensors.

Every loader returns a :class:`DatasetBundle` whose ``train`` and ``test`` are
in-memory tensor datasets (images decoded once into a ``uint8`` tensor), whose
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

import collections
import concurrent.futures
import csv
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from compbias._locations import CACHE_ENV
from compbias._locations import cache_dir as _cache_root  # the parameter cache_dir shadows the name

__all__ = [
    "DATASET_KINDS",
    "DatasetBundle",
    "TensorImageDataset",
    "load_dataset",
]

from .vocabulary import DATASET_KINDS
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_CACHE_VERSION = 1


# --------------------------------------------------------------------------
# Public containers
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Internal catalogue: what a layout provides before splitting and decoding
# --------------------------------------------------------------------------


@dataclass
class _Pool:
    """Candidate examples of one split, in stable order."""

    keys: list[str]  # stable sort key: relative path, or zero-padded index
    labels: np.ndarray  # int64
    attrs: dict[str, np.ndarray]  # raw attribute values, one array per name
    paths: list[str] | None = None  # relative paths when images are files
    images: np.ndarray | None = None  # already-decoded uint8 (N, C, H, W) or float


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
        imbalance=_imbalance_entries(imbalance), allow_download=bool(allow_download),
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
        train, test, class_names, scale = _digits_pools(test_fraction, rng_seed)
    elif kind == "imagefolder":
        groups = [] if groups is None else groups
        train, test, class_names = _imagefolder_pools(root_path, attributes_csv, groups, test_fraction, rng_seed)
        scale = 1.0 / 255.0
    elif kind == "celeba":
        groups = [] if groups is None else groups
        train, test, class_names = _celeba_pools(root_path, target, groups, test_fraction, rng_seed)
        scale = 1.0 / 255.0
    else:
        groups = [] if groups is None else groups
        train, test, class_names = _cifar_pools(kind, root_path, allow_download)
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
        entries = _imbalance_entries(imbalance)
        _check_disjoint_classes(entries, class_names)
        for i, entry in enumerate(entries):
            # entry i draws from its own stream (the first keeps the single-entry one)
            train = _apply_imbalance(train, entry, class_names, rng_seed + 100 * i)
    if max_train is not None and max_train < len(train.keys):
        train = _take(train, _stratified_choice(train.labels, max_train, rng_seed + 1))
    if max_test is not None and max_test < len(test.keys):
        test = _take(test, _stratified_choice(test.labels, max_test, rng_seed + 2))
    if len(train.keys) == 0 or len(test.keys) == 0:
        raise ValueError(f"empty split after selection: {len(train.keys)} train / {len(test.keys)} test examples")

    if cache_dir is None and os.environ.get(CACHE_ENV):
        cache_dir = str(_cache_root("datasets"))
    train_x = _pool_images(train, root_path, image_size, cache_dir)
    test_x = _pool_images(test, root_path, image_size, cache_dir)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"train images are {tuple(train_x.shape[1:])} but test images {tuple(test_x.shape[1:])}; "
            "set dataset.image_size"
        )

    levels: dict[str, list[Any]] = {}
    train_codes: dict[str, np.ndarray] = {}
    test_codes: dict[str, np.ndarray] = {}
    for g in groups:
        levels[g], (train_codes[g], test_codes[g]) = _encode_levels(train.attrs[g], test.attrs[g])

    pos = _resolve_positive_class(positive_class, class_names, default=1 if kind == "celeba" else None)
    return DatasetBundle(
        kind=kind,
        train=TensorImageDataset(torch.from_numpy(train_x), torch.from_numpy(train.labels), scale),
        test=TensorImageDataset(torch.from_numpy(test_x), torch.from_numpy(test.labels), scale),
        n_classes=n_classes,
        class_names=list(class_names),
        input_shape=tuple(int(s) for s in train_x.shape[1:]),
        test_frame=_frame(test, groups, test_codes),
        train_frame=_frame(train, groups, train_codes),
        group_columns=list(groups),
        group_levels=levels,
        positive_class=pos,
        augment=kind != "digits",
        options=options,
    )


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------


def _digits_pools(test_fraction: float, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]  # values 0..16
    labels = digits.target.astype(np.int64)
    keys = [f"{i:06d}" for i in range(len(labels))]
    test_idx = _stratified_choice(labels, int(round(len(labels) * test_fraction)), seed)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    ink = images.reshape(len(labels), -1).sum(axis=1)
    # `ink` = 1 when an image holds more ink than the median training image.
    threshold = float(np.median(ink[train_idx]))
    ink_group = (ink > threshold).astype(np.int64)
    pool = _Pool(keys=keys, labels=labels, attrs={"ink": ink_group}, images=images)
    names = [str(c) for c in range(10)]
    return _take(pool, train_idx), _take(pool, test_idx), names, 1.0 / 16.0


def _list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder_pools(root: Path, attributes_csv, groups, test_fraction: float, seed: int):
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    split_dirs = [root / "train", root / "test"] if has_split else [root]
    class_names = _class_dirs(split_dirs[0])
    if not class_names:
        raise FileNotFoundError(f"no class subfolders under {split_dirs[0]}; expected <root>/<class>/<image>")
    if has_split:
        extra = sorted(set(_class_dirs(root / "test")) - set(class_names))
        if extra:
            raise ValueError(f"test split has classes missing from train: {extra}")
    class_index = {c: i for i, c in enumerate(class_names)}

    def scan(split_dir: Path) -> _Pool:
        paths, labels = [], []
        for c in _class_dirs(split_dir):
            files = _list_images(split_dir / c)
            for f in files:
                if not f.resolve().is_relative_to(root):
                    raise ValueError(
                        f"image {f.relative_to(root).as_posix()!r} is a link to {f.resolve()}, outside the dataset root "
                        f"{root}; copy the file into the root or remove the link"
                    )
            paths += [f.relative_to(root).as_posix() for f in files]
            labels += [class_index[c]] * len(files)
        order = np.argsort(np.array(paths, dtype=object), kind="stable")
        paths = [paths[i] for i in order]
        return _Pool(keys=paths, labels=np.asarray(labels, dtype=np.int64)[order], attrs={}, paths=paths)

    if has_split:
        train, test = scan(root / "train"), scan(root / "test")
    else:
        full = scan(root)
        if len(full.keys) == 0:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        test_idx = _stratified_choice(full.labels, int(round(len(full.keys) * test_fraction)), seed)
        train_idx = np.setdiff1d(np.arange(len(full.keys)), test_idx)
        train, test = _take(full, train_idx), _take(full, test_idx)
    for split, pool in (("train", train), ("test", test)):
        if len(pool.keys) == 0:
            raise FileNotFoundError(f"no images found in the {split} split under {root}")

    if attributes_csv is not None:
        table = _read_attributes_csv(root, attributes_csv)
        for pool in (train, test):
            missing = [p for p in pool.paths if p not in table]
            if missing:
                raise ValueError(
                    f"attributes CSV has no row for {len(missing)} image(s), e.g. {missing[0]!r}; "
                    "add a row per image (path relative to the dataset root)"
                )
            columns = next(iter(table.values())).keys()
            pool.attrs = {c: np.asarray([table[p][c] for p in pool.paths], dtype=object) for c in columns}
    elif groups:
        raise ValueError(f"group attributes {list(groups)} need an attributes CSV (dataset.attributes_csv)")
    return train, test, class_names


def _confined(root: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse anything that escapes it."""
    candidate = Path(relative)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root):
        raise ValueError(f"{what} {relative!r} escapes the dataset root {root}; give a path inside the root")
    return resolved


def _read_attributes_csv(root: Path, attributes_csv) -> dict[str, dict[str, Any]]:
    csv_path = Path(attributes_csv).expanduser().resolve() if Path(attributes_csv).is_absolute() else root / attributes_csv
    if not csv_path.resolve().is_relative_to(root):
        raise ValueError(f"attributes CSV {attributes_csv!s} escapes the dataset root {root}; keep it inside the root")
    csv_path = csv_path.resolve()
    if not csv_path.is_file():
        raise FileNotFoundError(f"attributes CSV {csv_path} does not exist")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "path" not in frame.columns:
        raise ValueError(f"attributes CSV {csv_path} needs a 'path' column (image path relative to the root)")
    table: dict[str, dict[str, Any]] = {}
    columns = [c for c in frame.columns if c != "path"]
    for row in frame.itertuples(index=False):
        rel = row[frame.columns.get_loc("path")]
        resolved = _confined(root, rel, "attributes CSV path")
        if not resolved.is_file():
            raise FileNotFoundError(f"attributes CSV lists {rel!r}, which is not a file under {root}")
        key = resolved.relative_to(root).as_posix()
        if key in table:
            raise ValueError(f"attributes CSV lists {rel!r} more than once")
        table[key] = {c: _parse_value(row[frame.columns.get_loc(c)]) for c in columns}
    return table


def _parse_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return int(lowered == "true")
    return text


def _celeba_pools(root: Path, target: str | None, groups, test_fraction: float, seed: int):
    attr_file = root / "list_attr_celeba.txt"
    image_dir = root / "img_align_celeba"
    if not attr_file.is_file():
        raise FileNotFoundError(f"CelebA attribute file {attr_file} not found (official layout expected)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CelebA image folder {image_dir} not found (official layout expected)")
    with open(attr_file) as fh:
        lines = fh.read().splitlines()
    if len(lines) < 3:
        raise ValueError(f"{attr_file} is too short: expected a count line, a header and rows")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{attr_file}: first line must be the number of images, got {lines[0]!r}") from None
    names = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if declared != len(rows):
        raise ValueError(f"{attr_file}: count line says {declared} images but {len(rows)} rows follow")
    files = [r[0] for r in rows]
    bad = [r[0] for r in rows if len(r) != len(names) + 1]
    if bad:
        raise ValueError(f"{attr_file}: row for {bad[0]!r} does not have {len(names)} values")
    values = np.asarray([[int(v) for v in r[1:]] for r in rows], dtype=np.int64)
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(f"{attr_file}: attribute values must be 1 or -1")
    if target is None:
        raise ValueError("celeba needs a target attribute (dataset.target), e.g. 'Blond_Hair'")
    for a in [target, *groups]:
        if a not in names:
            raise ValueError(f"CelebA has no attribute {a!r}; available: {', '.join(names)}")
    missing = [f for f in files if not (image_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} CelebA image(s) listed in {attr_file.name} are missing from {image_dir}, e.g. {missing[0]}")
    attrs = {n: (values[:, i] > 0).astype(np.int64) for i, n in enumerate(names)}
    labels = attrs[target].copy()
    paths = [f"img_align_celeba/{f}" for f in files]
    order = np.argsort(np.array(paths, dtype=object), kind="stable")
    pool = _Pool(keys=[paths[i] for i in order], labels=labels[order], attrs={k: v[order] for k, v in attrs.items()}, paths=[paths[i] for i in order])

    partition = root / "list_eval_partition.txt"
    if partition.is_file():
        part = {}
        for ln in partition.read_text().splitlines():
            if ln.strip():
                name, p = ln.split()
                part[f"img_align_celeba/{name}"] = int(p)
        missing = [k for k in pool.keys if k not in part]
        if missing:
            raise ValueError(f"{partition.name} has no entry for {missing[0]!r} ({len(missing)} missing)")
        split = np.asarray([part[k] for k in pool.keys])
        # Official partition: 0 train, 1 validation (unused), 2 test.
        train_idx, test_idx = np.flatnonzero(split == 0), np.flatnonzero(split == 2)
    else:
        # Stratify on the target crossed with the group attributes, so rare
        # cells (e.g. blond men) keep their share in both splits.
        strata = labels[order].copy()
        for g in groups:
            strata = strata * 2 + attrs[g][order]
        test_idx = _stratified_choice(strata, int(round(len(pool.keys) * test_fraction)), seed)
        train_idx = np.setdiff1d(np.arange(len(pool.keys)), test_idx)
    return _take(pool, train_idx), _take(pool, test_idx), [f"not_{target}", target]


def _cifar_pools(kind: str, root: Path, allow_download: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    pools = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=allow_download)
        except RuntimeError as exc:
            hint = (
                "the python release (e.g. cifar-10-batches-py/) is expected under the root; "
                "set dataset.allow_download: true to fetch it, or use kind 'imagefolder' for a folder of images"
            )
            raise FileNotFoundError(f"{kind} files not found under {root}: {exc}; {hint}") from None
        images = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        n = images.shape[0]
        pools.append(_Pool(keys=[f"{i:06d}" for i in range(n)], labels=np.asarray(ds.targets, dtype=np.int64), attrs={}, images=images))
        names = list(ds.classes)
    return pools[0], pools[1], names


# --------------------------------------------------------------------------
# Selection helpers
# --------------------------------------------------------------------------


def _take(pool: _Pool, idx: np.ndarray) -> _Pool:
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    return _Pool(
        keys=[pool.keys[i] for i in idx],
        labels=pool.labels[idx],
        attrs={k: v[idx] for k, v in pool.attrs.items()},
        paths=[pool.paths[i] for i in idx] if pool.paths is not None else None,
        images=pool.images[idx] if pool.images is not None else None,
    )


def _stratified_choice(strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Choose exactly ``n`` indices, proportionally per stratum (largest remainder), seeded."""
    strata = np.asarray(strata)
    total = len(strata)
    if not 0 < n < total:
        raise ValueError(f"cannot choose {n} of {total} examples")
    rng = np.random.default_rng(seed)
    values, inverse = np.unique(strata, return_inverse=True)
    counts = np.bincount(inverse)
    exact = counts * (n / total)
    quota = np.floor(exact).astype(np.int64)
    remainder = n - quota.sum()
    order = np.lexsort((np.arange(len(values)), -(exact - quota)))
    quota[order[:remainder]] += 1
    chosen = []
    for s in range(len(values)):
        members = np.flatnonzero(inverse == s)
        chosen.append(rng.permutation(members)[: quota[s]])
    return np.sort(np.concatenate(chosen))


def _imbalance_entries(imbalance: Any) -> list[dict[str, Any]] | None:
    """``imbalance`` as a list of plain dicts (one mapping or a sequence of them)."""
    if imbalance is None:
        return None
    entries = [imbalance] if isinstance(imbalance, Mapping) else list(imbalance)
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"imbalance[{i}] must be a mapping like {{classes: [3], keep: 0.1}}, got {entry!r}")
    return [dict(entry) for entry in entries]


def _check_disjoint_classes(entries: Sequence[Any], class_names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for c in entry.get("classes") or []:
            key = class_names[c] if isinstance(c, (int, np.integer)) and 0 <= c < len(class_names) else str(c)
            if key in seen:
                raise ValueError(
                    f"imbalance: class {c!r} is named by entries {seen[key]} and {i}; give each class one keep fraction"
                )
            seen[key] = i


def _apply_imbalance(pool: _Pool, spec: Mapping[str, Any], class_names: Sequence[str], seed: int) -> _Pool:
    spec = {k: v for k, v in dict(spec).items() if v is not None}  # unused keys may be given as null
    keep = spec.pop("keep", None)
    if keep is None or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"imbalance.keep must be in (0, 1], got {keep!r}")
    if set(spec) == {"classes"}:
        classes = []
        for c in spec["classes"]:
            if isinstance(c, str) and c in class_names:
                classes.append(list(class_names).index(c))
            elif isinstance(c, (int, np.integer)) and 0 <= c < len(class_names):
                classes.append(int(c))
            else:
                raise ValueError(f"imbalance.classes: unknown class {c!r}; classes are 0..{len(class_names) - 1} or {list(class_names)}")
        affected = np.isin(pool.labels, classes)
    elif set(spec) == {"group"}:
        if not isinstance(spec["group"], Mapping) or not spec["group"]:
            raise ValueError("imbalance.group must map attribute names to values, e.g. {Male: 1}")
        affected = np.ones(len(pool.keys), dtype=bool)
        for attr, value in spec["group"].items():
            if attr not in pool.attrs:
                raise ValueError(f"imbalance.group: unknown attribute {attr!r}; available: {sorted(pool.attrs)}")
            col = pool.attrs[attr]
            affected &= np.asarray([v == value or str(v) == str(value) for v in col])
    else:
        raise ValueError(f"imbalance needs exactly one of 'classes' or 'group' besides 'keep', got keys {sorted(spec)}")
    rng = np.random.default_rng(seed + 3)
    keep_mask = np.ones(len(pool.keys), dtype=bool)
    # Keep a `keep` fraction of each affected class separately (seeded).
    for c in np.unique(pool.labels[affected]):
        members = np.flatnonzero(affected & (pool.labels == c))
        n_keep = max(1, int(round(len(members) * float(keep))))
        dropped = rng.permutation(members)[n_keep:]
        keep_mask[dropped] = False
    return _take(pool, np.flatnonzero(keep_mask))


def _encode_levels(train_values: np.ndarray, test_values: np.ndarray):
    """Integer codes for a group attribute; integers keep their value."""
    both = np.concatenate([np.asarray(train_values, dtype=object), np.asarray(test_values, dtype=object)])
    if all(isinstance(v, (int, np.integer)) for v in both):
        lo = min(int(v) for v in both) if len(both) else 0
        if lo >= 0:
            levels = list(range(int(max(int(v) for v in both)) + 1))
            return levels, (np.asarray(train_values, dtype=np.int64), np.asarray(test_values, dtype=np.int64))
    levels = sorted({v for v in both}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(levels)}
    return levels, tuple(np.asarray([index[v] for v in vals], dtype=np.int64) for vals in (train_values, test_values))


def _resolve_positive_class(value, class_names: Sequence[str], default: int | None) -> int | None:
    if value is None:
        return default if default is not None and len(class_names) == 2 else None
    if isinstance(value, str) and value in class_names:
        return list(class_names).index(value)
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"positive_class {value!r} is not a class id 0..{len(class_names) - 1} nor a class name {list(class_names)}")


def _frame(pool: _Pool, groups: Sequence[str], codes: Mapping[str, np.ndarray]) -> pd.DataFrame:
    data: dict[str, Any] = {
        "example_id": np.arange(len(pool.keys), dtype=np.int64),
        "label": pool.labels.astype(np.int64),
    }
    for g in groups:
        data[g] = codes[g]
    if pool.paths is not None:
        data["path"] = pool.paths
    return pd.DataFrame(data)


# --------------------------------------------------------------------------
# Decoding and caching
# --------------------------------------------------------------------------

_MEMORY_CACHE: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
_MEMORY_CACHE_LOCK = threading.Lock()
_MEMORY_CACHE_ENTRIES = 4


def _pool_images(pool: _Pool, root: Path | None, image_size: int | None, cache_dir) -> np.ndarray:
    if pool.images is not None:
        images = pool.images
        if image_size is not None and images.shape[-2:] != (image_size, image_size):
            t = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
            images = t.round().clamp(0, 255).to(torch.uint8).numpy() if images.dtype == np.uint8 else t.numpy()
        return np.ascontiguousarray(images)
    assert root is not None and pool.paths is not None
    files = [root / p for p in pool.paths]
    stats = [(p, f.stat().st_size, f.stat().st_mtime_ns) for p, f in zip(pool.paths, files)]
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, str(root), image_size, stats]).encode()).hexdigest()[:32]
    with _MEMORY_CACHE_LOCK:
        if key in _MEMORY_CACHE:
            _MEMORY_CACHE.move_to_end(key)
            return _MEMORY_CACHE[key]
    disk = Path(cache_dir).expanduser() / f"compbias-images-{key}.npy" if cache_dir else None
    if disk is not None and disk.is_file():
        images = np.load(disk, allow_pickle=False)
    else:
        images = _decode_all(files, image_size)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, images, allow_pickle=False)
            os.replace(tmp, disk)  # atomic: concurrent workers never read a partial file
    with _MEMORY_CACHE_LOCK:
        _MEMORY_CACHE[key] = images
        while len(_MEMORY_CACHE) > _MEMORY_CACHE_ENTRIES:
            _MEMORY_CACHE.popitem(last=False)
    return images


def _decode_one(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if image_size is not None and img.format == "JPEG":
            img.draft("RGB", (image_size, image_size))  # DCT-domain downscale: much faster
        img = img.convert("RGB")
        if image_size is not None:
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != image_size:
                img = img.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode_all(files: Sequence[Path], image_size: int | None) -> np.ndarray:
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda f: _decode_one(f, image_size), files, chunksize=64))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ValueError(
            f"images have different sizes ({files[0].name}: {first[2]}x{first[1]}, "
            f"{files[odd].name}: {arrays[odd].shape[2]}x{arrays[odd].shape[1]}); set dataset.image_size"
        )
    return np.ascontiguousarray(np.stack(arrays))

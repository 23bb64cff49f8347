"""The readers of each layout: digits (shipped with scikit-learn), an image folder, CelebA, CIFAR.

Each returns the train and test :class:`~compbias.jobs.data.pools.Pool` and
the class names; images stay on disk (``paths``) or come decoded
(``images``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .pools import Pool, stratified_choice, take

__all__ = ["IMAGE_EXTENSIONS", "celeba_pools", "cifar_pools", "digits_pools", "imagefolder_pools"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def digits_pools(test_fraction: float, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]  # values 0..16
    labels = digits.target.astype(np.int64)
    keys = [f"{i:06d}" for i in range(len(labels))]
    test_idx = stratified_choice(labels, int(round(len(labels) * test_fraction)), seed)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    ink = images.reshape(len(labels), -1).sum(axis=1)
    # `ink` = 1 when an image holds more ink than the median training image.
    threshold = float(np.median(ink[train_idx]))
    ink_group = (ink > threshold).astype(np.int64)
    pool = Pool(keys=keys, labels=labels, attrs={"ink": ink_group}, images=images)
    names = [str(c) for c in range(10)]
    return take(pool, train_idx), take(pool, test_idx), names, 1.0 / 16.0


def _list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagefolder_pools(root: Path, attributes_csv, groups, test_fraction: float, seed: int):
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

    def scan(split_dir: Path) -> Pool:
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
        return Pool(keys=paths, labels=np.asarray(labels, dtype=np.int64)[order], attrs={}, paths=paths)

    if has_split:
        train, test = scan(root / "train"), scan(root / "test")
    else:
        full = scan(root)
        if len(full.keys) == 0:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        test_idx = stratified_choice(full.labels, int(round(len(full.keys) * test_fraction)), seed)
        train_idx = np.setdiff1d(np.arange(len(full.keys)), test_idx)
        train, test = take(full, train_idx), take(full, test_idx)
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


def celeba_pools(root: Path, target: str | None, groups, test_fraction: float, seed: int):
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
    pool = Pool(keys=[paths[i] for i in order], labels=labels[order], attrs={k: v[order] for k, v in attrs.items()}, paths=[paths[i] for i in order])

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
        test_idx = stratified_choice(strata, int(round(len(pool.keys) * test_fraction)), seed)
        train_idx = np.setdiff1d(np.arange(len(pool.keys)), test_idx)
    return take(pool, train_idx), take(pool, test_idx), [f"not_{target}", target]


def cifar_pools(kind: str, root: Path, allow_download: bool):
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
        pools.append(Pool(keys=[f"{i:06d}" for i in range(n)], labels=np.asarray(ds.targets, dtype=np.int64), attrs={}, images=images))
        names = list(ds.classes)
    return pools[0], pools[1], names

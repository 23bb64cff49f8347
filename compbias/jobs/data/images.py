"""Decoding image files once, kept in memory for the process and optionally in an on-disk ``.npy`` cache."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .pools import Pool

__all__ = ["clear_memory_cache", "decode_image", "decode_images", "pool_images"]

_CACHE_VERSION = 1

_MEMORY_CACHE: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
_MEMORY_CACHE_LOCK = threading.Lock()
_MEMORY_CACHE_ENTRIES = 4


def clear_memory_cache() -> None:
    """Forget the decoded images kept in memory (the on-disk cache stays)."""
    with _MEMORY_CACHE_LOCK:
        _MEMORY_CACHE.clear()


def pool_images(pool: Pool, root: Path | None, image_size: int | None, cache_dir) -> np.ndarray:
    """The images of ``pool`` as one array: already decoded (resized to ``image_size``), or decoded from its files once."""
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
        images = decode_images(files, image_size)
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


def decode_image(path: Path, image_size: int | None) -> np.ndarray:
    """One image file as ``uint8`` ``(3, H, W)``: RGB, centre-cropped to a square and resized when ``image_size`` is given."""
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


def decode_images(files: Sequence[Path], image_size: int | None, *, threads: int | None = None) -> np.ndarray:
    """The image files as one ``uint8`` ``(N, 3, H, W)`` array, decoded on ``threads`` threads (default up to 4).

    Raises
    ------
    ValueError
        When the images differ in size and no ``image_size`` is given.
    """
    workers = max(1, min(4, os.cpu_count() or 1)) if threads is None else max(1, threads)
    if workers == 1 or len(files) < 2:
        arrays = [decode_image(f, image_size) for f in files]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(lambda f: decode_image(f, image_size), files, chunksize=64))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ValueError(
            f"images have different sizes ({files[0].name}: {first[2]}x{first[1]}, "
            f"{files[odd].name}: {arrays[odd].shape[2]}x{arrays[odd].shape[1]}); set dataset.image_size"
        )
    return np.ascontiguousarray(np.stack(arrays))

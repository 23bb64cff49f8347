"""Generated fixtures for compbias.jobs: tiny image datasets in each layout, a trained digits model."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compbias.jobs import build_model, load_dataset, train_model
from tests.jobs.devices import selected_device

# CPU, or the device COMPBIAS_TEST_DEVICE names (make test-gpu: cuda); an absent CUDA stops the run here.
DEVICE = selected_device()

# One intra-op thread: these tests share 2 cores with other work, where
# OpenMP threads spinning against each other cost more than they bring.
torch.set_num_threads(1)

CLASSES = ("cat", "dog", "owl")
CELEBA_ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]


def _image(rng: np.random.Generator, label: int, size: tuple[int, int] = (12, 12)) -> Image.Image:
    """A small RGB image whose mean colour depends on the label (so it is learnable)."""
    base = np.zeros((size[1], size[0], 3), np.float64)
    base[..., label % 3] = 160
    noise = rng.integers(0, 90, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_folder(root: Path, per_class: int, rng: np.random.Generator, ext: str = ".png", size=(12, 12)) -> list[str]:
    """``root/<class>/<i>.<ext>``; returns the written paths relative to ``root``'s parent layout."""
    written = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{i:03d}{ext}"
            _image(rng, label, size).save(path)
            written.append(path)
    return written


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """Flat layout: 3 classes x 12 PNG images of 12x12, and an attributes CSV."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    paths = write_folder(root, 12, rng)
    rows = ["path,site,light"]
    for i, p in enumerate(paths):
        rel = p.relative_to(root).as_posix()
        rows.append(f"{rel},{'north' if i % 3 else 'south'},{i % 2}")
    (root / "attributes.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def imagefolder_split_root(tmp_path: Path) -> Path:
    """``train/`` and ``test/`` layout, JPEG images."""
    root = tmp_path / "split"
    rng = np.random.default_rng(1)
    write_folder(root / "train", 8, rng, ext=".jpg")
    write_folder(root / "test", 4, rng, ext=".jpg")
    return root


def write_celeba(root: Path, n: int = 48, *, partition: bool = False, seed: int = 0) -> Path:
    """Official CelebA layout with ``n`` tiny 10x12 JPEG faces and 4 attributes."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    lines = [str(n), " ".join(CELEBA_ATTRS) + " "]
    parts = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        values = [1 if rng.random() < 0.5 else -1 for _ in CELEBA_ATTRS]
        values[1] = 1 if i % 4 == 0 else -1  # Blond_Hair: a quarter
        values[2] = 1 if i % 2 == 0 else -1  # Male: half
        _image(rng, int(values[1] > 0), (10, 12)).save(root / "img_align_celeba" / name)
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values) + " ")
        parts.append(f"{name} {0 if i <= n * 2 // 3 else (1 if i <= n * 5 // 6 else 2)}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if partition:
        (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    return write_celeba(tmp_path / "celeba")


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch) -> Path:
    """torchvision's CIFAR-10 python layout with 20 train / 10 test random images.

    torchvision checks the md5 of the official files; generated files cannot
    match, so the integrity check is patched to accept them.
    """
    import torchvision

    root = tmp_path / "cifar"
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 10)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        with open(base / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return root


@pytest.fixture(scope="session")
def digits():
    """The default dataset (scikit-learn digits)."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def small_digits():
    """A 400-example training subset, for fine-tuning tests."""
    return load_dataset("digits", max_train=400)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the jobs tests train on (tests/jobs/devices.py)."""
    return DEVICE


@pytest.fixture(scope="session")
def baseline(digits):
    """A smallcnn trained 6 epochs on digits (about a second on one core), left on the test device."""
    torch.manual_seed(0)
    model = build_model("smallcnn", digits.n_classes, digits.input_shape, seed=0)
    model, _ = train_model(model, digits, epochs=6, seed=0, device=DEVICE, log=None)
    return model


@pytest.fixture(autouse=True)
def _no_env_cache(monkeypatch):
    monkeypatch.delenv("COMPBIAS_CACHE_DIR", raising=False)
    yield


os.environ.setdefault("MPLBACKEND", "Agg")

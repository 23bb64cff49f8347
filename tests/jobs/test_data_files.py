"""Image files too large to hold decoded: a split left in its files (FileImageDataset) reads, trains and
evaluates exactly like the decoded one, and the loader chooses it from the memory available."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compbias.jobs import build_model, evaluate, load_dataset
from compbias.jobs.data import FileImageDataset, TensorImageDataset
from compbias.jobs.data import files as files_mod
from compbias.jobs.train import fit

from .conftest import write_folder
from .devices import selected_device


def _both(kind, **options):
    return load_dataset(kind, in_memory=True, **options), load_dataset(kind, in_memory=False, **options)


def test_a_split_left_in_its_files_reads_the_same_images_as_the_decoded_one(celeba_root):
    mem, disk = _both("celeba", root=celeba_root, target="Blond_Hair", groups=["Male"])
    assert isinstance(mem.train, TensorImageDataset) and isinstance(disk.train, FileImageDataset)
    assert isinstance(disk.test, FileImageDataset) and not hasattr(disk.train, "images")
    assert disk.input_shape == mem.input_shape == (3, 12, 10)
    assert disk.test_frame.equals(mem.test_frame) and disk.train_frame.equals(mem.train_frame)
    assert len(disk.train) == len(mem.train) and torch.equal(disk.train.labels, mem.train.labels)
    for index in ([5, 0, 17, 5], torch.tensor([3, 1]), slice(2, 9), slice(None)):
        raw, y = disk.train.raw_batch(index)
        ref = mem.train.images[torch.arange(len(mem.train))[index]]
        assert raw.dtype == torch.uint8 and torch.equal(raw, ref)
        x, y2 = disk.train.batch(index)
        x_ref, y_ref = mem.train.batch(torch.arange(len(mem.train))[index])
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and torch.equal(y2, y)
    x, label = disk.test[4]
    assert torch.equal(x, mem.test[4][0]) and label == mem.test[4][1]
    empty, no_labels = disk.test.raw_batch([])
    assert empty.shape == (0, 3, 12, 10) and no_labels.shape == (0,)


def test_training_and_evaluation_from_files_give_the_same_model(imagefolder_split_root):
    """Crops, flips, order: the streamed batches are the decoded ones, so the weights are bit-identical on the CPU."""
    mem, disk = _both("imagefolder", root=imagefolder_split_root, image_size=16)
    assert mem.augment and disk.augment
    device = selected_device()
    weights, preds = [], []
    for bundle in (mem, disk):
        model = build_model("smallcnn", bundle.n_classes, bundle.input_shape, seed=0)
        model, history, _ = fit(model, bundle, epochs=2, batch_size=8, seed=3, device=device, log=None)
        weights.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        preds.append(evaluate(model, bundle, batch_size=5, keep_logits=True))
    assert len(preds[1].predictions) == len(disk.test) and preds[1].logits.shape == preds[0].logits.shape
    if device.type == "cpu":  # (CUDA kernels may sum in another order from run to run)
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert np.array_equal(preds[0].logits, preds[1].logits) and preds[0].predictions.equals(preds[1].predictions)


def test_the_loader_leaves_splits_in_their_files_when_they_would_not_fit(imagefolder_root, monkeypatch):
    # 36 images of 3 x 10 x 10 decoded: 10,800 bytes
    options = dict(root=imagefolder_root, image_size=10)

    def loaded_with(available):
        monkeypatch.setattr(files_mod, "available_memory", lambda: available)
        return load_dataset("imagefolder", **options).train

    assert files_mod.MEMORY_FRACTION == 0.25
    assert isinstance(loaded_with(4 * 10_800), TensorImageDataset)  # exactly a quarter: in memory
    assert isinstance(loaded_with(4 * 10_800 - 1), FileImageDataset)
    assert isinstance(loaded_with(None), TensorImageDataset)  # unknown memory: as before
    monkeypatch.setattr(files_mod, "available_memory", lambda: 1)
    assert isinstance(load_dataset("imagefolder", in_memory=True, **options).train, TensorImageDataset)
    monkeypatch.setattr(files_mod, "available_memory", lambda: 10**15)
    assert isinstance(load_dataset("imagefolder", in_memory=False, **options).train, FileImageDataset)
    # digits arrive decoded: always in memory
    assert isinstance(load_dataset("digits", in_memory=False, max_train=50).train, TensorImageDataset)


def test_a_streamed_split_with_images_of_different_sizes_names_the_fix(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    write_folder(root, 4, rng)
    odd = sorted(root.glob("*/*.png"))[::3]
    for p in odd:
        Image.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)).save(p)
    for in_memory in (True, False):
        with pytest.raises(ValueError, match="different sizes.*set dataset.image_size|set dataset.image_size"):
            bundle = load_dataset("imagefolder", root=root, in_memory=in_memory)
            bundle.train.batch(slice(None))
            bundle.test.batch(slice(None))
    assert load_dataset("imagefolder", root=root, in_memory=False, image_size=8).train.batch(slice(None))[0].shape[1:] == (3, 8, 8)


def test_file_dataset_checks_its_labels(tmp_path):
    with pytest.raises(ValueError, match="2 files but labels of shape \\(3,\\)"):
        FileImageDataset([tmp_path / "a.png", tmp_path / "b.png"], [0, 1, 2], None, shape=(3, 4, 4))

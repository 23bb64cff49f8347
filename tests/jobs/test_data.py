"""Dataset layouts on generated fixtures: shapes, stable ids, deterministic splits, clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from compbias.jobs import load_dataset
from compbias.jobs.data.images import clear_memory_cache

from .conftest import CLASSES, write_celeba


def _same(a, b) -> bool:
    return a.test_frame.equals(b.test_frame) and torch.equal(a.test.images, b.test.images) and torch.equal(a.train.images, b.train.images)


# -- digits ------------------------------------------------------------------


def test_digits_shapes_ids_and_ink_group(digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.n_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    n = len(digits.test)
    assert n == round(1797 * 0.25) and len(digits.train) == 1797 - n
    frame = digits.test_frame
    assert list(frame.columns[:3]) == ["example_id", "label", "ink"]
    assert frame["example_id"].dtype == np.int64 and frame["example_id"].tolist() == list(range(n))
    assert digits.group_columns == ["ink"] and set(frame["ink"]) == {0, 1}
    # ink = 1 above the training median: at most half of the training split
    assert 0.4 < digits.train_frame["ink"].mean() <= 0.5
    x, y = digits.test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y == frame["label"].iloc[0]
    # every class present in the test split in proportion (stratified)
    counts = frame["label"].value_counts()
    assert counts.min() >= 40 and counts.max() <= 50


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_dataset("digits")
    assert _same(digits, again)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(digits.test.images, other.test.images)


def test_digits_can_be_resized():
    b = load_dataset("digits", image_size=16, max_train=100, max_test=50)
    assert b.input_shape == (1, 16, 16) and b.test.images.dtype == torch.float32
    x, _ = b.test[0]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_max_train_and_max_test_are_exact_and_stratified():
    b = load_dataset("digits", max_train=200, max_test=100, split_seed=3)
    assert len(b.train) == 200 and len(b.test) == 100
    assert b.test_frame["example_id"].tolist() == list(range(100))
    assert b.train_frame["label"].value_counts().min() >= 19  # ~20 per class


def test_imbalance_keeps_a_fraction_of_chosen_classes(digits):
    b = load_dataset("digits", imbalance={"classes": [3, 5], "group": None, "keep": 0.1})
    full = digits.train_frame["label"].value_counts()
    kept = b.train_frame["label"].value_counts()
    for c in (3, 5):
        assert kept[c] == round(full[c] * 0.1)
    assert kept[0] == full[0]
    assert b.test_frame.equals(digits.test_frame)  # the test split is untouched


def test_imbalance_by_group(digits):
    b = load_dataset("digits", imbalance={"group": {"ink": 1}, "keep": 0.2})
    full = digits.train_frame.groupby("ink").size()
    kept = b.train_frame.groupby("ink").size()
    assert kept[0] == full[0]
    assert abs(kept[1] - 0.2 * full[1]) <= 10


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "mnist"}, "unknown dataset kind"),
        ({"kind": "digits", "test_fraction": 1.5}, "test_fraction"),
        ({"kind": "digits", "groups": ["Male"]}, "not available"),
        ({"kind": "digits", "imbalance": {"classes": [12], "keep": 0.5}}, "unknown class"),
        ({"kind": "digits", "imbalance": {"classes": [1], "keep": 0}}, "keep"),
        ({"kind": "digits", "imbalance": {"group": {"hair": 1}, "keep": 0.5}}, "unknown attribute"),
        ({"kind": "digits", "positive_class": 11}, "positive_class"),
        ({"kind": "celeba"}, "needs a root"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(**options)


# -- imagefolder ---------------------------------------------------------------


def test_imagefolder_flat_layout_split_ids_and_paths(imagefolder_root):
    b = load_dataset("imagefolder", root=imagefolder_root, test_fraction=0.25, split_seed=0)
    assert b.class_names == list(CLASSES) and b.input_shape == (3, 12, 12)
    assert len(b.test) == 9 and len(b.train) == 27
    frame = b.test_frame
    assert frame["example_id"].tolist() == list(range(9))
    assert frame["path"].tolist() == sorted(frame["path"])  # stable order: sorted relative path
    assert frame.groupby("label").size().tolist() == [3, 3, 3]  # stratified
    assert set(frame["path"]).isdisjoint(b.train_frame["path"])
    # the image at example_id i is the file at path i
    from PIL import Image

    i = 4
    pixels = np.asarray(Image.open(imagefolder_root / frame["path"][i]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(b.test.images[i].numpy(), pixels)
    again = load_dataset("imagefolder", root=imagefolder_root, test_fraction=0.25, split_seed=0)
    assert _same(b, again)
    other = load_dataset("imagefolder", root=imagefolder_root, test_fraction=0.25, split_seed=5)
    assert other.test_frame["path"].tolist() != frame["path"].tolist()


def test_imagefolder_train_test_layout(imagefolder_split_root):
    b = load_dataset("imagefolder", root=imagefolder_split_root)
    assert len(b.train) == 24 and len(b.test) == 12
    assert all(p.startswith("test/") for p in b.test_frame["path"])
    assert all(p.startswith("train/") for p in b.train_frame["path"])
    assert b.augment is True


def test_imagefolder_attributes_csv_groups(imagefolder_root):
    b = load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["site", "light"])
    assert b.group_columns == ["site", "light"]
    assert b.group_levels["site"] == ["north", "south"] and b.group_levels["light"] == [0, 1]
    csv = pd.read_csv(imagefolder_root / "attributes.csv").set_index("path")
    for _, row in b.test_frame.iterrows():
        assert b.group_levels["site"][row["site"]] == csv.loc[row["path"], "site"]
        assert row["light"] == csv.loc[row["path"], "light"]


def test_attributes_csv_path_escaping_root_is_refused(imagefolder_root, tmp_path):
    csv = imagefolder_root / "attributes.csv"
    text = csv.read_text().replace("cat/000.png", "../outside.png", 1)
    csv.write_text(text)
    (imagefolder_root.parent / "outside.png").write_bytes((imagefolder_root / "cat" / "001.png").read_bytes())
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["site"])


def test_attributes_csv_absolute_path_outside_root_is_refused(imagefolder_root, tmp_path):
    outside = tmp_path / "outside.png"
    shutil.copy(imagefolder_root / "cat" / "001.png", outside)
    csv = imagefolder_root / "attributes.csv"
    csv.write_text(csv.read_text().replace("cat/000.png", str(outside), 1))
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["site"])


def test_attributes_csv_outside_root_is_refused(imagefolder_root, tmp_path):
    shutil.copy(imagefolder_root / "attributes.csv", tmp_path / "attrs.csv")
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv=tmp_path / "attrs.csv", groups=["site"])
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="../attrs.csv", groups=["site"])


def test_attributes_csv_errors(imagefolder_root):
    csv = imagefolder_root / "attributes.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the last image's row
    with pytest.raises(ValueError, match="no row for 1 image"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["site"])
    csv.write_text("\n".join(lines + ["cat/999.png,north,0"]) + "\n")
    with pytest.raises(FileNotFoundError, match="cat/999.png"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["site"])
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="'weather' is not available"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="attributes.csv", groups=["weather"])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_dataset("imagefolder", root=imagefolder_root, attributes_csv="missing.csv", groups=["site"])
    with pytest.raises(ValueError, match="need an attributes CSV"):
        load_dataset("imagefolder", root=imagefolder_root, groups=["site"])


def test_imagefolder_missing_root_and_mixed_sizes(imagefolder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "nope")
    from PIL import Image

    Image.new("RGB", (20, 16)).save(imagefolder_root / "dog" / "big.png")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_dataset("imagefolder", root=imagefolder_root, test_fraction=0.5)
    b = load_dataset("imagefolder", root=imagefolder_root, image_size=8)
    assert b.input_shape == (3, 8, 8)


def test_decoded_images_are_cached_on_disk(imagefolder_root, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root=imagefolder_root, image_size=10, cache_dir=cache)
    files = sorted(cache.glob("compbias-images-*.npy"))
    assert len(files) == 2  # train and test
    clear_memory_cache()
    for f in files:  # the cache is really read: poison it and see the change
        arr = np.load(f)
        arr[:] = 7
        np.save(f, arr)
    second = load_dataset("imagefolder", root=imagefolder_root, image_size=10, cache_dir=cache)
    assert int(second.test.images.max()) == 7 and not torch.equal(first.test.images, second.test.images)


# -- celeba ------------------------------------------------------------------


def test_celeba_seeded_stratified_split(celeba_root):
    b = load_dataset("celeba", root=celeba_root, target="Blond_Hair", groups=["Male", "Young"])
    assert b.class_names == ["not_Blond_Hair", "Blond_Hair"] and b.positive_class == 1
    assert b.input_shape == (3, 12, 10)
    assert len(b.test) == 12 and len(b.train) == 36
    frame = b.test_frame
    assert list(frame.columns) == ["example_id", "label", "Male", "Young", "path"]
    assert frame["path"].str.startswith("img_align_celeba/").all()
    assert frame["label"].sum() == 3  # a quarter are blond, stratified
    # labels and groups are read from the attribute file (1 -> 1, -1 -> 0)
    rows = {ln.split()[0]: ln.split()[1:] for ln in (celeba_root / "list_attr_celeba.txt").read_text().splitlines()[2:]}
    for _, r in frame.iterrows():
        values = rows[r["path"].split("/")[1]]
        assert r["label"] == (values[1] == "1") and r["Male"] == (values[2] == "1")
    assert _same(b, load_dataset("celeba", root=celeba_root, target="Blond_Hair", groups=["Male", "Young"]))


def test_celeba_official_partition(tmp_path):
    root = write_celeba(tmp_path / "celeba", partition=True)
    b = load_dataset("celeba", root=root, target="Male", groups=["Blond_Hair"], image_size=8)
    assert len(b.train) == 32 and len(b.test) == 8  # 0 -> train, 2 -> test, validation unused
    assert b.test_frame["path"].tolist() == [f"img_align_celeba/{i:06d}.jpg" for i in range(41, 49)]
    assert b.input_shape == (3, 8, 8)


def test_celeba_errors(celeba_root):
    with pytest.raises(ValueError, match="needs a target"):
        load_dataset("celeba", root=celeba_root)
    with pytest.raises(ValueError, match="no attribute 'Bald'"):
        load_dataset("celeba", root=celeba_root, target="Blond_Hair", groups=["Bald"])
    (celeba_root / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000007.jpg"):
        load_dataset("celeba", root=celeba_root, target="Blond_Hair")
    (celeba_root / "list_attr_celeba.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        load_dataset("celeba", root=celeba_root, target="Blond_Hair")


def test_celeba_count_line_must_match(celeba_root):
    path = celeba_root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["99", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="count line says 99"):
        load_dataset("celeba", root=celeba_root, target="Blond_Hair")


# -- cifar ---------------------------------------------------------------------


def test_cifar10_from_local_files(cifar_root):
    b = load_dataset("cifar10", root=cifar_root)
    assert b.input_shape == (3, 32, 32) and len(b.train) == 20 and len(b.test) == 10
    assert b.class_names == [f"c{i}" for i in range(10)]
    assert b.test_frame["example_id"].tolist() == list(range(10))
    assert b.test.images.dtype == torch.uint8


def test_cifar_missing_files_do_not_download(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="allow_download"):
        load_dataset("cifar100", root=tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_imbalance_entries_keep_a_fraction_per_class(digits):
    """The biased CIFAR of "Simon Says": several classes, each at its own fraction."""
    entries = [{"classes": [1], "keep": 0.1}, {"classes": [3], "keep": 0.2}, {"classes": [5], "keep": 0.5}]
    b = load_dataset("digits", imbalance=entries)
    full = digits.train_frame["label"].value_counts()
    kept = b.train_frame["label"].value_counts()
    for c, keep in ((1, 0.1), (3, 0.2), (5, 0.5)):
        assert kept[c] == round(full[c] * keep)
    assert all(kept[c] == full[c] for c in (0, 2, 4, 6, 7, 8, 9))
    # one entry in a list is the same as the entry alone
    single = load_dataset("digits", imbalance=[entries[1]])
    alone = load_dataset("digits", imbalance=entries[1])
    assert single.train_frame.equals(alone.train_frame)
    # entries as a study file gives them (unused keys null) are taken as they are
    as_config = [{"classes": e["classes"], "group": None, "keep": e["keep"]} for e in entries]
    assert load_dataset("digits", imbalance=as_config).train_frame.equals(b.train_frame)
    assert b.options["imbalance"] == entries
    with pytest.raises(ValueError, match="named by entries 0 and 1"):
        load_dataset("digits", imbalance=[{"classes": [3], "keep": 0.1}, {"classes": [3], "keep": 0.5}])

"""Dataset specs: builtin digits, ImageFolder layout checks and their error messages."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_bench.data import resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.transforms import TransformSpec

from replicas import make_imagefolder


def test_builtin_digits_is_a_stratified_real_split():
    dataset = resolve_dataset("builtin:digits")
    train, val = dataset.split("train"), dataset.split("val")
    assert (len(train), len(val)) == (1347, 450) and dataset.num_classes == 10
    per_class = np.bincount(train.labels) + np.bincount(val.labels)
    assert np.all(np.abs(np.bincount(val.labels) - 0.25 * per_class) <= 1)  # 25 % of each class
    image = train.load_image(0)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert train.manifest_sha256() != val.manifest_sha256()
    assert resolve_dataset("builtin:digits").split("val").manifest_sha256() == val.manifest_sha256()


def test_imagefolder_labels_follow_sorted_class_folders(tmp_path):
    root = make_imagefolder(tmp_path / "imnet", classes=(7, 0, 1))
    dataset = resolve_dataset(f"imagefolder:{root}")
    assert dataset.name == "imnet"
    train = dataset.split("train")
    assert train.classes == ["n00000000", "n00000001", "n00000007"]
    assert np.bincount(train.labels).tolist() == [12, 12, 12]
    assert all(f"/{train.classes[label]}/" in path for path, label in zip(train.paths, train.labels))
    assert resolve_dataset(str(root), name="imagenet").name == "imagenet"  # a plain path works too
    tensor, label, index = train.with_transform(TransformSpec("eval_dino", 32).build())[5]
    assert tensor.shape == (3, 32, 32) and label == train.labels[5] and index == 5


def test_manifest_changes_when_a_file_changes(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    before = resolve_dataset(str(root)).split("val").manifest_sha256()
    victim = next((root / "val").rglob("*.JPEG"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert resolve_dataset(str(root)).split("val").manifest_sha256() != before


def test_bad_specs_name_what_was_expected(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'builtin:mnist'.*builtin:digits"):
        resolve_dataset("builtin:mnist")
    with pytest.raises(UserError, match="not a folder and not a known spec"):
        resolve_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"val is missing; expected ROOT/train/<class>"):
        root = make_imagefolder(tmp_path / "a")
        import shutil

        shutil.rmtree(root / "val")
        resolve_dataset(str(root))
    root = make_imagefolder(tmp_path / "b")
    (root / "val" / "n00000007").rename(root / "val" / "n00000009")
    with pytest.raises(UserError, match="class folders differ"):
        resolve_dataset(str(root))
    (tmp_path / "c" / "train" / "x").mkdir(parents=True)
    (tmp_path / "c" / "val" / "x").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        resolve_dataset(str(tmp_path / "c"))
    with pytest.raises(UserError, match="unknown transform"):
        TransformSpec("eval_foo", 224)

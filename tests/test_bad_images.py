"""Unreadable images, empty class folders, non-finite features and leftover scratch folders of the feature cache
(issue 16, items 2, 3 and 7): one line naming the file, an opt-in skip that is counted and reported, nothing
cached that is not finite, and nothing left behind by a failed or killed extraction."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch._utils import ExceptionWrapper

from ssl_bench import features as features_module
from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.data import UnreadableImageError, image_folder
from ssl_bench.errors import UserError
from ssl_bench.features import clean_stale_scratch, extract
from ssl_bench.results import read_rows

from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY, seed=1)


def _folder(root, per_class: int = 4):
    """Two classes, ``per_class`` train and 2 val images each; returns (root, the train files in split order)."""
    make_imagefolder(root, classes=(0, 1), train_per_class=per_class, val_per_class=2)
    return root, sorted((root / "train").glob("*/*"))


def _scratch(cache) -> list:
    return sorted(p.name for p in cache.glob(".extract-*"))


def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *args])


# --------------------------------------------------------------------------------------------- through the CLI

def test_corrupt_jpeg_gives_one_line_naming_it_and_leaves_no_scratch(tmp_path):
    root, files = _folder(tmp_path / "imnet", per_class=6)
    bad = files[8]  # image 9 of 12 in split order
    bad.write_bytes(b"not a jpeg at all" * 8)
    cache, results = tmp_path / "cache", tmp_path / "runs.csv"
    out = invoke("run", "--task", "knn", "--model", TINY, "--data", str(root), "-p", "ks=3", "--workers", "0",
                 "--cache-dir", str(cache), "--results", str(results))
    assert out.exit_code == 1 and "Traceback" not in out.output
    (line,) = out.output.strip().splitlines()
    assert line.startswith(f"Error: cannot read image {bad} (UnidentifiedImageError")
    assert "image 9 of 12 in split order and the 8 before it read fine" in line and "--skip-bad-images" in line
    assert _scratch(cache) == [] and not results.exists()


def test_skip_bad_images_leaves_them_out_counted_in_a_warning_and_the_rows(tmp_path):
    root, files = _folder(tmp_path / "imnet")
    files[1].write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)  # starts like a JPEG, then nothing
    files[6].write_bytes(b"")  # empty: found before any model work
    cache, results = tmp_path / "cache", tmp_path / "runs.csv"
    args = ("run", "--task", "knn", "--model", TINY, "--data", str(root), "-p", "ks=3", "--workers", "0",
            "--cache-dir", str(cache), "--results", str(results), "--skip-bad-images")
    for attempt in range(2):  # the second run reads the features from the cache and reports the same two
        out = invoke(*args)
        assert out.exit_code == 0, out.output
        assert "2 of 8 images are unreadable and were left out" in out.output, out.output
        assert f"cannot read image {files[1]}" in out.output and "empty file (0 bytes)" in out.output
    rows = read_rows(results)
    assert len(rows) == 16 and _scratch(cache) == []
    for row in rows:
        assert row.params["skipped_images"] == {
            "train": {"count": 2, "files": [str(files[i].relative_to(root)) for i in (1, 6)]}}
        assert "val" not in row.params["skipped_images"]
    # Without the flag the same folder stops at the empty file, before the model runs.
    out = invoke(*args[:-1])
    assert out.exit_code == 1 and "1 of the 8 files of imnet/train cls checked are unreadable before decoding" in out.output


# --------------------------------------------------------------------------------------------- extraction

def test_empty_file_is_refused_before_the_model_runs_or_skipped_without_reading_it(tmp_path, backbone, monkeypatch):
    root, files = _folder(tmp_path / "d")
    files[2].write_bytes(b"")
    calls = []
    real_run = features_module._run_model
    monkeypatch.setattr(features_module, "_run_model", lambda *a, **k: calls.append(a[8].tolist()) or real_run(*a, **k))
    split = image_folder(root).split("train")
    with pytest.raises(UnreadableImageError, match=rf"1 of the 8 files .* the first is {files[2]} \(empty file"):
        extract(backbone, split, cache_dir=tmp_path / "cache", workers=0)
    assert calls == [] and _scratch(tmp_path / "cache") == []
    split.skip_bad_images = True
    out = extract(backbone, split, cache_dir=tmp_path / "cache", workers=0)
    assert calls == [[0, 1, 3, 4, 5, 6, 7]]  # never read
    assert out.features.shape == (7, 96) and out.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert [item["index"] for item in out.skipped] == [2] and split.skipped_images == ("train/n00000000/" + files[2].name,)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_skipping_keeps_the_other_rows_identical(tmp_path, backbone, decode):
    root, files = _folder(tmp_path / "d")
    clean = extract(backbone, image_folder(root).split("train"), use_cache=False, cache_dir=tmp_path, workers=0,
                    batch_size=3, decode=decode)
    files[4].write_bytes(files[4].read_bytes()[:60])  # truncated JPEG
    split = image_folder(root).split("train")
    with pytest.raises(UnreadableImageError, match=rf"{files[4].name}.*image 5 of 8 in split order and the 4 before"):
        extract(backbone, split, use_cache=False, cache_dir=tmp_path, workers=0, batch_size=3, decode=decode)
    split.skip_bad_images = True
    out = extract(backbone, split, use_cache=False, cache_dir=tmp_path, workers=0, batch_size=3, decode=decode)
    keep = [0, 1, 2, 3, 5, 6, 7]
    np.testing.assert_array_equal(out.features, clean.features[keep])
    np.testing.assert_array_equal(out.labels, clean.labels[keep])
    assert [item["index"] for item in out.skipped] == [4] and _scratch(tmp_path) == []


def test_a_worker_error_is_cut_back_to_its_one_line():
    try:
        raise UnreadableImageError("cannot read image /data/x.jpg (OSError: broken data stream)")
    except UnreadableImageError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(UnreadableImageError) as caught:
        wrapped.reraise()  # what a DataLoader does in the main process
    assert str(caught.value) == "cannot read image /data/x.jpg (OSError: broken data stream)"
    assert isinstance(caught.value, UserError)


def test_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
    root, _ = _folder(tmp_path / "d")
    for split in ("train", "val"):
        (root / split / "n00000009").mkdir()
    with caplog.at_level(logging.WARNING, logger="ssl_bench"):
        dataset = image_folder(root)
    assert dataset.num_classes == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert f"1 of 3 class folders of {root / 'train'} hold no images ({root / 'train' / 'n00000009'})" in warned[0]
    assert "each still counts as a class" in warned[0]


# --------------------------------------------------------------------------------------------- non-finite features

def test_non_finite_features_are_refused_and_never_cached(tmp_path, monkeypatch):
    root, _ = _folder(tmp_path / "d")
    split = image_folder(root).split("train")
    broken = create_backbone(TINY, seed=1)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")  # one NaN feature column: every row is non-finite
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"features of vit_nano_patch4_32 \(random init.*\) on features are not finite: 8 of 8 "
                                        r"rows hold NaN or inf; nothing was cached"):
        extract(broken, split, cache_dir=cache, workers=0)
    assert not [p for p in cache.glob("*/*")] and _scratch(cache) == []
    with torch.no_grad():  # an overflow in some rows only is counted as such
        broken.model.norm.weight[0] = 1.0
    real = features_module.compute_features

    def overflow(backbone, batch, spec):
        out = real(backbone, batch, spec)
        out[:1, 0] = float("inf")  # the first row of every batch of 2
        return out

    monkeypatch.setattr(features_module, "compute_features", overflow)
    with pytest.raises(UserError, match=r"not finite: 4 of 8 rows"):
        extract(broken, split, cache_dir=cache, workers=0, batch_size=2)
    assert not [p for p in cache.glob("*/*")] and _scratch(cache) == []


# --------------------------------------------------------------------------------------------- stale scratch folders

def test_stale_scratch_folders_are_removed_when_the_cache_is_next_used(tmp_path, backbone):
    cache = tmp_path / "cache"
    cache.mkdir()
    host = features_module._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".extract-{host}-{dead.pid}-abc123",  # this host, process gone: stale
        "live": f".extract-{host}-{os.getpid()}-def456",  # this host, this process: held
        "old": ".extract-9u5nkswu",  # the old unnamed kind, three days old: stale
        "young": ".extract-x2m1qq0a",  # unnamed, an hour old: may be held on another host
        "far_old": ".extract-otherhost-12-aaa",  # another host, three days old: stale
    }
    for name in names.values():
        (cache / name).mkdir()
        (cache / name / "shard-00000.npy").write_bytes(b"x")
    for key, age in (("old", 3 * 86400), ("young", 3600), ("far_old", 3 * 86400)):
        stamp = time.time() - age
        os.utime(cache / names[key], (stamp, stamp))
    split = image_folder(_folder(tmp_path / "d")[0]).split("val")
    extract(backbone, split, cache_dir=cache, workers=0)
    assert _scratch(cache) == sorted([names["live"], names["young"]])
    assert clean_stale_scratch(cache) == 0 and clean_stale_scratch(tmp_path / "missing") == 0

"""The raw-pixel backbone (`--model pixels`): the eval-transformed image, flattened, scored by every task that can
use it, so a leaderboard shows the floor a learned representation must beat."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.data import resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.features import FeatureSpec, compute_features
from ssl_bench.results import read_rows
from ssl_bench.transforms import TransformSpec


def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def test_pixels_backbone_names_size_and_cache_identity():
    backbone = create_backbone("pixels")
    assert (backbone.arch, backbone.embed_dim, backbone.input_size, backbone.label) == ("pixels_32", 3072, 32,
                                                                                        "pixels (32x32)")
    assert not backbone.is_vit and backbone.patch_size is None and backbone.init_seed is None
    assert backbone.weights_id() == create_backbone("pixels_32", seed=7).weights_id() == "pixels_32:pixels-v1"
    small = create_backbone("pixels_8")
    assert (small.embed_dim, small.label, small.weights_id()) == (192, "pixels (8x8)", "pixels_8:pixels-v1")
    assert not list(backbone.model.parameters())


def test_pixels_features_are_the_flattened_image_for_every_pooled_part(one_thread):
    backbone = create_backbone("pixels_4")
    images = torch.randn(2, 3, 4, 4)
    for part in ("cls", "avgpool", "cls_prenorm"):
        assert torch.equal(compute_features(backbone, images, FeatureSpec(part)), images.reshape(2, 48))
    assert torch.equal(compute_features(backbone, images, FeatureSpec("cls+avgpool")), images.reshape(2, 48).repeat(1, 2))
    patch = compute_features(backbone, images, FeatureSpec("patch"))  # one RGB token per pixel, row-major
    assert patch.shape == (2, 16, 3) and torch.equal(patch[1, 4 * 2 + 3], images[1, :, 2, 3])
    # whole images of another size (retrieval): resized to the side, a tiny-image descriptor
    big = torch.randn(1, 3, 9, 13)
    expected = F.interpolate(big, size=(4, 4), mode="bilinear", align_corners=False, antialias=True).reshape(1, 48)
    assert torch.allclose(backbone.model(big), expected)


def test_retrieval_global_feature_of_pixels_is_the_unit_norm_tiny_image(one_thread):
    from ssl_bench.tasks.retrieval import image_feature

    backbone = create_backbone("pixels_8")
    image = torch.randn(1, 3, 20, 30)
    tiny = F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False, antialias=True).reshape(1, -1)
    assert torch.allclose(image_feature(backbone, image), F.normalize(tiny, dim=-1), atol=1e-6)


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "pixels", "--ckpt", "x.pth"), "--model pixels is the raw image and has no weights; leave out --ckpt"),
    (("--model", "pixels_0"), "the pixels side must be 1 to 1024"),
])
def test_pixels_bad_use_gives_one_line(args, message):
    out = CliRunner().invoke(cli, ["run", "--task", "knn", "--data", "builtin:digits", *args])
    assert out.exit_code != 0 and message in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_pixels_cannot_be_pretrained():
    from ssl_bench.backbones import check_model_name

    with pytest.raises(UserError, match="raw-pixel baseline .* no parameters to pretrain or fine-tune"):
        check_model_name("pixels")


def test_list_shows_pixels():
    out = invoke("list")
    assert out.exit_code == 0 and "pixels (= pixels_32)" in out.output and "pixels_<side>" in out.output


def _weighted_knn_top1(train: np.ndarray, train_y: np.ndarray, val: np.ndarray, val_y: np.ndarray, k: int,
                       temperature: float) -> float:
    """DINO's weighted kNN written out: cosine similarity, k nearest, votes exp(sim / T) per class, argmax."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    sims = val @ train.T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(val), int(train_y.max()) + 1))
    for row in range(len(val)):
        np.add.at(votes[row], train_y[nearest[row]], np.exp(sims[row, nearest[row]] / temperature))
    return 100.0 * float((votes.argmax(1) == val_y).mean())


def _pixels(split, dtype: str) -> np.ndarray:
    """The project's eval transform at 32 px, each image flattened; rounded through the dtype the cache stored."""
    transform = TransformSpec("eval_dino", 32).build()
    flat = np.stack([transform(split.load_image(i)).numpy().reshape(-1) for i in range(len(split))])
    return flat.astype(dtype).astype(np.float64)


def test_knn_on_pixels_equals_a_knn_on_the_resized_normalised_images(tmp_path):
    results = tmp_path / "runs.csv"
    out = invoke("run", "--task", "knn", "--model", "pixels", "--data", "builtin:digits", "-p", "ks=20",
                 "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results", str(results))
    assert out.exit_code == 0, out.output
    rows = {r.metric: r for r in read_rows(results)}
    top1 = rows["top1"]
    assert (top1.model, top1.arch) == ("pixels (32x32)", "pixels_32") and "init_seed" not in top1.params
    digits = resolve_dataset("builtin:digits")
    train, val = digits.split("train"), digits.split("val")
    dtype = top1.params["feature_dtype"]
    expected = _weighted_knn_top1(_pixels(train, dtype), train.labels, _pixels(val, dtype), val.labels, 20, 0.07)
    assert top1.value == pytest.approx(expected, abs=1e-9)
    assert top1.value > 90  # raw pixels separate digits well: the floor a representation must beat


def test_linear_fast_and_fewshot_run_on_pixels(tmp_path):
    results = tmp_path / "runs.csv"
    out = invoke("run", "--task", "linear,fewshot", "--model", "pixels_8", "--data", "builtin:digits",
                 "-p", "linear.fast=true", "-p", "linear.epochs=3", "-p", "linear.lrs=0.1,1.0",
                 "-p", "fewshot.shots=5", "-p", "fewshot.splits=1", "-p", "fewshot.one_percent=false",
                 "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results", str(results))
    assert out.exit_code == 0, out.output
    rows = {(r.task, r.metric): r for r in read_rows(results)}
    assert rows[("linear", "top1_D_fast")].value > 50 and rows[("linear", "top1_D_fast")].model == "pixels (8x8)"
    assert rows[("fewshot", "top1_5shot")].value > 50  # MSN's default feature cls_prenorm: the image itself


@pytest.mark.parametrize(("task", "message"), [
    ("finetune", "finetune: pixels (32x32) is the raw image, with no parameters to fine-tune"),
    ("davis", "pixels_32 is not a ViT; DAVIS propagation needs patch tokens"),
])
def test_tasks_that_cannot_use_pixels_say_so_in_one_line(tmp_path, task, message):
    data = ["--data-root", str(tmp_path)] if task == "davis" else ["--data", "builtin:digits"]
    out = CliRunner().invoke(cli, ["-q", "run", "--task", task, "--model", "pixels", *data, "--workers", "0",
                                   "--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "runs.csv")])
    assert out.exit_code != 0 and message in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_transfer_runs_on_pixels(tmp_path):
    from transfer_replicas import make_transfer_root

    root = make_transfer_root(tmp_path / "root", ("dtd", "pets"))
    results = tmp_path / "runs.csv"
    out = invoke("run", "--task", "transfer", "--model", "pixels_8", "--data-root", str(root), "-p", "folds=2",
                 "-p", "grid=6", "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results", str(results))
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert sorted(r.dataset for r in rows) == ["dtd", "pets"]
    assert all(r.model == "pixels (8x8)" and 0 <= r.value <= 100 for r in rows)

"""Feature specs against the model's own forward, the content-addressed cache, and sharded extraction."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_bench import features as features_module
from ssl_bench.backbones import create_backbone
from ssl_bench.data import resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.features import FeatureSpec, compute_features, extract

from conftest import free_port
from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"


@pytest.fixture(scope="module")
def digits():
    return resolve_dataset("builtin:digits")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY, seed=1)


def _manual_blocks(model, images):
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    outs = []
    for block in model.blocks:
        x = block(x)
        outs.append(x)
    return outs


def test_specs_match_a_manual_forward(backbone):
    images = torch.randn(3, 3, 32, 32)
    model = backbone.model
    with torch.no_grad():
        blocks = _manual_blocks(model, images)
        normed = [model.norm(b) for b in blocks]
        expected = {
            "cls": model(images),  # DINO's model(x): CLS after the final norm
            "cls_prenorm": blocks[-1][:, 0],
            "last2": torch.cat([normed[-2][:, 0], normed[-1][:, 0]], dim=-1),
            "avgpool": normed[-1][:, 1:].mean(dim=1),
            "patch": normed[-1][:, 1:],
            "cls+avgpool": torch.cat([normed[-1][:, 0], normed[-1][:, 1:].mean(dim=1)], dim=-1),
        }
        for text, want in expected.items():
            got = compute_features(backbone, images, FeatureSpec(text))
            assert got.shape == want.shape, text
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=text)


def test_cnn_pooled_and_bad_specs():
    cnn = create_backbone("resnet18")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = compute_features(cnn, images, FeatureSpec("cls"))
        torch.testing.assert_close(pooled, cnn.model(images))
        assert compute_features(cnn, images, FeatureSpec("patch")).shape == (2, 4, 512)
        with pytest.raises(UserError, match="needs a ViT"):
            compute_features(cnn, images, FeatureSpec("last4"))
    for bad in ("clss", "last", "patch+cls", ""):
        with pytest.raises(UserError, match="feature spec"):
            FeatureSpec(bad)


def test_cache_hit_skips_the_model_and_a_changed_checkpoint_misses(tmp_path, digits, monkeypatch):
    split = digits.split("val")
    ckpt = tmp_path / "backbone.pth"
    source = create_backbone(TINY, seed=2)
    torch.save(source.model.state_dict(), ckpt)
    first = extract(create_backbone(TINY, ckpt=ckpt), split, "cls", cache_dir=tmp_path / "cache", workers=0)
    assert not first.cached and first.features.shape == (len(split), 96)

    calls = []
    real_run = features_module._run_model
    monkeypatch.setattr(features_module, "_run_model", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    second = extract(create_backbone(TINY, ckpt=ckpt), split, "cls", cache_dir=tmp_path / "cache", workers=0)
    assert second.cached and not calls
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.labels, split.labels)

    other = create_backbone(TINY, seed=3)
    torch.save(other.model.state_dict(), ckpt)  # same path, new content
    third = extract(create_backbone(TINY, ckpt=ckpt), split, "cls", cache_dir=tmp_path / "cache", workers=0)
    assert not third.cached and calls == [1]
    assert not np.allclose(third.features, first.features)

    # another spec, transform or dataset split is another entry too
    assert not extract(create_backbone(TINY, ckpt=ckpt), split, "avgpool", cache_dir=tmp_path / "cache", workers=0).cached
    entries = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]
    assert len(entries) == 3 and not list((tmp_path / "cache").glob(".extract-*"))


def test_random_transform_is_never_cached(tmp_path, digits, backbone):
    from ssl_bench.transforms import TransformSpec

    split = digits.split("val")
    out = extract(backbone, split, "cls", TransformSpec("train_lin", 32), cache_dir=tmp_path, workers=0)
    assert not out.cached and not [p for p in tmp_path.glob("*/*") if p.is_dir()]


def _extract_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        split = resolve_dataset("builtin:digits").split("val")
        result = extract(create_backbone(TINY, seed=1), split, "cls+avgpool", cache_dir=cache, workers=0)
        np.save(f"{out}-{rank}.npy", np.asarray(result.features))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_extraction_equals_one_process(tmp_path, digits, backbone):
    mp.spawn(_extract_worker, args=(2, free_port(), str(tmp_path / "cache"), str(tmp_path / "feat")), nprocs=2)
    single = extract(backbone, digits.split("val"), "cls+avgpool", use_cache=False, cache_dir=tmp_path / "scratch", workers=0)
    for rank in (0, 1):
        sharded = np.load(tmp_path / f"feat-{rank}.npy")
        np.testing.assert_allclose(sharded.astype(np.float32), np.asarray(single.features, np.float32), atol=2e-3)


def test_device_decode_path_gives_the_cpu_features_within_a_grey_level_and_its_own_cache_entry(tmp_path, backbone):
    split = resolve_dataset(str(make_imagefolder(tmp_path / "d", classes=(0, 1), train_per_class=4))).split("train")
    common = dict(device="cpu", batch_size=4, workers=0, cache_dir=tmp_path / "cache")
    cpu = extract(backbone, split, "cls", decode="cpu", **common)
    device = extract(backbone, split, "cls", decode="device", **common)
    assert len({p.name for p in (tmp_path / "cache").glob("*/*")}) == 2  # two cache entries, never mixed
    # One grey level (1/255 / std ~ 0.0175 in normalised units) of pixel difference moves the tiny ViT's CLS a little.
    torch.testing.assert_close(device.tensor(), cpu.tensor(), atol=0.05, rtol=0.0)
    with pytest.raises(UserError, match="decode='gpu'"):
        extract(backbone, split, "cls", decode="gpu", **common)

"""iBOT block masking: fractions and block shapes within bounds, reproducible by seed, in the multi-crop data."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ssl_bench.data import resolve_dataset
from ssl_bench.pretrain.masking import BlockMasking
from ssl_bench.pretrain.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop


def test_masked_fraction_never_exceeds_the_drawn_ratio_and_comes_close():
    masking = BlockMasking()
    rng = np.random.default_rng(0)
    shortfall = []
    for _ in range(300):
        ratio = rng.uniform(0.1, 0.5)
        mask, blocks = masking.blocks(14, 14, ratio, rng)
        assert mask.sum() <= ratio * 196
        shortfall.append(ratio - mask.mean())
    # Blocks stop when none fits the remaining budget: a few patches short at most, on average well under 2 %.
    assert float(np.mean(shortfall)) < 0.02 and max(shortfall) < 0.1


def test_blocks_are_rectangles_within_the_aspect_and_area_bounds():
    masking = BlockMasking(aspect=0.3)
    rng = np.random.default_rng(1)
    for _ in range(200):
        mask, blocks = masking.blocks(14, 14, rng.uniform(0.1, 0.5), rng)
        union = np.zeros_like(mask)
        for top, left, height, width in blocks:
            assert 0 < height < 14 and 0 < width < 14 and top + height <= 14 and left + width <= 14
            union[top:top + height, left:left + width] = True
            # height = round(sqrt(A a)), width = round(sqrt(A / a)) with a in [0.3, 1/0.3] and A >= 16
            assert (height - 0.5) / (width + 0.5) <= 1 / 0.3 and (height + 0.5) / (width - 0.5 or 1e-9) >= 0.3
            assert (height + 0.5) * (width + 0.5) >= 16
        assert np.array_equal(union, mask)


def test_probability_and_ratio_range_per_crop():
    masking = BlockMasking(probability=0.5, ratio=(0.1, 0.5))
    rng = np.random.default_rng(2)
    fractions = np.array([masking(8, 8, rng).mean() for _ in range(2000)])
    masked = fractions > 0
    assert abs(masked.mean() - 0.5) < 0.05  # binomial std 0.011
    assert fractions.max() <= 0.5
    assert np.all(fractions[masked] >= 4 / 64)  # at least one block of the 4-patch minimum on an 8 x 8 grid
    assert not BlockMasking(probability=0.0)(8, 8, rng).any()


def test_same_seed_same_masks():
    masking = BlockMasking(probability=1.0)
    first = [masking(14, 14, np.random.default_rng(5)) for _ in range(3)]
    assert all(np.array_equal(first[0], m) for m in first)
    assert not np.array_equal(first[0], masking(14, 14, np.random.default_rng(6)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        BlockMasking(ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="aspect"):
        BlockMasking(aspect=0.0)
    with pytest.raises(ValueError, match="probability"):
        BlockMasking(probability=1.5)


def test_dataset_masks_follow_seed_epoch_index_and_collate():
    split = resolve_dataset("builtin:digits").split("train")
    augmentation = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    dataset = MultiCropDataset(split, augmentation, seed=4, masking=BlockMasking(probability=1.0), mask_grid=(8, 8))
    crops, masks, index = dataset[3]
    plain_crops, plain_masks, _ = MultiCropDataset(split, augmentation, seed=4)[3]
    assert plain_masks == [] and all(torch.equal(a, b) for a, b in zip(crops, plain_crops))  # masks: own stream
    assert len(masks) == 2 and all(m.shape == (8, 8) and m.dtype == torch.bool and m.any() for m in masks)
    assert all(torch.equal(a, b) for a, b in zip(masks, dataset[3][1]))
    dataset.set_epoch(1)
    assert not torch.equal(masks[0], dataset[3][1][0])
    stacked, stacked_masks, indices = collate_multicrop([dataset[i] for i in range(4)])
    assert [tuple(m.shape) for m in stacked_masks] == [(4, 8, 8)] * 2 and indices.tolist() == [0, 1, 2, 3]
    assert len(stacked) == 4

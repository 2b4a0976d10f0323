"""Multi-crop augmentation: crop counts and shapes, blur schedule, reproducibility across workers, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_bench.data import ArraySplit, resolve_dataset
from ssl_bench.pretrain.multicrop import (
    MultiCropAugmentation,
    MultiCropDataset,
    collate_multicrop,
    sample_seed,
)
from ssl_bench.transforms import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(global_size=32, local_size=16, n_local=3)


def _noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _checkerboard(side: int) -> Image.Image:
    """1-px black/white checkerboard: all its energy sits at the highest frequency, which blur removes."""
    board = ((np.indices((side, side)).sum(axis=0) % 2) * 255).astype(np.uint8)
    return Image.fromarray(board).convert("RGB")


def _high_frequency(crop: torch.Tensor) -> float:
    return (crop[:, :, 1:] - crop[:, :, :-1]).abs().mean().item()


@pytest.fixture(scope="module")
def digits_train():
    return resolve_dataset("builtin:digits").split("train")


def test_default_recipe_gives_two_global_then_ten_local_crops():
    augmentation = MultiCropAugmentation()
    assert augmentation.n_crops == 12 and augmentation.crop_sizes == [224] * 2 + [96] * 10
    torch.manual_seed(0)
    crops = augmentation(_noise_image(300, 400))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert all(c.dtype == torch.float32 for c in crops)


def test_tiny_sizes_and_no_local_crops(digits_train):
    image = digits_train.load_image(0)  # 8x8: every crop is an upscale
    torch.manual_seed(0)
    crops = MultiCropAugmentation(**TINY)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    crops = MultiCropAugmentation(global_size=32, local_size=16, n_local=0)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2


def test_lists_from_yaml_become_tuples_and_bad_configs_fail():
    augmentation = MultiCropAugmentation(global_scale=[0.3, 1.0], local_scale=[0.05, 0.3])
    assert augmentation.global_scale == (0.3, 1.0) and augmentation == MultiCropAugmentation(global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))
    with pytest.raises(ValueError, match="n_local"):
        MultiCropAugmentation(n_local=-1)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.4, 0.05))


def test_crops_are_imagenet_normalised():
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    low, high = (0 - mean) / std, (1 - mean) / std
    augmentation = MultiCropAugmentation(**TINY)
    torch.manual_seed(0)
    crops = [c for seed in range(8) for c in augmentation(_noise_image(48, 64, seed))]
    for crop in crops:
        assert torch.isfinite(crop).all()
        assert (crop >= low - 1e-5).all() and (crop <= high + 1e-5).all()
    # Uniform noise has pixel mean 0.5; jitter moves it, but not outside a couple of std.
    channel_means = torch.stack([c.mean(dim=(1, 2)) for c in crops]).mean(dim=0)
    assert ((channel_means - (0.5 - mean.flatten()) / std.flatten()).abs() < 0.5).all()
    assert all(c.std() > 0.05 for c in crops)


def test_same_seed_epoch_index_gives_the_same_crops(digits_train):
    dataset = MultiCropDataset(digits_train, MultiCropAugmentation(**TINY), seed=7)
    first, _, index = dataset[5]
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    again, _, _ = dataset[5]
    assert index == 5 and all(torch.equal(a, b) for a, b in zip(first, again))
    state = torch.get_rng_state()
    dataset[6]
    assert torch.equal(state, torch.get_rng_state())  # ... and is left untouched
    dataset.set_epoch(1)
    next_epoch, _, _ = dataset[5]
    assert not any(torch.equal(a, b) for a, b in zip(first, next_epoch))
    other_seed, _, _ = MultiCropDataset(digits_train, MultiCropAugmentation(**TINY), seed=8)[5]
    assert not torch.equal(first[0], other_seed[0])
    assert len({sample_seed(0, 0, 1), sample_seed(0, 1, 0), sample_seed(1, 0, 0)}) == 3


def test_dataloader_worker_count_does_not_change_crops(digits_train):
    dataset = MultiCropDataset(digits_train, MultiCropAugmentation(**TINY), seed=3)
    dataset.set_epoch(2)
    indices = [0, 9, 4, 17, 3, 11, 8, 2, 30, 21, 5, 1]

    def run(num_workers: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, sampler=indices, num_workers=num_workers, collate_fn=collate_multicrop
        )
        return list(loader)

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 3
    for (crops_a, _, idx_a), (crops_b, _, idx_b) in zip(serial, parallel):
        assert idx_a.tolist() == idx_b.tolist()
        assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))
    # A resumed run that starts mid-epoch sees the same crops for the same samples.
    resumed, _, idx = collate_multicrop([dataset[i] for i in indices[4:8]])
    assert idx.tolist() == indices[4:8] and all(torch.equal(a, b) for a, b in zip(resumed, serial[1][0]))


def test_first_global_crop_is_always_blurred():
    # Whole-image crops at native size, so only the blur can remove the checkerboard's energy;
    # flip, jitter (contrast >= 0.6), grayscale and solarize all keep most of it.
    augmentation = MultiCropAugmentation(
        global_size=32, local_size=16, n_local=0, global_scale=(1.0, 1.0), blur_sigma=(1.0, 2.0)
    )
    dataset = MultiCropDataset(ArraySplit(np.asarray(_checkerboard(32))[None], np.zeros(1), ["0"], "board"), augmentation)
    first, second = [], []
    for epoch in range(20):
        dataset.set_epoch(epoch)
        crops, _, _ = dataset[0]
        first.append(_high_frequency(crops[0]))
        second.append(_high_frequency(crops[1]))
    # Unblurred, the measure is >= 0.3 (4.4 at full contrast) unless solarize folds a low-contrast
    # board onto one grey; a blur with sigma >= 1 leaves < 0.05.
    assert max(first) < 0.2  # blurred every time
    assert sum(value > 0.2 for value in second) >= 14  # crop 2 is blurred with p 0.1 only (18 of 20 here)


def test_tiny_local_crops_are_blurred_without_errors():
    augmentation = MultiCropAugmentation(global_size=16, local_size=8, n_local=8, blur_sigma=(2.0, 2.0))
    torch.manual_seed(0)
    crops = augmentation(_checkerboard(16))
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 8


def test_collate_stacks_crop_positions():
    crops = [[torch.full((3, 4, 4), float(i)), torch.full((3, 2, 2), float(i))] for i in range(3)]
    stacked, masks, indices = collate_multicrop([(c, [], 10 + i) for i, c in enumerate(crops)])
    assert masks == []
    assert [tuple(s.shape) for s in stacked] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    assert stacked[1][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert indices.dtype == torch.int64 and indices.tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="same number of crops"):
        collate_multicrop([(crops[0], [], 0), (crops[1][:1], [], 1)])

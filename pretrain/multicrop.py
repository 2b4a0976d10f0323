"""DINO's multi-crop augmentation, a dataset wrapper that makes it reproducible, and its collate function.

The recipe (Caron et al. 2021, DINO; the same photometric set as BYOL):

- 2 global crops: RandomResizedCrop(global_size, scale=global_scale, bicubic);
  ``n_local`` local crops: RandomResizedCrop(local_size, scale=local_scale, bicubic).
- every crop: horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4,
  saturation 0.2, hue 0.1; applied with p 0.8), grayscale (p 0.2).
- Gaussian blur, sigma ~ U(blur_sigma): global crop 1 always, global crop 2 with p 0.1
  (then solarize at 128 with p 0.2), local crops with p 0.5.
- ToTensor + ImageNet Normalize.

The blur is PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` (PIL's radius is the standard
deviation), as in DINO's reference code: it has no kernel-size parameter, so it stays a
proper Gaussian blur at any crop side, 16 px included. Its sigma is drawn from torch's RNG,
so every random choice in the pipeline comes from one generator and a single
``torch.manual_seed`` fixes a sample's crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl_bench.data import ImageSplit
from ssl_bench.decode import BytesDataset, collate_bytes
from ssl_bench.transforms import IMAGENET_MEAN, IMAGENET_STD

from .masking import BlockMasking

__all__ = [
    "MultiCropAugmentation",
    "MultiCropDataset",
    "RandomPILGaussianBlur",
    "collate_multicrop",
    "sample_seed",
]


class RandomPILGaussianBlur:
    """Gaussian blur with probability ``p`` and sigma ~ U(sigma); randomness from torch's global RNG."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"blur probability must lie in [0, 1], got {p}")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 < low <= high, got {sigma}")
        self.p, self.sigma = float(p), (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        # Draw both numbers unconditionally so the RNG stream does not depend on p.
        apply = torch.rand(()).item() < self.p
        sigma = torch.empty(()).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma)) if apply else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0.0 < low <= high:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {tuple(value)}")
    return low, high


@dataclass(frozen=True)
class MultiCropAugmentation:
    """DINO multi-crop config; calling it turns one PIL image into ``2 + n_local`` normalised crops.

    Defaults are DINO's ViT-S/16 recipe (2 x 224 at scale 0.4-1, 10 x 96 at scale 0.05-0.4).
    Randomness comes from torch's global RNG; wrap the call in a seeded ``fork_rng``
    (as :class:`MultiCropDataset` does) for reproducible crops.
    """

    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    _pipelines: tuple[Callable, Callable, Callable] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError(f"crop sizes must be positive, got global {self.global_size}, local {self.local_size}")
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {self.n_local}")
        # YAML presets give lists; store tuples so the config stays hashable and comparable.
        for name in ("global_scale", "local_scale", "blur_sigma"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        object.__setattr__(self, "_pipelines", self._build())

    def _build(self) -> tuple[Callable, Callable, Callable]:
        photometric = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]

        def crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC)

        global_1 = T.Compose([
            crop(self.global_size, self.global_scale), *photometric,
            RandomPILGaussianBlur(1.0, self.blur_sigma), *normalize,
        ])
        global_2 = T.Compose([
            crop(self.global_size, self.global_scale), *photometric,
            RandomPILGaussianBlur(0.1, self.blur_sigma), T.RandomSolarize(threshold=128, p=0.2), *normalize,
        ])
        local = T.Compose([
            crop(self.local_size, self.local_scale), *photometric,
            RandomPILGaussianBlur(0.5, self.blur_sigma), *normalize,
        ])
        return global_1, global_2, local

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    @property
    def crop_sizes(self) -> list[int]:
        """Side of each crop in output order (globals first), e.g. for a trainer to group forward passes."""
        return [self.global_size] * 2 + [self.local_size] * self.n_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        """[global 1, global 2, local 1, ..., local n]; each a float tensor (3, side, side)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        global_1, global_2, local = self._pipelines
        return [global_1(image), global_2(image)] + [local(image) for _ in range(self.n_local)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that depends on (seed, epoch, index) only, well mixed so nearby triples are unrelated."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


def sample_masks(masking: BlockMasking, grid: tuple[int, int], count: int, seed: int) -> list[torch.Tensor]:
    """``count`` iBOT masks for one sample, from a stream of their own (``seed`` is the sample's seed): drawing
    them shifts none of the crops' draws, on the CPU or the device pipeline."""
    rng = np.random.default_rng([seed, 1])
    return [torch.from_numpy(masking(*grid, rng)) for _ in range(count)]


class MultiCropDataset(torch.utils.data.Dataset):
    """(crops, masks, index) triples whose crops and masks depend on (seed, epoch, index) only.

    ``masks`` holds one bool [rows, cols] patch mask per global crop when ``masking`` is given (iBOT: rows x
    cols = global_size / patch_size), and is empty otherwise. Worker count, worker seeding, sampler order and
    the step a run resumed from all leave them unchanged. Call :meth:`set_epoch` before each epoch.
    With ``encoded=True`` the "crops" are the image file's bytes (one uint8 tensor) for the device pipeline
    (``ssl_bench.decode`` and ``device_augment``), which draws the crops from the same (seed, epoch, index).
    DataLoader workers hold a copy of the dataset taken when they start, so do not combine this with
    ``persistent_workers=True`` (the workers would keep the old epoch).
    """

    def __init__(self, split: ImageSplit, augmentation: Callable[[Image.Image], list[torch.Tensor]], seed: int = 0,
                 masking: BlockMasking | None = None, mask_grid: tuple[int, int] | None = None,
                 n_masked: int = 2, encoded: bool = False) -> None:
        if masking is not None and mask_grid is None:
            raise ValueError("MultiCropDataset: masking needs the global crops' patch grid (mask_grid)")
        self.split, self.augmentation, self.seed = split, augmentation, int(seed)
        self.masking, self.mask_grid, self.n_masked = masking, mask_grid, n_masked
        self.encoded = BytesDataset(split) if encoded else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        index = int(index)
        seed = sample_seed(self.seed, self.epoch, index)
        if self.encoded is not None:
            crops = [self.encoded[index][0]]
        else:
            image = self.split.load_image(index)
            # fork_rng restores the caller's CPU RNG afterwards, so other consumers are unaffected.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                crops = self.augmentation(image)
        masks = sample_masks(self.masking, self.mask_grid, self.n_masked, seed) if self.masking is not None else []
        return crops, masks, index


def collate_multicrop(
    batch: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], int]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Stack crop i (and mask i) of every sample: ([B, 3, H_i, W_i] per crop, [B, rows, cols] per mask, indices [B]).
    Encoded samples (one 1-D byte tensor each) stay a list of byte tensors."""
    if not batch:
        raise ValueError("collate_multicrop got an empty batch")
    n_crops, n_masks = len(batch[0][0]), len(batch[0][1])
    if any(len(crops) != n_crops for crops, _, _ in batch):
        raise ValueError(f"every sample must have the same number of crops; got {sorted({len(c) for c, _, _ in batch})}")
    if any(len(masks) != n_masks for _, masks, _ in batch):
        raise ValueError("every sample must have the same number of masks")
    if batch[0][0][0].ndim == 1:  # encoded images of different lengths: views into one shared buffer
        stacked = collate_bytes([(crops[0], 0, index) for crops, _, index in batch])[0]
    else:
        stacked = [torch.stack([crops[i] for crops, _, _ in batch]) for i in range(n_crops)]
    masks = [torch.stack([sample_masks[i] for _, sample_masks, _ in batch]) for i in range(n_masks)]
    indices = torch.tensor([int(index) for _, _, index in batch], dtype=torch.int64)
    return stacked, masks, indices

"""Fine-tuning data (protocols.md §8): the references' train and eval transforms, DeiT's repeated-augmentation
sampler, and a dataset whose augmentation depends on (seed, epoch, sample key) only.

Train transform: timm's ``create_transform`` as BEiT and DeiT call it (RandomResizedCrop bicubic, flip, RandAugment,
colour jitter when RandAugment is off, normalisation, random erasing in pixel mode, one box). Both references swap the
crop for ``RandomCrop(size, padding=4)`` when the input side is <= 32 (CIFAR at its own size); here the image is first
resized to the side, a no-op for 32 px images, so smaller images work too. RandAugment's posterize keeps 0 bits
at the top magnitude (a black image, as Pillow did when the references ran); Pillow 13 refuses 0 bits, so those
ops get ``posterize_bits`` instead, which gives the old result.

Eval transforms: ``beit`` = Resize(int(size / 0.875), bilinear) + CenterCrop (crop fraction 1 from 384 px up);
``deit`` = Resize(int(256 / 224 x size), bicubic) + CenterCrop. At <= 32 px both are Resize(size) + CenterCrop.

Reproducibility: a sampler yields sample *keys*; ``key % N`` is the image and the key itself (with the seed and
epoch) seeds the augmentation, so the r-th repetition of an image (key ``index + r N``) gets its own draw, and
worker count, worker seeding and the epoch a run resumed from leave every sample unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .data import ImageSplit
from .rng import mix_seed, seeded
from .transforms import IMAGENET_MEAN, IMAGENET_STD

SMALL_INPUT = 32  # the references' ``resize_im = input_size > 32``
RA_MULTIPLE = 256  # DeiT's RASampler keeps floor(N / 256) x 256 samples per epoch, whatever the batch size
EVAL_TRANSFORMS = ("beit", "deit")
CROPS = ("auto", "none")


def _off(text: str) -> bool:
    return text.strip().lower() in ("", "none", "off", "0")


def posterize_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every channel; 0 bits gives a black image (older Pillow's result)."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _safe_posterize(transform: T.Compose) -> None:
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_bits


def train_transform(size: int, randaug: str = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                    reprob: float = 0.25, hflip: float = 0.5, crop: str = "auto",
                    interpolation: str = "bicubic") -> T.Compose:
    """The references' training pipeline at side ``size`` (see the module docstring); ``randaug`` none = off.

    ``crop``: ``auto`` = the references' random crop; ``none`` = Resize + CenterCrop, no spatial augmentation (for
    data such as tiny digits, where a crop or shift loses the class)."""
    if crop not in CROPS:
        raise ValueError(f"train crop {crop!r}; expected one of {', '.join(CROPS)}")
    transform = create_transform(
        input_size=size, is_training=True, hflip=hflip, color_jitter=color_jitter,
        auto_augment=None if _off(randaug) else randaug, interpolation=interpolation, re_prob=reprob, re_mode="pixel",
        re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )
    if crop == "none":
        transform.transforms[0] = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC),
                                             T.CenterCrop(size)])
    elif size <= SMALL_INPUT:
        transform.transforms[0] = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC),
                                             T.RandomCrop(size, padding=4)])
    _safe_posterize(transform)
    return transform


def eval_transform(size: int, kind: str = "beit") -> T.Compose:
    """``beit`` (ImageNet recipe) or ``deit`` (small-dataset recipe) evaluation crop at side ``size``."""
    if kind not in EVAL_TRANSFORMS:
        raise ValueError(f"eval transform {kind!r}; expected one of {', '.join(EVAL_TRANSFORMS)}")
    if size <= SMALL_INPUT:
        resize, mode = size, InterpolationMode.BICUBIC
    elif kind == "beit":
        resize, mode = (int(size / (224 / 256)) if size < 384 else size), InterpolationMode.BILINEAR
    else:
        resize, mode = int((256 / 224) * size), InterpolationMode.BICUBIC
    return T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform_key(size: int, kind: str) -> str:
    """How rows name the eval transform."""
    if size <= SMALL_INPUT:
        return f"resize{size}-bicubic+center{size}"
    if kind == "beit":
        return f"resize{int(size / (224 / 256)) if size < 384 else size}-bilinear+center{size}"
    return f"resize{int((256 / 224) * size)}-bicubic+center{size}"


class AugmentedSplit(torch.utils.data.Dataset):
    """(image tensor, label) for sample key k: image ``k % N``, augmentation seeded by (seed, epoch, k).

    Call :meth:`set_epoch` before each epoch; DataLoader workers copy the dataset when an iterator starts, so do not
    combine this with ``persistent_workers=True``."""

    def __init__(self, split: ImageSplit, transform: Callable, seed: int = 0) -> None:
        self.split, self.transform, self.seed = split, transform, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        index = int(key) % len(self.split)
        image = self.split.load_image(index)
        with seeded(mix_seed(self.seed, self.epoch, int(key)), cuda=False):
            tensor = self.transform(image)
        return tensor, int(self.split.labels[index])


class RepeatedAugSampler(Sampler[int]):
    """DeiT's ``RASampler`` yielding sample keys (``index + r N`` for the r-th repetition of an index).

    Per epoch: a permutation of 0..N-1 from a generator seeded with ``seed + epoch`` (DeiT seeds with the epoch);
    each index ``repeats`` times in a row; padded from the front to a multiple of ``world_size``; every
    ``world_size``-th key from ``rank``; the first ``floor(N // 256 x 256 / world_size)`` of those kept."""

    def __init__(self, n: int, repeats: int = 3, world_size: int = 1, rank: int = 0, seed: int = 0,
                 multiple: int = RA_MULTIPLE) -> None:
        if repeats < 1 or not 0 <= rank < world_size:
            raise ValueError(f"repeats must be >= 1 and 0 <= rank < world_size; got {repeats}, {rank}, {world_size}")
        self.n, self.repeats, self.world_size, self.rank, self.seed = n, repeats, world_size, rank, seed
        self.total = math.ceil(n * repeats / world_size) * world_size
        self.selected = int(math.floor(n // multiple * multiple / world_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.selected

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        keys = [index + r * self.n for index in order for r in range(self.repeats)]
        keys += [key + self.repeats * self.n for key in keys[:self.total - len(keys)]]  # padding: later repetitions
        return iter(keys[self.rank:self.total:self.world_size][:self.selected])


def train_sampler(n: int, repeats: int, world_size: int, rank: int, seed: int) -> Sampler[int]:
    """``RepeatedAugSampler`` for repeats > 1 (DeiT), else ``DistributedSampler`` (shuffled, BEiT's); both have
    ``set_epoch``."""
    if repeats > 1:
        return RepeatedAugSampler(n, repeats, world_size, rank, seed)
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)

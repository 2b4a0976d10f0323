"""Protocol transforms (protocols.md §1.3), named so results and cache keys can say which one ran."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize() -> list[Callable]:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _resize_crop(resize: int, crop: int, interpolation: InterpolationMode) -> T.Compose:
    return T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop), *_normalize()])


def _eval_dino(size: int) -> T.Compose:
    return _resize_crop(round(size * 256 / 224), size, InterpolationMode.BICUBIC)


def _eval_msn(size: int) -> T.Compose:
    return _resize_crop(round(size * 256 / 224), size, InterpolationMode.BILINEAR)


def _eval_sslt(size: int) -> T.Compose:
    return _resize_crop(size, size, InterpolationMode.BICUBIC)


def _eval_ft(size: int) -> T.Compose:
    return _resize_crop(int(size / 0.875), size, InterpolationMode.BILINEAR)


def _train_lin(size: int) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(0.5),
        *_normalize(),
    ])


# The crop side scales with the backbone's input size; at 224 these are exactly the protocols' transforms.
PROTOCOL_TRANSFORMS: dict[str, Callable[[int], T.Compose]] = {
    "eval_dino": _eval_dino,
    "eval_msn": _eval_msn,
    "eval_sslt": _eval_sslt,
    "eval_ft": _eval_ft,
    "train_lin": _train_lin,
}
RANDOM_TRANSFORMS = frozenset({"train_lin"})


@dataclass(frozen=True)
class TransformSpec:
    """A protocol transform at a given crop size; ``key`` is what result rows and cache keys record."""

    name: str = "eval_dino"
    size: int = 224

    def __post_init__(self) -> None:
        if self.name not in PROTOCOL_TRANSFORMS:
            from .errors import UserError

            raise UserError(f"unknown transform {self.name!r}; expected one of {', '.join(sorted(PROTOCOL_TRANSFORMS))}")

    @property
    def key(self) -> str:
        return f"{self.name}@{self.size}"

    @property
    def deterministic(self) -> bool:
        return self.name not in RANDOM_TRANSFORMS

    def build(self) -> T.Compose:
        return PROTOCOL_TRANSFORMS[self.name](self.size)

"""Dataset specs: a string names a dataset; resolving it gives labelled image splits with a content manifest.

Specs:
  builtin:digits      scikit-learn's 8x8 handwritten digits (ships with scikit-learn), stratified 75/25 split
  builtin:digits-lt   the same with a long-tailed train split (exponential, imbalance 100; val balanced)
  builtin:shapes      generated 32 px images of ten shapes under nuisance factors (``ssl_bench.shapes``), 5000/1000
  imagefolder:PATH    ImageNet layout, PATH/train/<class>/*.JPEG and PATH/val/<class>/*.JPEG
  PATH                same as imagefolder:PATH
  KIND:PATH           a registered kind (``register_dataset_kind``), e.g. the nine transfer datasets
                      ``aircraft:PATH``, ``cifar10:PATH`` ... of ``ssl_bench.transfer_data``
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SKIP_HINT = "remove or replace it, or run with --skip-bad-images to leave unreadable images out (counted and reported)"


class UnreadableImageError(UserError):
    """An image file that cannot be opened or decoded.

    A DataLoader worker's exception reaches the main process re-created from one string that holds the worker's
    whole traceback; that string is cut back to the original one-line message here, so the CLI still prints one
    line whichever loader met the file."""

    def __init__(self, text: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1].strip()
        super().__init__(text)


class ImageSplit(torch.utils.data.Dataset):
    """One labelled split. Subclasses say how to load image ``i`` and what identifies the split's content."""

    classes: list[str]
    labels: np.ndarray
    # Opt-in (``Dataset.skip_bad_images``): feature extraction leaves unreadable images out instead of failing,
    # and records here the names of those it left out, for the warning and the result rows.
    skip_bad_images: bool = False
    skipped_images: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        """What messages and result rows call image ``index``."""
        return f"{type(self).__name__} image {index} (in memory)"

    def precheck(self) -> list[tuple[int, str]]:
        """(index, reason) of images known to be unreadable without decoding anything (cheap, run before any
        model work); decoding errors are found during extraction."""
        return []

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def manifest_lines(self) -> list[str]:
        """One line per sample; the hash of these lines (plus the class list) keys the feature cache."""
        raise NotImplementedError

    def manifest_sha256(self) -> str:
        if not hasattr(self, "_manifest_sha256"):
            digest = hashlib.sha256()
            digest.update(("\n".join(self.classes) + "\n\n").encode())
            for line in self.manifest_lines():
                digest.update(line.encode() + b"\n")
            self._manifest_sha256 = digest.hexdigest()
        return self._manifest_sha256

    def with_transform(self, transform: Callable) -> "TransformedSplit":
        return TransformedSplit(self, transform)


def stack_images(split: ImageSplit, transform: Callable, count: int | None = None) -> torch.Tensor:
    """The first ``count`` images of ``split`` (all by default) through ``transform``, as one [N, C, H, W] tensor:
    for small in-memory probes (the pretraining monitor, the demo's kNN), not for extraction."""
    n = len(split) if count is None else min(count, len(split))
    return torch.stack([transform(split.load_image(i)) for i in range(n)])


class TransformedSplit(torch.utils.data.Dataset):
    """(image tensor, label, index) triples for a DataLoader."""

    def __init__(self, split: ImageSplit, transform: Callable) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.split.load_image(index)), int(self.split.labels[index]), index


class ArraySplit(ImageSplit):
    """Images held in memory as uint8 arrays (N, H, W) grey or (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], tag: str) -> None:
        self.images, self.labels, self.classes, self.tag = images, np.asarray(labels, dtype=np.int64), classes, tag

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def manifest_lines(self) -> list[str]:
        content = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        return [f"{self.tag}\t{self.images.shape}\t{content}", ",".join(map(str, self.labels.tolist()))]


class FileSplit(ImageSplit):
    """Images on disk as (path, label) pairs; the manifest records relative path, size and label per file."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.root, self.classes = root, classes
        self.paths = [path for path, _ in samples]
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)

    def load_image(self, index: int) -> Image.Image:
        path = str(self.paths[index])
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
            detail = str(error).replace(f" {path!r}", "").replace(path, "the file")  # the path is named once
            raise UnreadableImageError(f"cannot read image {path} ({type(error).__name__}: {detail})") from None

    def describe(self, index: int) -> str:
        return os.path.relpath(self.paths[index], self.root)

    def manifest_lines(self) -> list[str]:
        self._sizes = [os.path.getsize(path) for path in self.paths]
        return [
            f"{os.path.relpath(path, self.root)}\t{size}\t{label}"
            for path, size, label in zip(self.paths, self._sizes, self.labels.tolist())
        ]

    def precheck(self) -> list[tuple[int, str]]:
        """Zero-byte files: their sizes are already known from the manifest, so the check costs nothing."""
        sizes = getattr(self, "_sizes", None)
        if sizes is None:
            sizes = [os.path.getsize(path) for path in self.paths]
        return [(i, "empty file (0 bytes)") for i, size in enumerate(sizes) if size == 0]


@dataclass
class Dataset:
    """A named dataset: its splits by name (``train`` and ``val`` for classification)."""

    name: str
    spec: str
    splits: dict[str, ImageSplit] = field(default_factory=dict)
    metric: str = "accuracy"  # the score a linear probe reports: "accuracy" or "mean_per_class"

    def split(self, name: str) -> ImageSplit:
        if name not in self.splits:
            raise UserError(f"dataset {self.spec!r} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    @property
    def num_classes(self) -> int:
        return len(next(iter(self.splits.values())).classes)

    def set_skip_bad_images(self, skip: bool = True) -> None:
        """Let feature extraction on this dataset's splits leave unreadable images out (counted, warned about and
        recorded in the rows) instead of stopping at the first one."""
        for split in self.splits.values():
            split.skip_bad_images = skip

    def skipped_images(self, limit: int = 20) -> dict[str, dict]:
        """Per split, how many images extraction left out and the first ``limit`` of their names."""
        return {name: {"count": len(split.skipped_images), "files": list(split.skipped_images[:limit])}
                for name, split in self.splits.items() if split.skipped_images}


def _digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=seed
    )
    classes = [str(c) for c in range(10)]
    return Dataset(
        name="digits",
        spec="builtin:digits",
        splits={
            "train": ArraySplit(images[train_idx], labels[train_idx], classes, "digits/train"),
            "val": ArraySplit(images[val_idx], labels[val_idx], classes, "digits/val"),
        },
    )


LT_IMBALANCE = 100.0  # builtin:digits-lt: the most frequent class has this many times the rarest one's images


def long_tail_counts(available: np.ndarray, imbalance: float = LT_IMBALANCE) -> np.ndarray:
    """Per-class image counts of an exponential long tail over classes 0..C-1: n_c = floor(n_max x imbalance^(-c /
    (C - 1))), n_max = the smallest class's available count (so every class can be served), at least 1."""
    exponents = np.arange(len(available)) / max(len(available) - 1, 1)
    return np.maximum(np.floor(available.min() * imbalance ** -exponents + 1e-9), 1).astype(np.int64)


def _digits_lt(seed: int = 0) -> Dataset:
    """builtin:digits with a long-tailed train split (``long_tail_counts``, a seeded choice of images per class)
    and the balanced val split, for the long-tail study on this machine."""
    digits = _digits(seed)
    train = digits.split("train")
    counts = long_tail_counts(np.bincount(train.labels), LT_IMBALANCE)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(train.labels == c), n, replace=False)
                                   for c, n in enumerate(counts)]))
    digits.splits["train"] = ArraySplit(train.images[keep], train.labels[keep], train.classes, "digits-lt/train")
    digits.name, digits.spec = "digits-lt", "builtin:digits-lt"
    return digits


@functools.lru_cache(maxsize=2)
def _shapes(seed: int = 0) -> Dataset:
    """builtin:shapes (``ssl_bench.shapes``): 5,000 / 1,000 generated 32 px images of ten shapes under random
    position, size, rotation, colour, background texture and clutter; made once per process."""
    from .shapes import CLASSES, generate_shapes

    splits = {split: ArraySplit(*generate_shapes(split, seed), list(CLASSES), f"shapes/{split}")
              for split in ("train", "val")}
    return Dataset(name="shapes", spec="builtin:shapes", splits=splits)


BUILTIN_DATASETS: dict[str, Callable[[], Dataset]] = {"digits": _digits, "digits-lt": _digits_lt, "shapes": _shapes}

IMAGEFOLDER_LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (ImageNet layout, same class folders in both)"


def _scan_class_folder(split_root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(entry.name for entry in os.scandir(split_root) if entry.is_dir())
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(split_root / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), label))
    _warn_empty_classes(split_root, classes, samples)
    return classes, samples


def _warn_empty_classes(split_root: Path, classes: list[str], samples: list[tuple[str, int]]) -> None:
    """A class folder without images still takes a label (the other split's labels must not shift): say so."""
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty and samples:
        shown = ", ".join(str(split_root / name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
        log.warning("%d of %d class folders of %s hold no images (%s); each still counts as a class, so the "
                    "dataset has %d classes, %d of them without images here", len(empty), len(classes), split_root,
                    shown, len(classes), len(empty))


def image_folder(root: str | os.PathLike, name: str | None = None, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """ImageNet-style folders; every split must hold the same class folders, or labels would shift silently."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset path {root} is not a folder; expected {IMAGEFOLDER_LAYOUT}")
    dataset = Dataset(name=name or root.resolve().name, spec=f"imagefolder:{root}")
    reference: list[str] | None = None
    for split in splits:
        split_root = root / split
        if not split_root.is_dir():
            raise UserError(f"{split_root} is missing; expected {IMAGEFOLDER_LAYOUT}")
        classes, samples = _scan_class_folder(split_root)
        if not classes:
            raise UserError(f"{split_root} has no class folders; expected {IMAGEFOLDER_LAYOUT}")
        if not samples:
            raise UserError(f"{split_root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        if reference is not None and classes != reference:
            only_here = sorted(set(classes) - set(reference))[:5]
            only_there = sorted(set(reference) - set(classes))[:5]
            raise UserError(
                f"{split_root}: class folders differ from {root / splits[0]} "
                f"(only in {split}: {only_here}, only in {splits[0]}: {only_there}); expected {IMAGEFOLDER_LAYOUT}"
            )
        reference = classes
        dataset.splits[split] = FileSplit(root, samples, classes)
    return dataset


@dataclass(frozen=True)
class DatasetKind:
    """A spec prefix ``KIND:PATH`` and the function that turns ``PATH`` (and an optional name) into a Dataset."""

    kind: str
    load: Callable[[str, str | None], Dataset]
    usage: str
    description: str = ""


_DATASET_KINDS: dict[str, DatasetKind] = {}
# Modules that register kinds when imported; imported lazily so that ``data`` itself imports none of them.
_KIND_MODULES: list[str] = ["ssl_bench.transfer_data", "ssl_bench.inat_data"]
_RESERVED_KINDS = ("builtin", "imagefolder")


def register_dataset_kind(kind: str, load: Callable[[str, str | None], Dataset], usage: str | None = None,
                          description: str = "") -> None:
    """Make ``resolve_dataset("KIND:PATH")`` call ``load(PATH, name)``; re-registering a kind replaces it."""
    if kind in _RESERVED_KINDS or not kind.isidentifier():
        raise ValueError(f"dataset kind {kind!r} is reserved or not an identifier")
    _DATASET_KINDS[kind] = DatasetKind(kind, load, usage or f"{kind}:PATH", description)


def registered_dataset_kinds() -> dict[str, DatasetKind]:
    import importlib

    for module in list(_KIND_MODULES):
        importlib.import_module(module)
        _KIND_MODULES.remove(module)
    return dict(_DATASET_KINDS)


def dataset_kinds() -> list[str]:
    extra = [f"{k.usage} ({k.description})" if k.description else k.usage for k in registered_dataset_kinds().values()]
    return [f"builtin:{name}" for name in BUILTIN_DATASETS] + ["imagefolder:PATH", "PATH (an ImageFolder root)"] + extra


def resolve_dataset(spec: str, name: str | None = None) -> Dataset:
    """Turn a dataset spec string into a Dataset, or fail naming the specs that exist."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "builtin":
        if rest not in BUILTIN_DATASETS:
            raise UserError(f"unknown dataset {spec!r}; valid: {', '.join(dataset_kinds())}")
        dataset = BUILTIN_DATASETS[rest]()
        if name:
            dataset.name = name
        return dataset
    if sep and kind == "imagefolder":
        return image_folder(rest, name)
    if sep and kind in registered_dataset_kinds():
        return _DATASET_KINDS[kind].load(rest, name)
    if Path(spec).is_dir():
        return image_folder(spec, name)
    raise UserError(f"unknown dataset {spec!r}: not a folder and not a known spec; valid: {', '.join(dataset_kinds())}")

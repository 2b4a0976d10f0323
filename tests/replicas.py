"""Tiny on-disk replicas of dataset layouts, built from scikit-learn's digits (real images, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    bunch = load_digits()
    images = [
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")
        for img in bunch.images
    ]
    return images, bunch.target


def make_imagefolder(root: Path, classes: tuple[int, ...] = (0, 1, 7), train_per_class: int = 12,
                     val_per_class: int = 5, ext: str = ".JPEG") -> Path:
    """ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG, class folders named like ImageNet wnids."""
    images, labels = digit_images()
    for digit in classes:
        indices = np.flatnonzero(labels == digit)
        wnid = f"n0000000{digit}"
        for split, chosen in (("train", indices[:train_per_class]),
                              ("val", indices[train_per_class:train_per_class + val_per_class])):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                images[i].save(folder / f"{wnid}_{i}{ext}", quality=95)
    return root

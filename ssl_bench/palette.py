"""The PASCAL VOC / DAVIS colour map, generated here (no download), and indexed-PNG label images.

DAVIS annotations and results are single-channel label images whose pixel value is the object id; the palette
only colours them for viewing and never changes a metric (protocols.md §7.6). The map is the standard one: the
bits of the label are dealt out in turn to red, green and blue, most significant output bit first.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import UserError
from .io import atomic_write


def pascal_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours: label bit 3j + c sets bit 7 - j of channel c (c = 0 red, 1 green, 2 blue).

    Gives 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ..., 255 (224, 224, 192), the void colour.
    """
    labels = np.arange(n, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((labels >> (3 * j + channel)) & 1) << (7 - j)
    return colours.astype(np.uint8)


PALETTE: list[int] = pascal_palette().reshape(-1).tolist()  # flat [r0, g0, b0, r1, ...] as Image.putpalette takes it


def label_image(labels: np.ndarray) -> Image.Image:
    """A mode "P" image of a 2-D uint8 label map with the shipped palette."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"label map must be 2-D uint8; got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels)  # mode "L"; putpalette turns it into "P" with the same bytes as indices
    image.putpalette(PALETTE)
    return image


def save_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label map as an indexed PNG atomically (readers never see half a file)."""
    image = label_image(labels)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Object ids of a single-channel label image (indexed "P" or greyscale "L") as a 2-D uint8 array."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("P", "L"):
                raise UserError(f"{path}: label images must be single-channel (indexed P or L PNG); "
                                f"got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"label image {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read label image {path}: {error}") from None

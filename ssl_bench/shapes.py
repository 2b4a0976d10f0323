"""builtin:shapes: a procedurally generated image dataset on which representation learning is needed and visible.

Ten shape classes (disk, ring, triangle, square, star, cross, crescent, heart, arrow, hourglass), each image one
shape drawn under nuisance factors that say nothing about its class:

- position and size: the shape's centre anywhere that keeps most of it inside, radius 22-40 % of the side;
- rotation: uniform over the full turn;
- colour: the shape's and the background's hue and saturation drawn independently (hue uniform); the shape is
  bright (HSV value 0.75-1) on a dark background (0.1-0.35), shaded linearly across the image;
- background texture: a sum of three random low-frequency plane waves of random colour amplitude (<= 0.05);
- clutter: 1-2 small discs and line segments of random colours under the shape, at most 1 over it.

Raw pixels and a random-init network see mostly colour and position: a cosine 20-NN on raw pixels scores 19.6 %
and on the [CLS] of a random-init 4-block ViT 14.9 % (patch 8) or 15.6 % (patch 4), chance being 10 %. A
representation invariant to crop position, scale and colour (what multi-crop augmentation teaches) would separate
the classes. The polarity (bright shape, dark ground) keeps them learnable by small models: with polarity and hue
both free, a supervised 4-block ViT stayed at chance for 4 epochs; with the polarity fixed it reaches 30 % in 3.
The images and labels are a pure function of (seed, split, count): the dataset is the same on every machine, and
its manifest (the feature-cache key) hashes the pixels.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disk", "ring", "triangle", "square", "star", "cross", "crescent", "heart", "arrow", "hourglass")
IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
SPLIT_SIZES = {"train": 5000, "val": 1000}
SPLIT_STREAMS = {"train": 0, "val": 1}  # separate random streams, so the splits never share an image


def _polygon(points: np.ndarray, angle: float, radius: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    """Unit-radius outline ``points`` [P, 2] rotated by ``angle``, scaled and moved to ``centre``."""
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    return [(centre[0] + radius * x, centre[1] + radius * y) for x, y in rotated]


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    """A regular n-gon (or, with ``inner``, an n-pointed star alternating radius 1 and ``inner``)."""
    if inner is None:
        t = 2 * np.pi * np.arange(n) / n - np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    t = np.pi * np.arange(2 * n) / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    outline = np.stack([x, y + 2.5], 1)
    return outline / np.abs(outline).max()


OUTLINES = {
    "triangle": _regular(3),
    "square": _regular(4) * 0.95,
    "star": _regular(5, inner=0.42),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
                       [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
    "heart": _heart(),
    "arrow": np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.25], [-1, 0.25]]),
    "hourglass": np.array([[-0.8, -1], [0.8, -1], [0, 0], [0.8, 1], [-0.8, 1], [0, 0]]),
}


def shape_mask(name: str, centre: tuple[float, float], radius: float, angle: float, side: int) -> Image.Image:
    """The shape's coverage on a ``side`` x ``side`` canvas (mode L, 255 inside)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre

    def disk(x: float, y: float, r: float, fill: int) -> None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if name == "disk":
        disk(cx, cy, radius, 255)
    elif name == "ring":
        disk(cx, cy, radius, 255)
        disk(cx, cy, radius * 0.55, 0)
    elif name == "crescent":
        disk(cx, cy, radius, 255)
        offset = _polygon(np.array([[0.45, 0.0]]), angle, radius, centre)[0]
        disk(offset[0], offset[1], radius * 0.85, 0)
    else:
        draw.polygon(_polygon(OUTLINES[name], angle, radius, centre), fill=255)
    return mask


def _colour(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colour plus three low-frequency plane waves of random direction, frequency and colour amplitude."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.broadcast_to(_colour(rng, (0.1, 0.35)), (size, size, 3)).copy()
    for _ in range(3):
        theta, freq, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(theta) * x + np.sin(theta) * y) + phase)
        image += wave[..., None] * rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    return image


def _downsample(image: Image.Image, size: int) -> np.ndarray:
    """Box-filter a supersampled layer to ``size``; float32 in [0, 1], channels last."""
    array = np.asarray(image.resize((size, size), Image.BOX), dtype=np.float32) / 255
    return array if array.ndim == 3 else array[..., None]


def _clutter(rng: np.random.Generator, size: int, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """``low``-``high`` small discs and line segments: their premultiplied colours [size, size, 3] and coverage
    [size, size, 1], drawn supersampled."""
    side = size * SUPERSAMPLE
    layer = Image.new("RGB", (side, side))
    mask = Image.new("L", (side, side), 0)
    paint, cover = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for _ in range(rng.integers(low, high + 1)):
        colour = tuple(int(255 * c) for c in _colour(rng, (0.2, 1.0)))
        x, y = rng.uniform(0, side, size=2)
        if rng.random() < 0.5:
            r = rng.uniform(0.03, 0.07) * side
            for draw, fill in ((paint, colour), (cover, 255)):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            length, theta = rng.uniform(0.1, 0.3) * side, rng.uniform(0, 2 * np.pi)
            end = (x + length * math.cos(theta), y + length * math.sin(theta))
            width = max(1, int(0.03 * side))
            for draw, fill in ((paint, colour), (cover, 255)):
                draw.line([(x, y), end], fill=fill, width=width)
    return _downsample(layer, size), _downsample(mask, size)


def render_shape(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of class ``label`` [size, size, 3] uint8, every nuisance drawn from ``rng``."""
    side = size * SUPERSAMPLE
    radius = rng.uniform(0.22, 0.40) * side
    margin = 0.6 * radius
    centre = (rng.uniform(margin, side - margin), rng.uniform(margin, side - margin))
    mask = _downsample(shape_mask(CLASSES[label], centre, radius, rng.uniform(0, 2 * np.pi), side), size)
    background = _background(rng, size)
    # The shape's colour, shaded linearly across the image (direction and strength random).
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * np.pi)
    shade = 1 + rng.uniform(0, 0.4) * ((np.cos(theta) * x + np.sin(theta) * y) - 0.5)
    foreground = _colour(rng, (0.75, 1.0)) * shade[..., None]
    under, under_alpha = _clutter(rng, size, 1, 2)
    over, over_alpha = _clutter(rng, size, 0, 1)
    image = background * (1 - under_alpha) + under
    image = image * (1 - mask) + foreground * mask
    image = image * (1 - over_alpha) + over
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def generate_shapes(split: str, seed: int = 0, count: int | None = None, size: int = IMAGE_SIZE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images of ``split`` (default: SPLIT_SIZES) with balanced labels in a seeded order: (images [N, size,
    size, 3] uint8, labels [N])."""
    count = SPLIT_SIZES[split] if count is None else count
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    labels = rng.permutation(np.arange(count) % len(CLASSES))
    images = np.stack([render_shape(int(label), rng, size) for label in labels])
    return images, labels.astype(np.int64)

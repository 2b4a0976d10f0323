"""builtin:shapes: deterministic, balanced, geometrically right, and out of reach of raw pixels."""

from __future__ import annotations

import math

import numpy as np

from ssl_bench.data import resolve_dataset
from ssl_bench.shapes import CLASSES, generate_shapes, shape_mask


def test_generation_is_a_pure_function_of_seed_and_split():
    images, labels = generate_shapes("val", seed=0, count=40)
    again, labels_again = generate_shapes("val", seed=0, count=40)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10  # balanced
    other_seed, _ = generate_shapes("val", seed=1, count=40)
    train, _ = generate_shapes("train", seed=0, count=40)
    assert not np.array_equal(images, other_seed) and not np.array_equal(images, train)


def test_masks_cover_the_expected_areas():
    side, radius = 400, 100.0
    area = {name: np.asarray(shape_mask(name, (200, 200), radius, 0.3, side)).astype(bool).sum() / radius ** 2
            for name in CLASSES}
    assert math.isclose(area["disk"], math.pi, rel_tol=0.02)
    assert math.isclose(area["ring"], math.pi * (1 - 0.55 ** 2), rel_tol=0.03)
    # square inscribed in the circle of radius 0.95: side 0.95 sqrt 2, area 2 x 0.95^2
    assert math.isclose(area["square"], 2 * 0.95 ** 2, rel_tol=0.02)
    assert math.isclose(area["triangle"], 3 * math.sqrt(3) / 4, rel_tol=0.02)
    assert math.isclose(area["cross"], 5 * 0.6 ** 2 + 4 * 0.6 * 0.1, rel_tol=0.02)  # 2x2 bar cross, arms 0.6 wide
    assert all(0 < a < math.pi for name, a in area.items() if name != "disk")


def test_builtin_spec_and_raw_pixels_near_chance():
    dataset = resolve_dataset("builtin:shapes")
    assert dataset.num_classes == 10 and dataset.split("train").classes == list(CLASSES)
    assert (len(dataset.split("train")), len(dataset.split("val"))) == (5000, 1000)
    train, val = dataset.split("train"), dataset.split("val")
    # cosine 20-NN on raw pixels (the floor a representation must beat) stays far below a learned one
    a = train.images.reshape(len(train), -1).astype(np.float32)
    b = val.images[:300].reshape(300, -1).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :20]
    votes = np.stack([np.bincount(row, minlength=10) for row in train.labels[nearest]])
    accuracy = (votes.argmax(1) == val.labels[:300]).mean()
    assert 0.05 < accuracy < 0.30

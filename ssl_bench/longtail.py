"""Long-tailed evaluation: classes grouped by their number of training images (many-shot > 100, medium-shot
20-100, few-shot < 20, as in Liu et al. 2019), accuracy per group and mean per-class accuracy."""

from __future__ import annotations

import numpy as np

GROUPS = ("many", "medium", "few")


def shot_groups(train_counts: np.ndarray, many: int = 100, few: int = 20) -> np.ndarray:
    """Group name per class: "many" (> ``many`` training images), "few" (< ``few``), else "medium"."""
    if few > many:
        raise ValueError(f"few-shot threshold {few} above the many-shot one {many}")
    counts = np.asarray(train_counts)
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))


def group_accuracies(correct: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, many: int = 100,
                     few: int = 20) -> dict[str, tuple[float, int]]:
    """(accuracy %, number of test images) overall, as mean per-class accuracy (``mean_per_class``, over the
    classes with test images) and on the test images of each shot group; a group without test images is nan."""
    correct, labels = np.asarray(correct, dtype=bool), np.asarray(labels)
    groups = shot_groups(train_counts, many, few)
    result = {"top1": (100.0 * correct.mean(), len(correct))}
    present = np.unique(labels)
    per_class = [correct[labels == c].mean() for c in present]
    result["mean_per_class"] = (100.0 * float(np.mean(per_class)), len(correct))
    for group in GROUPS:
        inside = groups[labels] == group
        result[group] = (100.0 * correct[inside].mean() if inside.any() else float("nan"), int(inside.sum()))
    return result

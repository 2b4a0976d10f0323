"""Long-tailed evaluation: classes grouped by their number of training images (many-shot > 100, medium-shot
20-100, few-shot < 20, as in Liu et al. 2019), accuracy per group and mean per-class accuracy."""

from __future__ import annotations

import numpy as np

GROUPS = ("many", "medium", "few")
# result-row metric per entry of ``group_accuracies`` (top1 is the task's own row)
GROUP_METRICS = {"mean_per_class": "mean_per_class", "many": "acc_many", "medium": "acc_medium", "few": "acc_few"}


def shot_groups(train_counts: np.ndarray, many: int = 100, few: int = 20) -> np.ndarray:
    """Group name per class: "many" (> ``many`` training images), "few" (< ``few``), else "medium"."""
    if few > many:
        raise ValueError(f"few-shot threshold {few} above the many-shot one {many}")
    counts = np.asarray(train_counts)
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))


def class_hits(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(right answers per class, test images per class), each (num_classes,), from per-image outcomes."""
    correct, labels = np.asarray(correct, dtype=bool), np.asarray(labels)
    return np.bincount(labels[correct], minlength=num_classes), np.bincount(labels, minlength=num_classes)


def group_accuracies(hits: np.ndarray, counts: np.ndarray, train_counts: np.ndarray, many: int = 100,
                     few: int = 20) -> dict[str, tuple[float, int]]:
    """(accuracy %, number of test images) from per-class right answers ``hits`` and test images ``counts``:
    overall (``top1``), mean per-class accuracy (``mean_per_class``, over the classes with test images) and on the
    test images of each shot group of ``train_counts``; a group without test images is nan."""
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.int64)
    if not hits.shape == counts.shape == np.shape(train_counts):
        raise ValueError(f"per-class arrays differ in shape: hits {hits.shape}, counts {counts.shape}, "
                         f"train counts {np.shape(train_counts)}")
    groups = shot_groups(train_counts, many, few)
    present = counts > 0
    result = {
        "top1": (100.0 * hits.sum() / max(1, counts.sum()), int(counts.sum())),
        "mean_per_class": (100.0 * float(np.mean(hits[present] / counts[present])), int(counts.sum())),
    }
    for group in GROUPS:
        n = int(counts[groups == group].sum())
        result[group] = (100.0 * hits[groups == group].sum() / n if n else float("nan"), n)
    return result

"""The two fine-tuning lr schedules of protocols.md §8, as pure functions of the step or epoch.

``warmup_cosine_steps``  BEiT / iBOT ``utils.cosine_scheduler`` (ImageNet recipe, §8.1): one value per iteration.
``deit_epoch_lr``        DeiT / iBOT ``eval_cls.py`` (small-dataset recipe, §8.2, §13): timm's ``CosineLRScheduler``
                         stepped once per epoch as those scripts step it.
"""

from __future__ import annotations

import math

import numpy as np


def warmup_cosine_steps(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                        warmup_start: float = 0.0) -> np.ndarray:
    """lr of every iteration: ``linspace(warmup_start, base, W)`` over the W = warmup_epochs x steps_per_epoch first
    iterations (both ends included, as BEiT's), then ``final + (base - final)(1 + cos(pi i / n)) / 2`` for
    i = 0..n-1 over the n remaining iterations (``final`` itself is never reached)."""
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs, epochs) * steps_per_epoch
    head = np.linspace(warmup_start, base, warmup) if warmup > 0 else np.zeros(0)
    rest = total - warmup
    tail = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * np.arange(rest) / max(rest, 1)))
    return np.concatenate([head, tail])


def deit_epoch_lr(epoch: int, base: float, final: float, epochs: int, warmup_epochs: int,
                  warmup_start: float) -> float:
    """lr of 0-based ``epoch`` under DeiT's loop: the scheduler starts the optimiser at ``warmup_start`` and is
    stepped with ``step(e)`` after epoch e, so epoch 0 runs at ``warmup_start`` (at ``base`` without warmup) and
    epoch e >= 1 at the scheduler's value for t = e - 1: linear warmup ``warmup_start + t (base - warmup_start) /
    warmup_epochs`` while t < warmup_epochs, then ``final + (base - final)(1 + cos(pi t / epochs)) / 2``."""
    if epoch <= 0:
        return float(warmup_start if warmup_epochs > 0 else base)
    t = epoch - 1
    if t < warmup_epochs:
        return float(warmup_start + t * (base - warmup_start) / warmup_epochs)
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t / epochs)))

"""Per-iteration schedules (lr, weight decay, teacher momentum) and the per-epoch teacher temperature."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``base`` over ``warmup_epochs``, then a cosine from ``base`` to ``final``."""
    warmup_steps = min(warmup_epochs, epochs) * steps_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = epochs * steps_per_epoch - warmup_steps
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(steps) / max(steps, 1)))
    return np.concatenate([warmup, cosine])


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """Linear warmup ``warmup`` -> ``final`` over ``warmup_epochs`` epochs, constant afterwards (DINO)."""
    if epoch >= warmup_epochs:
        return final
    return float(np.linspace(warmup, final, warmup_epochs)[epoch])

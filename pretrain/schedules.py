"""Per-iteration schedules (lr, weight decay, teacher momentum) and the per-epoch teacher temperature."""

from __future__ import annotations

import numpy as np

from ssl_bench.lr_schedules import warmup_cosine_steps


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """DINO's and iBOT's ``utils.cosine_scheduler``, one value per iteration: ``linspace(warmup_start, base, W)``
    over the W = warmup_epochs x steps_per_epoch first iterations (``base`` included, as the references do), then
    ``final + (base - final)(1 + cos(pi i / n)) / 2`` for i = 0..n-1 over the n remaining ones. BEiT's fine-tuning
    schedule is the same formula, so both read the core's one implementation."""
    return warmup_cosine_steps(base, final, epochs, steps_per_epoch, warmup_epochs, warmup_start)


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """Linear warmup ``warmup`` -> ``final`` over ``warmup_epochs`` epochs, constant afterwards (DINO)."""
    if epoch >= warmup_epochs:
        return final
    return float(np.linspace(warmup, final, warmup_epochs)[epoch])

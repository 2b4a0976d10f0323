"""iBOT's block-wise masking of the student's global crops (Zhou et al. 2022, Sec. 3 and App. C).

Each global crop is masked with probability ``probability``; a masked crop gets a target ratio r drawn
uniformly from ``ratio`` and rectangles (area >= ``min_block`` patches, aspect ratio log-uniform in
[``aspect``, 1 / ``aspect``]) are added at random places until r * N patches are masked or ten tries in a
row add nothing. A block is accepted only if it adds at least one patch and does not overshoot the
target, so the masked fraction never exceeds r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Block(NamedTuple):
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class BlockMasking:
    """Masks for a (rows, cols) patch grid; ``min_block`` defaults to (min(rows, cols) // 3)^2 (16 on 14 x 14)."""

    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    aspect: float = 0.3
    min_block: int | None = None
    attempts: int = 10

    def __post_init__(self) -> None:
        low, high = self.ratio
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"mask probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask ratio range must satisfy 0 <= low <= high < 1, got {self.ratio}")
        if not 0.0 < self.aspect <= 1.0:
            raise ValueError(f"mask aspect must be in (0, 1], got {self.aspect}")

    def blocks(self, rows: int, cols: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, list[Block]]:
        """A mask [rows, cols] (bool) with about ``ratio`` of the patches masked, and the blocks that made it."""
        mask = np.zeros((rows, cols), dtype=bool)
        target = ratio * rows * cols
        min_area = self.min_block if self.min_block is not None else max((min(rows, cols) // 3) ** 2, 1)
        log_aspect = (math.log(self.aspect), -math.log(self.aspect))
        placed: list[Block] = []
        masked = 0
        while masked < target:
            budget = target - masked
            added = 0
            for _ in range(self.attempts):
                area = rng.uniform(min_area, max(budget, min_area))
                aspect = math.exp(rng.uniform(*log_aspect))
                height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (0 < height < rows and 0 < width < cols):
                    continue
                top, left = int(rng.integers(0, rows - height + 1)), int(rng.integers(0, cols - width + 1))
                window = mask[top:top + height, left:left + width]
                new = height * width - int(window.sum())
                if 0 < new <= budget:
                    window[:] = True
                    placed.append(Block(top, left, height, width))
                    added = new
                    break
            if added == 0:
                break
            masked += added
        return mask, placed

    def __call__(self, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
        """One crop's mask: all False with probability 1 - ``probability``, else block-masked at a random ratio."""
        if rng.random() >= self.probability:
            return np.zeros((rows, cols), dtype=bool)
        return self.blocks(rows, cols, rng.uniform(*self.ratio), rng)[0]

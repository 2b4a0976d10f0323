"""Per-epoch health statistics of DINO training: teacher sharpness, collapse, prototype norms.

A collapsing teacher shows as entropy -> 0 with KL(mean || uniform) -> log K (one prototype for all)
or entropy -> log K with KL -> 0 (uniform output); DINO-vMF's trained norms are watched via ``norm_stats``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def teacher_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of H(p_b) = -sum_k p_bk log p_bk (nats) for probs [B, K]; a 0-dim tensor (no sync)."""
    return -torch.special.xlogy(probs.float(), probs.float()).sum(dim=-1).mean()


def kl_to_uniform(probs: Tensor) -> Tensor:
    """KL(mean_b p_b || uniform) = log K - H(mean_b p_b) for probs [B, K]; 0 when all prototypes are used evenly."""
    mean = probs.float().reshape(-1, probs.shape[-1]).mean(dim=0)
    return math.log(probs.shape[-1]) + torch.special.xlogy(mean, mean).sum()


def collapse_warning(entropy: float, kl_uniform: float, n_prototypes: int, tolerance: float = 0.01) -> str | None:
    """A sentence when an epoch's mean teacher statistics are those of a collapsed run, else None: uniform output
    (entropy within ``tolerance`` of log K and KL(mean || uniform) below ``tolerance``: every image gets the same
    flat distribution) or one prototype for every image (KL above (1 - tolerance) log K)."""
    log_k = math.log(n_prototypes)
    if entropy > log_k * (1 - tolerance) and kl_uniform < tolerance:
        return (f"the teacher's output is uniform over its {n_prototypes} prototypes (entropy {entropy:.3f} of "
                f"log K = {log_k:.3f}, KL to uniform {kl_uniform:.4f}): the representation has collapsed")
    if kl_uniform > log_k * (1 - tolerance):
        return (f"the teacher puts every image on one prototype (KL of its mean output to uniform {kl_uniform:.3f} "
                f"of log K = {log_k:.3f}): the representation has collapsed")
    return None


def mean_pairwise_cosine(features: Tensor) -> float:
    """Mean cosine similarity over the pairs of distinct rows of ``features`` [N, D], N >= 2: near 1 when every
    image gets the same representation (a collapsed backbone), whatever the head does."""
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    total = unit.sum(dim=0)
    n = unit.shape[0]
    return float((total @ total - n) / (n * (n - 1)))


def representation_warning(cosine: float, threshold: float = 0.99) -> str | None:
    """A sentence when the backbone's features of the probe images are nearly all the same direction, else None."""
    if cosine > threshold:
        return (f"the teacher's [CLS] features of the probe images are nearly identical (mean pairwise cosine "
                f"{cosine:.4f} > {threshold}): the representation has collapsed")
    return None


def norm_stats(norms: Tensor) -> dict[str, float]:
    """min, mean, max and the 5th / 50th / 95th percentiles of the prototype norms [K], as floats."""
    values = norms.detach().double().flatten()
    quantiles = torch.quantile(values, values.new_tensor([0.05, 0.5, 0.95])).tolist()
    return {
        "min": values.min().item(),
        "mean": values.mean().item(),
        "max": values.max().item(),
        "p5": quantiles[0],
        "p50": quantiles[1],
        "p95": quantiles[2],
    }

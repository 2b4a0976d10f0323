"""KoLeo-Proto: the Kozachenko-Leonenko entropy estimator on the L2-normalised prototypes, against partial
prototype collapse: loss = -mean_i log(min_{j != i} ||p_i - p_j|| + eps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def nearest_neighbours(points: Tensor, block_size: int = 4096) -> Tensor:
    """Index of each row's nearest other row by cosine similarity (rows L2-normalised), in row blocks so a
    K x K matrix is never held whole (K = 65536 prototypes)."""
    n = points.shape[0]
    out = torch.empty(n, dtype=torch.long, device=points.device)
    for start in range(0, n, block_size):
        sims = points[start:start + block_size] @ points.T
        rows = torch.arange(sims.shape[0], device=points.device)
        sims[rows, rows + start] = -float("inf")  # never one's own neighbour
        out[start:start + block_size] = sims.argmax(dim=1)
    return out


def koleo_loss(prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """prototypes [K, p] (any norm) -> scalar. The neighbour search carries no gradient; the distances do."""
    if prototypes.shape[0] < 2:
        raise ValueError("KoLeo needs at least two prototypes")
    points = F.normalize(prototypes.float(), dim=-1)
    neighbours = nearest_neighbours(points.detach())
    distances = (points - points[neighbours]).norm(dim=-1)
    return -torch.log(distances + eps).mean()

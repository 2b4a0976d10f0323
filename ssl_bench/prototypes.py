"""Unique prototypes: how many of a DINO head's K prototypes are not near-copies of another.

DINO-vMF (Govindarajan et al. 2023, Sec. 5) reports the number of unique prototypes as evidence
that most of DINO's 65536 prototypes collapse onto a few; the trainer's monitor and the
``prototypes`` evaluation task both count them with ``unique_prototypes``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def unique_prototypes(weights: Tensor, threshold: float, block_size: int = 2048) -> tuple[int, Tensor]:
    """Greedy de-duplication of the L2-normalised prototypes weights [K, p], in index order.

    A prototype is kept unless its cosine to an already kept prototype is > ``threshold`` (strictly).
    Returns (number kept, representative [K] long): representative[k] == k for a kept prototype, else
    the index of the kept prototype (earlier in index order) most similar to it, ties to the lower index.
    ``representative == arange(K)`` is the kept mask; ``duplicate_set_sizes`` gives the set sizes.

    Memory stays O(K p + block_size^2): rows are taken ``block_size`` at a time, compared with the kept
    set in [block_size, block_size] matmul chunks, then scanned in order with the block's own Gram matrix.
    The matmuls run on the weights' device in float32 (with TF32 matmuls enabled on CUDA, cosines are
    only ~1e-3 accurate near the threshold); the scan runs on the CPU. The result is on the weights' device.
    """
    if weights.ndim != 2:
        raise ValueError(f"unique_prototypes: expected weights [K, p], got shape {tuple(weights.shape)}")
    if block_size < 1:
        raise ValueError(f"unique_prototypes: block_size must be >= 1, got {block_size}")
    n, dim = weights.shape
    unit = F.normalize(weights.detach().float(), dim=1)
    kept_vectors = unit.new_empty(n, dim)  # kept prototypes, in index order
    kept_index = np.empty(n, dtype=np.int64)  # their indices
    n_kept = 0
    representative = np.empty(n, dtype=np.int64)
    for start in range(0, n, block_size):
        block = unit[start:start + block_size]
        size = block.shape[0]
        # best cosine to any prototype kept in earlier blocks (strict > keeps the earlier chunk on ties)
        best_cos = torch.full((size,), -torch.inf, device=unit.device)
        best_pos = torch.zeros(size, dtype=torch.long, device=unit.device)
        for chunk in range(0, n_kept, block_size):
            values, positions = (block @ kept_vectors[chunk:min(chunk + block_size, n_kept)].T).max(dim=1)
            better = values > best_cos
            best_cos = torch.where(better, values, best_cos)
            best_pos = torch.where(better, positions + chunk, best_pos)
        best_cos_np = best_cos.cpu().numpy()
        earlier_rep = kept_index[best_pos.cpu().numpy()] if n_kept else np.zeros(size, dtype=np.int64)
        gram = (block @ block.T).cpu().numpy()

        duplicate = best_cos_np > threshold
        local_kept = []
        for i in range(size):
            if duplicate[i]:
                continue
            local_kept.append(i)
            duplicate[i + 1:] |= gram[i, i + 1:] > threshold
        local_kept_np = np.asarray(local_kept, dtype=np.int64)

        block_rep = earlier_rep.copy()
        if local_kept:
            # most similar kept prototype of this block that comes before row j
            sims = gram[local_kept_np]
            sims = np.where(local_kept_np[:, None] < np.arange(size)[None, :], sims, -np.inf)
            in_block_cos = sims.max(axis=0)
            in_block_rep = start + local_kept_np[sims.argmax(axis=0)]
            use_block = in_block_cos > best_cos_np
            block_rep[use_block] = in_block_rep[use_block]
            block_rep[local_kept_np] = start + local_kept_np
            kept_vectors[n_kept:n_kept + len(local_kept)] = block[torch.from_numpy(local_kept_np).to(unit.device)]
            kept_index[n_kept:n_kept + len(local_kept)] = start + local_kept_np
            n_kept += len(local_kept)
        representative[start:start + size] = block_rep
    return n_kept, torch.from_numpy(representative).to(weights.device)


def duplicate_set_sizes(representative: Tensor) -> Tensor:
    """Size of each kept prototype's set (itself plus the prototypes it represents), in index order [n_unique]."""
    kept = representative == torch.arange(representative.numel(), device=representative.device)
    return torch.bincount(representative, minlength=representative.numel())[kept]


# --- prototype utilisation (the ``prototypes`` task; DINO-vMF Sec. 5, Fig. 2) ------------------------------------

def void_prototypes(assignments: Tensor, n_prototypes: int) -> Tensor:
    """Mask [K] of the prototypes that are the assignment (argmax) of no sample; ``assignments`` [N] long."""
    return torch.bincount(assignments.reshape(-1).cpu(), minlength=n_prototypes) == 0


def cosine_to_negative_mean(weights: Tensor, y_mean: Tensor) -> Tensor:
    """Cosine [K] between each prototype w_k [K, p] and -y_mean [p] (the mean of the L2-normalised outputs y)."""
    return F.normalize(weights.detach().double(), dim=1) @ F.normalize(-y_mean.detach().double(), dim=0)


def kappa_bins(kappa: Tensor, used: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Percentile bins of the used prototypes' concentrations kappa [K] (``used`` [K] bool).

    Returns (edges [n_bins + 1] float64: the 0, 1/n, ..., 1 quantiles of kappa[used], linear interpolation;
    bin [K] long: the bin of each used prototype, -1 for unused ones). Bin i holds edges[i] <= kappa < edges[i+1],
    the last bin also kappa == edges[-1]; with tied kappas some bins can be empty.
    """
    if n_bins < 1:
        raise ValueError(f"kappa_bins: n_bins must be >= 1, got {n_bins}")
    kappa = kappa.detach().double().cpu()
    used = used.cpu()
    if not bool(used.any()):
        return torch.full((n_bins + 1,), float("nan"), dtype=torch.float64), torch.full_like(used, -1, dtype=torch.long)
    edges = torch.quantile(kappa[used], torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    bins = torch.bucketize(kappa, edges[1:-1], right=True)
    return edges, torch.where(used, bins, torch.full_like(bins, -1))


def accuracy_by_bin(prototype_bin: Tensor, assignments: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Accuracy (%) [n_bins] of the samples whose assigned prototype lies in each bin (nan for a bin without
    samples) and the number of those samples [n_bins]; ``prototype_bin`` [K] from ``kappa_bins``,
    ``assignments`` [M] prototype indices, ``correct`` [M] bool."""
    sample_bin = prototype_bin.cpu()[assignments.cpu()]
    inside = sample_bin >= 0
    counts = torch.bincount(sample_bin[inside], minlength=n_bins)
    hits = torch.bincount(sample_bin[inside], weights=correct.cpu()[inside].double(), minlength=n_bins)
    accuracy = torch.where(counts > 0, 100.0 * hits / counts.clamp(min=1), torch.full_like(hits, float("nan")))
    return accuracy, counts

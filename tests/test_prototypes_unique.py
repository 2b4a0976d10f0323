"""Unique prototypes (ssl_bench/prototypes.py): known duplicates, greedy threshold semantics, blocking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_bench.prototypes import duplicate_set_sizes, unique_prototypes


def _angle(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def _brute_force(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """The definition, one prototype at a time on the full similarity matrix."""
    unit = F.normalize(weights.double(), dim=1)
    sims = unit @ unit.T
    kept: list[int] = []
    rep = torch.empty(len(weights), dtype=torch.long)
    for k in range(len(weights)):
        if kept and sims[k, kept].max() > threshold:
            rep[k] = kept[int(sims[k, kept].argmax())]
        else:
            kept.append(k)
            rep[k] = k
    return rep


def _clustered(n_clusters: int, copies: int, n_distinct: int, dim: int, seed: int) -> torch.Tensor:
    """Orthogonal directions: ``copies`` near-identical (cos > 0.99) vectors for each of the first
    ``n_clusters``, one vector for each of the next ``n_distinct``; rows shuffled, lengths varied."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0][: n_clusters + n_distinct]
    rows = [basis[c] + 0.01 * torch.randn(dim, generator=generator) for c in range(n_clusters) for _ in range(copies)]
    rows += [basis[n_clusters + d] for d in range(n_distinct)]
    weights = torch.stack(rows) * (0.5 + torch.rand(len(rows), 1, generator=generator) * 3)
    return weights[torch.randperm(len(rows), generator=generator)]


def test_three_clusters_and_five_distinct_give_eight():
    weights = _clustered(n_clusters=3, copies=4, n_distinct=5, dim=16, seed=0)
    count, rep = unique_prototypes(weights, threshold=0.9)
    assert count == 8
    kept = rep == torch.arange(len(weights))
    assert kept.sum() == 8
    assert sorted(duplicate_set_sizes(rep).tolist()) == [1, 1, 1, 1, 1, 4, 4, 4]
    assert torch.equal(rep, _brute_force(weights, 0.9))
    # each duplicate points at the first member of its cluster (the one kept), which comes earlier
    unit = F.normalize(weights, dim=1)
    assert (rep <= torch.arange(len(weights))).all()
    assert ((unit * unit[rep]).sum(dim=1) > 0.9).all()


def test_orthogonal_prototypes_are_all_unique():
    count, rep = unique_prototypes(torch.eye(10) * 3.0, threshold=0.1)
    assert count == 10 and torch.equal(rep, torch.arange(10))
    assert torch.equal(duplicate_set_sizes(rep), torch.ones(10, dtype=torch.long))


def test_threshold_is_strict_and_greedy_in_index_order():
    # A at 0 deg, B at 20 deg, C at 40 deg; threshold cos 30 deg = 0.866:
    # cos(A, B) = cos(B, C) = 0.940 > 0.866, cos(A, C) = 0.766 < 0.866.
    # Index order A, B, C: A kept, B a duplicate of A, C kept (B was not kept, so it cannot remove C) -> 2.
    abc = torch.tensor([_angle(0), _angle(20), _angle(40)])
    count, rep = unique_prototypes(abc, threshold=math.cos(math.radians(30)))
    assert count == 2 and rep.tolist() == [0, 0, 2]
    # Index order B, A, C: B kept first and removes both -> 1.
    count, rep = unique_prototypes(abc[[1, 0, 2]], threshold=math.cos(math.radians(30)))
    assert count == 1 and rep.tolist() == [0, 0, 0]
    # cos(A, B) = 0.9397: a duplicate just below it, distinct just above it (strict >)
    assert unique_prototypes(abc[:2], threshold=0.9396)[0] == 1
    assert unique_prototypes(abc[:2], threshold=0.9398)[0] == 2
    # identical vectors (cos 1) are duplicates at any threshold below 1, never at 1 itself
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert unique_prototypes(same, threshold=0.999)[0] == 1
    assert unique_prototypes(same, threshold=1.0)[0] == 2


def test_duplicate_points_at_most_similar_kept_prototype():
    # A 0 deg, C 40 deg (cos 0.766: both kept at 0.85), D 25 deg: cos(A, D) = 0.906, cos(C, D) = 0.966 -> C
    acd = torch.tensor([_angle(0), _angle(40), _angle(25)])
    count, rep = unique_prototypes(acd, threshold=0.85)
    assert count == 2 and rep.tolist() == [0, 1, 1]
    assert duplicate_set_sizes(rep).tolist() == [1, 2]


# one_thread (conftest): tiny blocks mean thousands of tiny reductions, slow with OpenMP hand-offs on a busy runner
@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 16])
def test_block_size_does_not_change_the_answer(block_size, one_thread):
    # 5 clusters of 4, 10 distinct, 20 random (cosines spread around 0): 50 rows, clusters straddle blocks
    weights = _clustered(n_clusters=5, copies=4, n_distinct=10, dim=32, seed=1)
    weights = torch.cat([weights, torch.randn(20, 32, generator=torch.Generator().manual_seed(2))])
    one_block = unique_prototypes(weights, threshold=0.5, block_size=10_000)
    blocked = unique_prototypes(weights, threshold=0.5, block_size=block_size)
    assert blocked[0] == one_block[0]
    assert torch.equal(blocked[1], one_block[1])
    assert torch.equal(one_block[1], _brute_force(weights, 0.5))


def test_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\[K, p\]"):
        unique_prototypes(torch.zeros(3), threshold=0.9)
    with pytest.raises(ValueError, match="block_size"):
        unique_prototypes(torch.zeros(3, 2), threshold=0.9, block_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    weights = _clustered(n_clusters=9, copies=7, n_distinct=20, dim=32, seed=3)
    count, rep = unique_prototypes(weights.cuda(), threshold=0.9, block_size=16)
    assert rep.device.type == "cuda"
    cpu_count, cpu_rep = unique_prototypes(weights, threshold=0.9)
    assert count == cpu_count == 29 and torch.equal(rep.cpu(), cpu_rep)

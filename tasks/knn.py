"""Weighted kNN on frozen features (DINO's ``eval_knn``, protocols.md §2), with one similarity pass for every k.

The reference recomputes the full similarity and its top-k once per k; here the ``max(ks)`` nearest neighbours
are found once, in blocks of (test rows x train rows) with a running top-k merge so that no test x train
matrix is ever held whole, and every k reads the first k of the sorted neighbour list.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_bench.context import TaskContext
from ssl_bench.errors import UserError
from ssl_bench.longtail import GROUP_METRICS, group_accuracies
from ssl_bench.options import (check_choice, check_feature, check_ints_at_least, check_positive, check_shot_groups,
                               check_transform)
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.runtime import strict_fp32

log = logging.getLogger(__name__)

KNN_VERSION = "dino-knn-v1"
DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
BACKENDS = ("auto", "torch", "faiss")

# Block sizes (test rows x train rows). CPU: 4096 x 16384 fp32 = 256 MiB. Smaller blocks are as fast on an idle
# machine, but each block costs ~15 small ops, each an OpenMP region that waits for every thread: with another
# process on one of the 2 cores, 1024 x 4096 blocks took 3.4x as long as these (43 s against 12.5 s for 10k
# test rows). CUDA: 4096 x 262144 x 4 B = 4 GiB per block keeps the GPU busy.
_CPU_TEST_CHUNK, _CPU_TRAIN_CHUNK = 4096, 16384
_CUDA_TEST_CHUNK, _CUDA_TRAIN_CHUNK = 4096, 262144
_FAISS_TEST_CHUNK = 8192
# Columns are looked at in groups of this many (``_group_maxima``).
_GROUP = 8
# Above this fraction of surviving groups, a plain top-k of the block is cheaper than gathering the groups.
_DENSE_FRACTION = 0.25
# Blocks at least this many times k groups wide take their top-k through group maxima (``_block_topk``).
_TWO_LEVEL_GROUPS = 8
# Rows x classes held at once when counting votes.
_VOTE_ELEMENTS = 1 << 24
_CORRECT_ROWS = 4096  # test rows voted at once by knn_correct


def _faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto``: faiss for CPU tensors when faiss is installed, torch otherwise (CUDA tensors, no faiss).

    Measured with ``benchmarks/knn.py`` (100k train x 10k test x 384, ks 10/20/100/200, 2 threads, this 2-core
    CPU, idle): reference 30.7 s, torch 4.75 s, faiss 3.71 s, same accuracies. Both run one fp32 sgemm at about
    the machine's peak; faiss selects inside its own blocked loop (a per-query heap that rejects almost every
    similarity with one comparison while the block is in cache), whereas the torch path needs a dozen separate
    tensor ops per block (group maxima, gathers, top-k merges). Those ops also make torch the more fragile
    one when another process shares the cores (measured 13.6 s against faiss 11.5 s and reference 83 s).
    faiss-cpu cannot search CUDA tensors in place, so there torch (sgemm + block top-k on the GPU) is used.
    """
    if backend not in BACKENDS:
        raise UserError(f"kNN backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if torch.device(device).type == "cpu" and _faiss_available() else "torch"
    return backend


def _check_inputs(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise UserError(
            f"kNN needs 2-D features (N, D); got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise UserError(f"kNN: train features have dim {train_features.shape[1]}, test features {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],) or test_labels.shape != (test_features.shape[0],):
        raise UserError(
            f"kNN: labels must be 1-D with one entry per feature row; got train labels {tuple(train_labels.shape)} "
            f"for {train_features.shape[0]} rows, test labels {tuple(test_labels.shape)} for {test_features.shape[0]} rows"
        )
    if train_labels.is_floating_point() or test_labels.is_floating_point():
        raise UserError("kNN: labels must be integer class indices")
    if test_features.shape[0] == 0:
        raise UserError("kNN: the test set is empty")
    for name, x in (("train", train_features), ("test", test_features)):
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"kNN: {name} features contain NaN or inf")


def _normalize(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows scaled to unit L2 norm in fp32, as the reference does before its similarity."""
    return F.normalize(x.to(device=device, dtype=torch.float32), dim=1, p=2)


def _merge(
    best_v: torch.Tensor, best_i: torch.Tensor, cand_v: torch.Tensor, cand_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k merge: the k largest of (best, candidates), row by row, unsorted."""
    top_v, pos = torch.cat([best_v, cand_v], dim=1).topk(k, dim=1, sorted=False)
    width = best_v.shape[1]
    from_best = best_i.gather(1, pos.clamp(max=width - 1))
    from_cand = cand_i.gather(1, (pos - width).clamp(min=0))
    return top_v, torch.where(pos < width, from_best, from_cand)


def _block_candidates(
    sims: torch.Tensor, kth: torch.Tensor | None, start: int, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidates of one block (test rows x train rows) for the running top-k; None when none can enter it.

    With a threshold (CPU; each row's current k-th best similarity), only a group whose maximum beats it can hold
    a new neighbour. Once the threshold is warm few groups do, so the block is read twice (sgemm output, group
    maxima) and only the groups of the best group maxima (as many as the most any row has alive) are gathered,
    instead of partially sorting the whole block. Without a threshold it is the block's own top-k.
    """
    if kth is None:
        values, indices = _block_topk(sims, k)
        return values, indices + start
    groups, maxima = _group_maxima(sims)
    most = int((maxima > kth).sum(dim=1).max())
    if most == 0:
        return None
    if most > _DENSE_FRACTION * maxima.shape[1]:
        values, indices = _block_topk(sims, k)
        return values, indices + start
    values, indices = _gather_groups(groups, maxima.topk(most, dim=1, sorted=False)[1])
    return values, indices + start


def _group_maxima(sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block as (m, G, n / G) strided groups (padded with -inf to a multiple of G) and their maxima (m, n / G).

    Group c of a block n wide holds columns c, c + n/G, c + 2n/G, ...: its maximum is an element-wise maximum of G
    contiguous slices, which vectorises (groups of G adjacent columns measured 1.4x slower on the 2-core CPU).
    """
    m, n = sims.shape
    if n % _GROUP:
        sims = F.pad(sims, (0, _GROUP - n % _GROUP), value=-math.inf)
    groups = sims.view(m, _GROUP, -1)
    return groups, groups.amax(dim=1)


def _gather_groups(groups: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (m, G c) and block columns (m, G c) of the c chosen groups (m, c) of each row."""
    m, g, width = groups.shape
    values = groups.gather(2, chosen[:, None, :].expand(m, g, chosen.shape[1]))
    columns = chosen[:, None, :] + width * torch.arange(g, device=groups.device)[None, :, None]
    return values.reshape(m, -1), columns.reshape(m, -1)


def _block_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row (unsorted), for blocks without a useful threshold.

    On wide blocks it goes through group maxima: the k largest values lie in the k groups with the largest
    maxima (a group holding one of them has a maximum at least as large as the k-th value, and at most k groups
    can), so a top-k over n / G maxima plus one over k * G gathered values replaces a top-k over n values.
    """
    n = sims.shape[1]
    if n < _TWO_LEVEL_GROUPS * k * _GROUP:
        return sims.topk(min(k, n), dim=1, sorted=False)
    groups, maxima = _group_maxima(sims)
    members, columns = _gather_groups(groups, maxima.topk(k, dim=1, sorted=False)[1])
    values, slots = members.topk(k, dim=1, sorted=False)
    return values, columns.gather(1, slots)


def _sort_neighbours(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending similarity, equal similarities by train index: the order then does not depend on the blocking."""
    indices, order = indices.sort(dim=1)
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def _torch_neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, test_chunk: int, train_chunk: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    use_filter = train.device.type == "cpu"  # on CUDA the block top-k is cheap and a filter would sync per block
    n_train = train.shape[0]
    # One buffer for every block's similarities: a new block is never allocated while the last one is alive.
    buffer = test.new_empty(min(test_chunk, test.shape[0]) * min(train_chunk, n_train))
    for t0 in range(0, test.shape[0], test_chunk):
        query = test[t0:t0 + test_chunk]
        m = query.shape[0]
        best_v = query.new_full((m, k), -math.inf)
        best_i = torch.zeros((m, k), dtype=torch.long, device=query.device)
        filled = 0  # train rows seen; until k of them are, the threshold is -inf and useless
        for s0 in range(0, n_train, train_chunk):
            block = train[s0:s0 + train_chunk]
            sims = torch.mm(query, block.T, out=buffer[:m * block.shape[0]].view(m, block.shape[0]))
            kth = best_v.amin(dim=1, keepdim=True) if use_filter and filled >= k else None
            cand = _block_candidates(sims, kth, s0, k)
            if cand is not None:
                best_v, best_i = _merge(best_v, best_i, cand[0], cand[1], k)
            filled += sims.shape[1]
        values, indices = _sort_neighbours(best_v, best_i)
        yield t0, values, indices


def _faiss_neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, test_chunk: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    try:
        import faiss  # lazily: only this backend needs it
    except ImportError as error:
        raise UserError("kNN backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)") from error
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.detach().cpu().contiguous().numpy())
    test_cpu = test.detach().cpu().contiguous().numpy()
    for t0 in range(0, test_cpu.shape[0], test_chunk):
        values, indices = index.search(test_cpu[t0:t0 + test_chunk], k)
        values, indices = _sort_neighbours(torch.from_numpy(values), torch.from_numpy(indices))
        yield t0, values.to(test.device), indices.to(test.device)


def _neighbour_chunks(
    train: torch.Tensor, test: torch.Tensor, k: int, backend: str,
    test_chunk_size: int | None, train_chunk_size: int | None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first test row, similarities (m, k) sorted descending, train indices (m, k)) per chunk of test rows."""
    for name, size in (("test_chunk_size", test_chunk_size), ("train_chunk_size", train_chunk_size)):
        if size is not None and size < 1:
            raise UserError(f"kNN {name} must be >= 1; got {size}")
    cuda = train.device.type == "cuda"
    if backend == "faiss":
        return _faiss_neighbours(train, test, k, test_chunk_size or _FAISS_TEST_CHUNK)
    test_chunk = test_chunk_size or (_CUDA_TEST_CHUNK if cuda else _CPU_TEST_CHUNK)
    train_chunk = train_chunk_size or (_CUDA_TRAIN_CHUNK if cuda else _CPU_TRAIN_CHUNK)
    return _torch_neighbours(train, test, k, test_chunk, train_chunk)


def _validate_ks(ks: Sequence[int], n_train: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise UserError("kNN: ks is empty; give at least one k")
    if ks[0] < 1:
        raise UserError(f"kNN: every k must be >= 1; got {ks[0]}")
    if ks[-1] > n_train:
        raise UserError(f"kNN: k={ks[-1]} is larger than the {n_train} training samples; use ks <= {n_train}")
    return ks


def knn_search(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    backend: str = "auto",
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (M, k) sorted descending and train indices (M, k) of each test row's k nearest neighbours.

    Rows are L2-normalised here; memory is bounded by one block of test x train rows, never the full matrix.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise UserError(
            f"kNN needs 2-D features of equal dim; got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    (k,) = _validate_ks([k], train_features.shape[0])
    device = train_features.device
    backend = _resolve_backend(backend, device)
    train, test = _normalize(train_features, device), _normalize(test_features, device)
    parts = list(_neighbour_chunks(train, test, k, backend, test_chunk_size, train_chunk_size))
    if not parts:
        return test.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=device)
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _count_hits(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, targets: torch.Tensor, ks: list[int],
    temperature: float, num_classes: int,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Top-1 / top-5 hits per target class (num_classes,) and per k for one chunk of test rows (neighbours sorted
    by similarity).

    Class score = sum of exp(s / T) over the class's neighbours among the first k. A row is a top-1 hit when its
    class ranks first and a top-5 hit when it ranks among the first min(5, k) (dino's rule). Equal scores, the
    zero scores of classes without a neighbour included, rank the smaller class index first: that is the order
    ``torch.sort`` gives the reference, so its numbers are reproduced exactly, and the rule is the same on any device.
    Classes above the largest label only add zero scores after every real class, so ``num_classes`` cannot change
    a rank. A target outside [0, num_classes) is never a hit.
    """
    m = sims.shape[0]
    weights = (sims / temperature).exp()
    in_range = (targets >= 0) & (targets < num_classes)
    safe_targets = targets.clamp(0, num_classes - 1)[:, None]
    class_ids = torch.arange(num_classes, device=sims.device)[None, :]
    scores = sims.new_zeros((m, num_classes))
    hits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done = 0
    for k in ks:  # ascending: each k adds the votes of neighbours done..k-1 to the scores of the previous k
        scores.scatter_add_(1, neighbour_labels[:, done:k], weights[:, done:k])
        done = k
        target_score = scores.gather(1, safe_targets)
        rank = (scores > target_score).sum(1) + ((scores == target_score) & (class_ids < safe_targets)).sum(1)
        hits[k] = tuple(torch.zeros(num_classes, dtype=torch.long, device=sims.device).index_add_(
            0, safe_targets[:, 0], (in_range & hit).long()) for hit in (rank == 0, rank < min(5, k)))
    return hits


def knn_class_hits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Weighted kNN hits per class, ``{k: (top1 hits, top5 hits)}``, each (num_classes,) int: how many test rows of
    each class the classifier gets right (top-1) or ranks among its first min(5, k) classes. Arguments and rules
    as ``knn_classify``; per-class counts are what the long-tail groups and mean per-class accuracy need."""
    _check_inputs(train_features, train_labels, test_features, test_labels)
    if not temperature > 0:
        raise UserError(f"kNN temperature must be > 0; got {temperature}")
    ks = _validate_ks(ks, train_features.shape[0])
    device = train_features.device
    backend = _resolve_backend(backend, device)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    if int(train_labels.min()) < 0:
        raise UserError(f"kNN: train labels must be >= 0; found {int(train_labels.min())}")
    inferred = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    if num_classes is None:
        num_classes = inferred
    elif int(train_labels.max()) >= num_classes:
        raise UserError(f"kNN: train label {int(train_labels.max())} does not fit num_classes={num_classes}")

    train, test = _normalize(train_features, device), _normalize(test_features, device)
    k_max = ks[-1]
    vote_rows = max(1, _VOTE_ELEMENTS // num_classes)
    totals = {k: [torch.zeros(num_classes, dtype=torch.long, device=device) for _ in range(2)] for k in ks}
    for t0, sims, indices in _neighbour_chunks(train, test, k_max, backend, test_chunk_size, train_chunk_size):
        neighbour_labels = train_labels[indices]
        for r0 in range(0, sims.shape[0], vote_rows):
            rows = slice(r0, r0 + vote_rows)
            targets = test_labels[t0 + r0:t0 + r0 + sims[rows].shape[0]]
            for k, (top1, top5) in _count_hits(sims[rows], neighbour_labels[rows], targets, ks, temperature,
                                               num_classes).items():
                totals[k][0] += top1
                totals[k][1] += top5
    return {k: (top1.cpu().numpy(), top5.cpu().numpy()) for k, (top1, top5) in totals.items()}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
) -> dict[int, tuple[float, float]]:
    """Weighted kNN accuracy, ``{k: (top1 %, top5 %)}`` for each k in ``ks`` (sorted), DINO protocol (§2).

    train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,), on any one device (the
    train features' device is used). Features are L2-normalised here (fp32); each test row's ``max(ks)`` nearest
    train rows by cosine similarity are found once and every k uses the first k of them, voting exp(s / T) for
    their class. Paper defaults: ks (10, 20, 100, 200), T 0.07. ``num_classes`` defaults to max label + 1.
    backend: ``torch``, ``faiss`` (IndexFlatIP on CPU copies) or ``auto`` (see ``_resolve_backend``).
    Chunk sizes (test rows, train rows per block) bound memory; they do not change the results.
    """
    hits = knn_class_hits(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes,
                          backend, test_chunk_size, train_chunk_size)
    return hits_to_accuracies(hits, test_features.shape[0])


def hits_to_accuracies(hits: dict[int, tuple[np.ndarray, np.ndarray]], n_test: int) -> dict[int, tuple[float, float]]:
    """``{k: (top1 %, top5 %)}`` over all ``n_test`` test rows from per-class hits (``knn_class_hits``)."""
    return {k: (100.0 * int(top1.sum()) / n_test, 100.0 * int(top5.sum()) / n_test) for k, (top1, top5) in hits.items()}


def knn_correct(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Whether DINO's weighted kNN classifies each test row right [M] bool: this module's neighbour search
    (``knn_search``) and the same vote (class score = sum of exp(s / T) over the k nearest; ties to the smaller class),
    so ``100 * mean`` is that task's top-1 at this k."""
    sims, indices = knn_search(train_features, test_features, k, backend=backend)
    train_labels = train_labels.to(device=indices.device, dtype=torch.long)
    test_labels = test_labels.to(device=indices.device, dtype=torch.long)
    num_classes = num_classes or int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    correct = torch.empty(sims.shape[0], dtype=torch.bool, device=sims.device)
    for start in range(0, sims.shape[0], _CORRECT_ROWS):
        rows = slice(start, start + _CORRECT_ROWS)
        scores = sims.new_zeros((sims[rows].shape[0], num_classes))
        scores.scatter_add_(1, train_labels[indices[rows]], (sims[rows] / temperature).exp())
        correct[rows] = scores.argmax(dim=1) == test_labels[rows]  # argmax: the first of equal maxima
    return correct.cpu()


def best_k(accuracies: dict[int, tuple[float, float]]) -> int:
    """The k with the highest top-1; ties go to the smaller k."""
    return min(accuracies, key=lambda k: (-accuracies[k][0], k))


@dataclass
class KnnParams:
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = 0.07
    feature: str = "cls"
    transform: str = "eval_dino"
    backend: str = "auto"
    # long-tail groups by training images per class (rows acc_many / acc_medium / acc_few, mean_per_class)
    many_shot: int = 100
    few_shot: int = 20


def check_params(params: KnnParams) -> None:
    """The options alone, before any model or data (k against the training-set size is checked on the features)."""
    check_ints_at_least("knn.ks", params.ks, 1)
    check_positive("knn.temperature", params.temperature)
    check_feature("knn.feature", params.feature, pooled=True)
    check_transform("knn.transform", params.transform)
    check_choice("knn.backend", params.backend, BACKENDS)
    if params.backend == "faiss" and not _faiss_available():
        raise UserError("knn.backend=faiss needs the faiss-cpu package (pip install faiss-cpu)")
    check_shot_groups("knn", params.many_shot, params.few_shot)


@register_task(
    "knn", version=KNN_VERSION, params=KnnParams, check=check_params,
    description="weighted kNN on frozen features (DINO eval_knn): top-1/top-5 per k and at the best k",
)
def run(ctx: TaskContext, params: KnnParams) -> list[ResultRow]:
    train = ctx.features("train", params.feature, params.transform)
    val = ctx.features("val", params.feature, params.transform)
    if train.features.ndim != 2:
        raise UserError(f"kNN needs pooled features (N, D); feature {params.feature!r} gives shape {train.features.shape}")
    num_classes = ctx.dataset.num_classes
    with strict_fp32():  # the protocol's answers are fp32 ones: no TF32 similarities on CUDA
        hits = knn_class_hits(
            train.tensor(ctx.device), torch.from_numpy(train.labels), val.tensor(ctx.device),
            torch.from_numpy(val.labels), ks=params.ks, temperature=params.temperature, num_classes=num_classes,
            backend=params.backend,
        )
    n = len(val.labels)
    accuracies = hits_to_accuracies(hits, n)
    chosen = best_k(accuracies)
    # The cache stores fp16 unless values overflow it; the reference classifies fp32 features, so record which.
    base = {
        "ks": list(accuracies), "temperature": params.temperature, "feature": params.feature,
        "transform": params.transform, "feature_dtype": str(train.features.dtype), "backend": params.backend,
        "backend_used": _resolve_backend(params.backend, ctx.device), "best_k": chosen,
    }
    rows: list[ResultRow] = []
    for k, (top1, top5) in accuracies.items():
        for metric, value in ((f"top1_k{k}", top1), (f"top5_k{k}", top5)):
            rows.append(ctx.row(task="knn", protocol=KNN_VERSION, split="val", metric=metric, value=value,
                                params={**base, "k": k}, n=n))
    for metric, value in (("top1", accuracies[chosen][0]), ("top5", accuracies[chosen][1])):
        rows.append(ctx.row(task="knn", protocol=KNN_VERSION, split="val", metric=metric, value=value, params=base, n=n))
    groups = group_accuracies(hits[chosen][0], np.bincount(val.labels, minlength=num_classes),
                              np.bincount(train.labels, minlength=num_classes), params.many_shot, params.few_shot)
    group_params = {**base, "k": chosen, "many_shot": f"> {params.many_shot}", "few_shot": f"< {params.few_shot}"}
    for name, metric in GROUP_METRICS.items():
        value, count = groups[name]
        rows.append(ctx.row(task="knn", protocol=KNN_VERSION, split="val", metric=metric, value=value,
                            params=group_params, n=count))
    log.info("kNN best k=%d: top-1 %.2f %%, top-5 %.2f %%", chosen, *accuracies[chosen])
    log.debug("kNN per k: %s", accuracies)
    return rows

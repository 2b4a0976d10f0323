"""Revisited Oxford / Paris ranking and metrics (protocols.md §6.3): Easy / Medium / Hard ground truth, mAP with
the trapezoid rule and mP@k, junk images removed from the ranking before positions are counted.

Pure numpy, no model: any retrieval protocol (and its tests) can score a ranking with it. Values are fractions
in [0, 1]; tasks multiply by 100 for result rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import UserError

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
# Query columns ranked at once: DB x chunk similarities (fp32) and their argsort (int64) stay below ~1.5 GiB for
# a 1M-image database.
_QUERY_CHUNK = 128


def _indices(values: object) -> np.ndarray:
    """A ground-truth index list as a 1-D int64 array (``None`` and empty lists give an empty array)."""
    if values is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(values, dtype=np.int64).reshape(-1)


def protocol_ground_truth(gnd: Sequence[dict], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per query ``{"ok": DB indices that count as positives, "junk": DB indices removed from the ranking}``.

    gnd: revisitop's per-query dicts with ``easy``, ``hard``, ``junk`` (0-based DB indices; ``bbx`` is ignored).
      easy    ok = easy          junk = junk + hard
      medium  ok = easy + hard   junk = junk
      hard    ok = hard          junk = junk + easy
    Medium and Hard are what DINO reports; Easy is revisitop's third setting.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"retrieval protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    out = []
    for i, query in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in query]
        if missing:
            raise UserError(f"ground truth of query {i} has no {', '.join(missing)} (expected easy, hard, junk lists)")
        easy, hard, junk = _indices(query["easy"]), _indices(query["hard"]), _indices(query["junk"])
        if protocol == "easy":
            ok, bad = easy, np.concatenate([junk, hard])
        elif protocol == "medium":
            ok, bad = np.concatenate([easy, hard]), junk
        else:
            ok, bad = hard, np.concatenate([junk, easy])
        out.append({"ok": ok, "junk": bad})
    return out


def compute_ap(ranks_of_positives: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Average precision by the trapezoid rule over the recall steps of each retrieved positive.

    ranks_of_positives: 0-based positions of the retrieved positives in the ranking, junk already removed
    (sorted here). The j-th positive (0-based) at rank r adds ((j / r, or 1 when r == 0) + (j + 1) / (r + 1)) / 2
    times the recall step 1 / n_positives; positives that were never retrieved add nothing.
    """
    if n_positives < 1:
        raise ValueError(f"compute_ap needs n_positives >= 1; got {n_positives}")
    ranks = np.sort(np.asarray(ranks_of_positives, dtype=np.float64).reshape(-1))
    if ranks.size == 0:
        return 0.0
    if ranks[0] < 0:
        raise ValueError(f"ranks of positives must be >= 0; got {ranks[0]:g}")
    j = np.arange(ranks.size, dtype=np.float64)
    precision_before = np.where(ranks == 0, 1.0, j / np.where(ranks == 0, 1.0, ranks))
    precision_after = (j + 1.0) / (ranks + 1.0)
    return float(((precision_before + precision_after) / 2.0).sum() / n_positives)


def _positions_without_junk(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the ok images in one ranking column, each lowered by the junk ranked before it."""
    positions = np.flatnonzero(np.isin(column, ok))
    junk_positions = np.flatnonzero(np.isin(column, junk))  # ascending, as flatnonzero returns them
    # A junk image counts when it is ranked strictly before the positive (an image in both lists never shifts itself).
    return positions - np.searchsorted(junk_positions, positions, side="left")


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(mAP, AP per query [Q], mP@k [K], P@k per query [Q, K]) of a ranking, revisitop's rules (§6.3).

    ranks: DB x Q, column q = DB indices for query q, best first (usually every DB image; positives missing from a
    truncated ranking count as not retrieved). gnd: per query ``{"ok": ..., "junk": ...}`` (``protocol_ground_truth``).
    Junk images are taken out of the ranking (positions of the positives after them shift up), never out of ok.
    P@k with 1-based positions p: kq = min(max(p), k), P@k = |{p <= kq}| / kq; so positives at ranks 1, 2, 5 give
    P@10 = 3/5. A query with no ok image gets AP = P@k = NaN and is left out of the means; with no query left the
    means are NaN.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise UserError(f"ranks must be a DB x Q matrix; got shape {ranks.shape}")
    n_queries = ranks.shape[1]
    if len(gnd) != n_queries:
        raise UserError(f"ranks has {n_queries} query columns but the ground truth has {len(gnd)} queries")
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise UserError(f"every k of mP@k must be >= 1; got {kappas}")
    aps = np.full(n_queries, np.nan)
    precisions = np.full((n_queries, len(kappas)), np.nan)
    for q in range(n_queries):
        ok = np.unique(_indices(gnd[q].get("ok")))
        if ok.size == 0:
            continue
        if ok[0] < 0:
            raise UserError(f"query {q}: negative DB index {ok[0]} among its positives")
        positions = _positions_without_junk(ranks[:, q], ok, _indices(gnd[q].get("junk")))
        aps[q] = compute_ap(positions, ok.size)
        if positions.size == 0:
            precisions[q] = 0.0
            continue
        one_based = positions + 1
        last = one_based.max()
        for i, k in enumerate(kappas):
            kq = min(last, k)
            precisions[q, i] = np.count_nonzero(one_based <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), precisions
    return float(aps[valid].mean()), aps, precisions[valid].mean(axis=0), precisions


def rank_database(db: np.ndarray, queries: np.ndarray, query_chunk: int = _QUERY_CHUNK) -> np.ndarray:
    """DB x Q ranking by inner product (cosine for L2-normalised rows), best first: argsort(-X_db X_q^T, axis 0).

    Computed for a chunk of queries at a time, so only DB x chunk similarities exist at once. Equal similarities
    keep the lower DB index first (stable sort), so the ranking does not depend on the chunking.
    """
    db = np.asarray(db, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if db.ndim != 2 or queries.ndim != 2 or db.shape[1] != queries.shape[1]:
        raise UserError(f"ranking needs 2-D features of equal dim; got DB {db.shape}, queries {queries.shape}")
    ranks = np.empty((db.shape[0], queries.shape[0]), dtype=np.int64)
    for start in range(0, queries.shape[0], max(1, query_chunk)):
        sims = db @ queries[start:start + query_chunk].T
        ranks[:, start:start + sims.shape[1]] = np.argsort(-sims, axis=0, kind="stable")
    return ranks


def evaluate_protocols(
    ranks: np.ndarray, gnd: Sequence[dict], protocols: Sequence[str] = PROTOCOLS, kappas: Sequence[int] = DEFAULT_KAPPAS
) -> dict[str, dict]:
    """``{protocol: {"mAP", "mP@k" {k: value}, "aps", "n_queries" (non-empty), "n_empty"}}`` for revisitop ``gnd``."""
    out: dict[str, dict] = {}
    for protocol in protocols:
        mean_ap, aps, mean_pk, _ = compute_map(ranks, protocol_ground_truth(gnd, protocol), kappas)
        n_empty = int(np.isnan(aps).sum())
        out[protocol] = {
            "mAP": mean_ap, "mP@k": {int(k): float(v) for k, v in zip(kappas, mean_pk)}, "aps": aps,
            "n_queries": len(aps) - n_empty, "n_empty": n_empty,
        }
    return out

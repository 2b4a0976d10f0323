"""Prototype utilisation of a pretraining checkpoint's projection head (DINO-vMF, Govindarajan et al. 2023, Sec. 5).

Reads the head (``ssl_bench.head_weights``; the backbone alone is not enough) and reports:
  - unique prototypes at cosine thresholds (greedy de-duplication) and the largest duplicate set at each;
  - prototype usage: the teacher assigns each train and val image (post-norm CLS -> head) to the argmax of its logits
    (``prototype_logits`` with the checkpoint's normalization and teacher temperature; no centering); prototypes no
    image is assigned to are "void", and their cosine to minus the mean bottleneck output y tells whether they were
    pushed to the side of the sphere that the data leaves empty;
  - Figure 2: kappa_k = ||w_k|| / tau against the weighted 20-NN accuracy (DINO's kNN, T 0.07, train -> val) of the
    val images assigned to prototype k, with the used prototypes in kappa percentile bins; kappa percentiles.
Two PNG plots (matplotlib, Agg) go to ``<results folder>/prototypes/<model>/``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_bench.context import TaskContext
from ssl_bench.errors import UserError
from ssl_bench.head_weights import assign_prototypes, read_head
from ssl_bench.options import check_at_least, check_choice, check_positive, check_transform
from ssl_bench.prototypes import (accuracy_by_bin, cosine_to_negative_mean, duplicate_set_sizes, kappa_bins,
                                  unique_prototypes, void_prototypes)
from ssl_bench.plots import save_line_plot
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.runtime import dist_info, strict_fp32
from ssl_bench.tasks.knn import BACKENDS, knn_correct

log = logging.getLogger(__name__)

PROTOTYPES_VERSION = "dino-vmf-prototypes-v1"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
KAPPA_PERCENTILES: tuple[int, ...] = (0, 10, 50, 90, 100)


# --- plots ------------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"


def plot_dir(ctx: TaskContext) -> Path:
    """``<folder of the results CSV>/prototypes/<model label>``; ``results/prototypes/...`` without a results path."""
    results = ctx.extra.get("results")
    base = Path(results).parent / "prototypes" if results else Path("results") / "prototypes"
    return base / _slug(ctx.model_label or ctx.backbone.label)


# --- the task ---------------------------------------------------------------------------------------------------

@dataclass
class PrototypesParams:
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    bins: int = 10  # kappa percentile bins of the used prototypes
    normalization: str = "auto"  # auto: the ssl-bench checkpoint's, "none" for official ones (vmf for DINO-vMF's)
    teacher_temp: float | None = None  # None: what the checkpoint records (its config or args), else 0.07
    k: int = 20
    temperature: float = 0.07  # kNN vote temperature
    transform: str = "eval_dino"
    backend: str = "auto"  # kNN search backend, as the knn task's
    head_batch_size: int = 4096


def _check(params: PrototypesParams) -> None:
    if not params.thresholds or any(not -1.0 <= t <= 1.0 for t in params.thresholds):
        raise UserError(f"prototypes.thresholds must be cosines in [-1, 1]; got {params.thresholds}")
    if params.bins < 1 or params.head_batch_size < 1:
        raise UserError("prototypes.bins and prototypes.head_batch_size must be >= 1")
    if params.normalization not in ("auto", "none", "l2", "vmf"):
        raise UserError(f"prototypes.normalization={params.normalization!r}; expected auto, none, l2 or vmf")
    check_at_least("prototypes.k", params.k, 1)
    check_positive("prototypes.temperature", params.temperature)
    check_positive("prototypes.teacher_temp", params.teacher_temp)
    check_transform("prototypes.transform", params.transform)
    check_choice("prototypes.backend", params.backend, BACKENDS)


@register_task(
    "prototypes", version=PROTOTYPES_VERSION, params=PrototypesParams, check=_check,
    description="prototype utilisation of a pretraining checkpoint's head (DINO-vMF): unique / void prototypes, "
                "kappa vs kNN accuracy",
)
def run(ctx: TaskContext, params: PrototypesParams) -> list[ResultRow]:
    _check(params)
    if ctx.backbone.ckpt_path is None:
        raise UserError("the prototypes task reads the projection head of a pretraining checkpoint: give --ckpt "
                        "checkpoint.pth (a backbone at random init has no head)")
    loaded = read_head(ctx.backbone.ckpt_path, ctx.backbone.ckpt_key or "teacher",
                       None if params.normalization == "auto" else params.normalization, params.teacher_temp)
    if loaded.in_dim != ctx.backbone.embed_dim:
        raise UserError(f"the checkpoint's projection head takes {loaded.in_dim}-dim inputs but {ctx.backbone.arch} "
                        f"gives {ctx.backbone.embed_dim}-dim CLS features (--model does not match the checkpoint?)")
    weights = loaded.head.prototype_weights().detach()
    n_prototypes = int(weights.shape[0])
    kappa = loaded.head.prototype_norms().detach().double() / loaded.teacher_temp

    train = ctx.features("train", "cls", params.transform)
    val = ctx.features("val", "cls", params.transform)
    train_x, val_x = train.tensor(ctx.device), val.tensor(ctx.device)
    with strict_fp32():  # cosines near the thresholds, head and kNN similarities in plain fp32 (no TF32 on CUDA)
        unique = {}
        for threshold in params.thresholds:
            count, representative = unique_prototypes(weights.to(ctx.device), threshold)
            unique[threshold] = (count, int(duplicate_set_sizes(representative).max()))
        train_assign, train_y_sum = assign_prototypes(loaded, train_x, params.head_batch_size, ctx.device)
        val_assign, val_y_sum = assign_prototypes(loaded, val_x, params.head_batch_size, ctx.device)
        correct = knn_correct(train_x, torch.from_numpy(train.labels), val_x, torch.from_numpy(val.labels),
                              params.k, params.temperature, ctx.dataset.num_classes, params.backend)

    n_samples = len(train_assign) + len(val_assign)
    void = void_prototypes(torch.cat([train_assign, val_assign]), n_prototypes)
    void_cos = cosine_to_negative_mean(weights, (train_y_sum + val_y_sum) / n_samples)[void]
    edges, prototype_bin = kappa_bins(kappa, ~void, params.bins)
    bin_accuracy, bin_samples = accuracy_by_bin(prototype_bin, val_assign, correct, params.bins)
    bin_prototypes = torch.bincount(prototype_bin[prototype_bin >= 0], minlength=params.bins)

    folder = plot_dir(ctx)
    plots = {"unique": str(folder / "unique_vs_threshold.png"), "kappa_knn": str(folder / "kappa_vs_knn.png")}
    if dist_info().is_main:
        thresholds = list(unique)
        save_line_plot(Path(plots["unique"]), thresholds, [unique[t][0] for t in thresholds], [f"{t:g}" for t in thresholds],
                  f"unique prototypes (K = {n_prototypes})", "cosine threshold", "unique prototypes")
        save_line_plot(Path(plots["kappa_knn"]), list(range(params.bins)), bin_accuracy.tolist(),
                  [f"{float(e):.3g}" for e in edges[1:]], f"{params.k}-NN accuracy by prototype kappa (val)",
                  "kappa percentile bin (upper edge)", "kNN top-1 (%)")

    base = {
        "normalization": loaded.normalization, "teacher_temp": loaded.teacher_temp, "head_format": loaded.format,
        "head_key": loaded.key, "n_prototypes": n_prototypes, "bottleneck_dim": loaded.bottleneck_dim,
        "feature": "cls", "transform": params.transform, "feature_dtype": str(train.features.dtype),
        "assignment": "argmax of teacher logits, no centering", "plots": plots,
    }

    def row(metric: str, value: float, split: str, n: int | None = None, **extra) -> ResultRow:
        return ctx.row(task="prototypes", protocol=PROTOTYPES_VERSION, split=split, metric=metric, value=value,
                       params={**base, **extra}, n=n)

    rows = [row("n_prototypes", n_prototypes, "head", n_prototypes)]
    for threshold, (count, largest) in unique.items():
        rows.append(row(f"unique@{threshold:g}", count, "head", n_prototypes, threshold=threshold))
        rows.append(row(f"largest_duplicate_set@{threshold:g}", largest, "head", n_prototypes, threshold=threshold))
    for q in KAPPA_PERCENTILES:
        rows.append(row(f"kappa_p{q}", float(np.percentile(kappa.numpy(), q)), "head", n_prototypes, percentile=q))
    n_void = int(void.sum())
    rows += [
        row("used_prototypes", n_prototypes - n_void, "train+val", n_samples),
        row("void_prototypes", n_void, "train+val", n_samples),
        row("void_cos_to_neg_mean", float(void_cos.mean()) if n_void else math.nan, "train+val", n_void),
        row("void_cos_to_neg_mean_max", float(void_cos.max()) if n_void else math.nan, "train+val", n_void),
        row("knn_top1", 100.0 * float(correct.double().mean()), "val", len(correct), k=params.k,
            knn_temperature=params.temperature),
    ]
    for i in range(params.bins):
        rows.append(row(f"knn_acc_kappa_bin{i}", float(bin_accuracy[i]), "val", int(bin_samples[i]), bin=i,
                        bins=params.bins, kappa_low=float(edges[i]), kappa_high=float(edges[i + 1]),
                        bin_prototypes=int(bin_prototypes[i]), k=params.k, knn_temperature=params.temperature))
    log.info("prototypes: K=%d, unique@%g %d, void %d, kappa median %.3g", n_prototypes, params.thresholds[-1],
             unique[params.thresholds[-1]][0], n_void, float(np.percentile(kappa.numpy(), 50)))
    return rows

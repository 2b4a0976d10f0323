"""ImageNet linear probe on a frozen backbone (DINO's ``eval_linear``, protocols.md §3), with iBOT's lr sweep.

Every lr of the sweep is one linear head; all heads train together on the same batches, in one pass over the
data per epoch, as one stacked weight (H, K, D) and bias (H, K). The loss is the sum over heads of each head's
mean cross-entropy, so each head's gradient is exactly the gradient it would get alone, and SGD with momentum runs
on the stacked tensors with one lr per head (``sgd_momentum_step``): every head follows the trajectory that
DINO's single-head loop (``nn.Linear`` + ``torch.optim.SGD`` + ``CosineAnnealingLR``) gives at its lr.

Protocols (the row's ``protocol`` column says which one ran):

``dino-linear-v1``       DINO's: every epoch the frozen backbone (eval mode) sees the train images through
                         ``train_lin`` (RandomResizedCrop + flip); val features are the cached ``eval_dino``
                         centre crops (Resize 256 bicubic, CenterCrop 224).
``dino-linear-fast-v1``  not DINO's: the heads train on cached ``eval_dino`` centre-crop train features, no
                         augmentation. Quick comparisons only; its metrics carry a ``_fast`` suffix so that the
                         leaderboard never puts them in the column of the real protocol.

Feature recipes (DINO-vMF's two columns, §3.3): ``C`` = CLS of the last block after the final norm; ``D`` = DINO's
recipe per arch: ViT with embed_dim <= 384 (ViT-S, ViT-Ti, ...) the CLS of each of the last 4 blocks, each through
the final norm, concatenated; wider ViTs (ViT-B, ViT-L) the last block's CLS concatenated with its mean patch
token. ``auto`` = ``D``. CNNs have one pooled feature, used by both recipes.

Selection: the reported top-1 is the maximum val top-1 over validated epochs and heads (DINO reports the best
epoch, iBOT the best head); val is also the reported set, as in both references. Rows say ``selection: val``.

Under torchrun each rank trains on its shard of every epoch (``DistributedSampler`` order) with the batch size
per process, and head gradients are averaged over ranks after each backward (DDP semantics, so the lr scale
uses the total batch); every rank evaluates the full val set and holds identical heads.

A killed run resumes: after every epoch the heads, momentum buffers and val history are written atomically to
``<state_dir>/linear-<key>.pt`` (key = everything that shapes the trajectory; under torchrun a folder every rank
can read), and read back by the next run with the same settings; the file is deleted once the rows are made.
Shuffling and augmentation are seeded per (seed, epoch, rank), so a resumed run matches an uninterrupted one
(with the same number of data-loader workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ssl_bench.context import TaskContext
from ssl_bench.errors import UserError
from ssl_bench.features import FeatureSpec, compute_features, default_cache_dir
from ssl_bench.io import atomic_write
from ssl_bench.longtail import GROUP_METRICS, group_accuracies
from ssl_bench.options import check_at_least, check_between, check_shot_groups
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.runtime import autocast, dist_info, hide_progress, resolve_precision, strict_fp32
from ssl_bench.transforms import TransformSpec

log = logging.getLogger(__name__)

LINEAR_VERSION = "dino-linear-v1"
LINEAR_FAST_VERSION = "dino-linear-fast-v1"
FAST_METRIC_SUFFIX = "_fast"
RECIPES = ("auto", "C", "D")
# ViTs up to this width take DINO's ViT-S recipe (last 4 CLS); wider ones the ViT-B recipe (CLS + mean patch).
SMALL_VIT_MAX_DIM = 384
# iBOT's eval_linear_multi grid: {1..9} x 10^{-4..0}, 45 base lrs from 1e-4 to 9 (before the batch scaling).
IBOT_LRS: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-4, 1) for m in range(1, 10))
INIT_STD = 0.01
LR_REFERENCE_BATCH = 256
# Val rows x (heads x classes) logits held at once when evaluating the heads.
_EVAL_ELEMENTS = 1 << 25


# --- feature recipe -----------------------------------------------------------------------------------------------
def resolve_recipe(backbone, recipe: str = "auto") -> tuple[str, str]:
    """(recipe, feature spec): ``C`` -> ``cls``; ``D`` -> ``last4`` for ViTs of embed_dim <= 384, ``cls+avgpool``
    for wider ViTs, ``cls`` (the pooled output) for CNNs; ``auto`` -> ``D``."""
    name = "D" if recipe.strip().lower() == "auto" else recipe.strip().upper()
    if name not in ("C", "D"):
        raise UserError(f"linear recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if not backbone.is_vit or name == "C":
        return name, "cls"
    return name, "last4" if backbone.embed_dim <= SMALL_VIT_MAX_DIM else "cls+avgpool"


# --- heads, optimiser, schedule -----------------------------------------------------------------------------------
def init_heads(num_heads: int, dim: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (H, K, D) and bias (H, K): every head starts from the same N(0, 0.01^2) draw (DINO's init), bias 0.

    The draw comes from a CPU generator seeded with ``seed``, so a head trained alone with the same seed starts
    exactly where its copy in a sweep starts, on any device."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty(num_classes, dim).normal_(0.0, INIT_STD, generator=generator)
    return weight.expand(num_heads, num_classes, dim).clone(), torch.zeros(num_heads, num_classes)


def head_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits (N, H, K) of every head for features x (N, D): one (N, D) x (D, H K) product."""
    heads, classes, dim = weight.shape
    return torch.addmm(bias.reshape(-1), x, weight.reshape(heads * classes, dim).T).view(-1, heads, classes)


def heads_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: head h's gradient is the one it would get alone."""
    logits = head_logits(weight, bias, x)
    heads, classes = logits.shape[1], logits.shape[2]
    return F.cross_entropy(logits.reshape(-1, classes), y.repeat_interleave(heads), reduction="sum") / x.shape[0]


@torch.no_grad()
def sgd_momentum_step(
    params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], lrs: torch.Tensor, momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> None:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on stacked heads: leading dim = head, lrs (H,) one per head.

    buf = momentum * buf + (grad + wd * p); p -= lr_h * buf. Buffers start at zero, which equals SGD's first-step
    ``buf = grad``."""
    for param, buffer in zip(params, buffers):
        grad = param.grad if not weight_decay else param.grad.add(param, alpha=weight_decay)
        buffer.mul_(momentum).add_(grad)
        param.sub_(buffer * lrs.view(-1, *([1] * (param.ndim - 1))))


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The lr of (0-based) ``epoch``: ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch."""
    return base_lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


# --- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_heads(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 accuracy in % of every head, each (H,), and each head's top-1 hits per class (H, K), all on
    the CPU; top-5 is top-min(5, K).

    A head whose parameters are no longer finite (a diverged lr) scores NaN, so that selection skips it."""
    heads, classes, _ = weight.shape
    k = min(5, classes)
    class_hits = torch.zeros(heads, classes, dtype=torch.long, device=x.device)
    hits5 = torch.zeros(heads, dtype=torch.long, device=x.device)
    y = y.to(x.device)
    rows = max(1, _EVAL_ELEMENTS // (heads * classes))
    for start in range(0, x.shape[0], rows):
        logits = head_logits(weight, bias, x[start:start + rows])
        top = logits.topk(k, dim=-1).indices == y[start:start + rows, None, None]  # (m, H, k)
        class_hits.index_add_(1, y[start:start + rows], top[..., 0].T.long())
        hits5 += top.any(-1).sum(0)
    n = max(1, x.shape[0])
    top1, top5 = (100.0 * class_hits.sum(1).double() / n).cpu(), (100.0 * hits5.double() / n).cpu()
    finite = (torch.isfinite(weight).flatten(1).all(1) & torch.isfinite(bias).all(1)).cpu()
    return top1.masked_fill(~finite, math.nan), top5.masked_fill(~finite, math.nan), class_hits.cpu()


# --- training -----------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What training the parallel heads gives: final heads and the val history (one row per validated epoch)."""

    lrs: list[float]  # effective peak lr per head
    weight: torch.Tensor  # (H, K, D)
    bias: torch.Tensor  # (H, K)
    val_epochs: list[int] = field(default_factory=list)  # 1-based epoch after which each val ran
    top1: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))  # (V, H) %
    top5: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))  # (V, H) %
    best_class_hits: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (K,), at best()
    resumed_from_epoch: int = 0

    def best(self) -> tuple[int, int]:
        """(val index, head) of the highest val top-1; ties go to the earlier epoch, then the smaller lr."""
        if self.top1.numel() == 0:
            raise UserError("linear: no validation ran, so there is no best head")
        scores = torch.nan_to_num(self.top1, nan=-math.inf)
        if not bool(torch.isfinite(scores).any()):
            raise UserError("linear: every head diverged (non-finite weights); use smaller lrs")
        flat = int(torch.argmax(scores.flatten()))  # the first maximum in (epoch, lr) order
        return divmod(flat, self.top1.shape[1])

    def diverged(self) -> list[int]:
        finite = torch.isfinite(self.weight).flatten(1).all(1) & torch.isfinite(self.bias).all(1)
        return [int(h) for h in torch.nonzero(~finite).flatten()]


def _load_state(path: Path | None, key: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key or "best_class_hits" not in state:
        log.warning("linear: ignoring %s, written for other settings or by an older version", path)
        return None
    return state


def _save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_linear_heads(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int = 100,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    val_every: int = 1,
    state_path: str | Path | None = None,
    state_key: str = "",
) -> SweepResult:
    """Train one linear head per lr in ``lrs`` (effective peak lrs) on the same batches, DINO's schedule (§3.1).

    epoch_batches(epoch) yields this process's (features (n, D), labels (n,)) batches of the 0-based epoch, on
    the device the heads should live on; val_features (M, D) sit on that device too. Per epoch each head's lr is
    ``cosine_lr(lr, epoch, epochs)``; val runs after epoch e when ``e % val_every == 0`` or it is the last (DINO's
    rule). Under torchrun, head gradients are averaged over ranks after each backward. With ``state_path``
    the state after each epoch is saved there (main rank) and a run with the same ``state_key`` resumes from it.
    """
    if epochs < 1 or val_every < 1:
        raise UserError(f"linear: epochs and val_every must be >= 1; got epochs={epochs}, val_every={val_every}")
    if not lrs or any(not (lr > 0) for lr in lrs):
        raise UserError(f"linear: lrs must be a non-empty list of positive numbers; got {list(lrs)}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise UserError(f"linear: momentum must be in [0, 1) and weight_decay >= 0; got {momentum}, {weight_decay}")
    device = val_features.device
    info = dist_info()
    path = Path(state_path) if state_path else None
    weight, bias = init_heads(len(lrs), val_features.shape[1], num_classes, seed)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    result = SweepResult(lrs=[float(lr) for lr in lrs], weight=weight, bias=bias)
    top1_rows: list[torch.Tensor] = []
    top5_rows: list[torch.Tensor] = []
    # the per-class hits of the best (epoch, head) so far: the first maximum in (epoch, lr) order, as ``best()``
    best_score, best_class_hits = -math.inf, torch.zeros(num_classes, dtype=torch.long)
    start = 0
    state = _load_state(path, state_key)
    if state is not None:
        weight, bias, buf_w, buf_b = state["weight"], state["bias"], state["buf_w"], state["buf_b"]
        start, result.val_epochs = int(state["epoch"]), list(state["val_epochs"])
        top1_rows, top5_rows = list(state["top1"].unbind(0)), list(state["top5"].unbind(0))
        best_score, best_class_hits = float(state["best_score"]), state["best_class_hits"]
        result.resumed_from_epoch = start
        log.info("linear: resuming after epoch %d from %s", start, path)
    weight, bias = weight.to(device).requires_grad_(True), bias.to(device).requires_grad_(True)
    buf_w, buf_b = buf_w.to(device), buf_b.to(device)
    val_labels = val_labels.to(device=device, dtype=torch.long)

    with strict_fp32():  # DINO trains its head in fp32; no TF32 products on CUDA either
        for epoch in range(start, epochs):
            factor = cosine_lr(1.0, epoch, epochs)
            epoch_lrs = torch.tensor([cosine_lr(lr, epoch, epochs) for lr in result.lrs], device=device)
            steps = 0
            for x, y in epoch_batches(epoch):
                weight.grad = bias.grad = None
                heads_loss(weight, bias, x.float(), y.to(device=device, dtype=torch.long)).backward()
                if info.world_size > 1:
                    for grad in (weight.grad, bias.grad):
                        dist.all_reduce(grad)
                        grad.div_(info.world_size)
                sgd_momentum_step((weight, bias), (buf_w, buf_b), epoch_lrs, momentum, weight_decay)
                steps += 1
            if steps == 0:
                raise UserError("linear: an epoch yielded no training batches (empty train split?)")
            if epoch % val_every == 0 or epoch == epochs - 1:
                top1, top5, class_hits = evaluate_heads(weight.detach(), bias.detach(), val_features, val_labels)
                top1_rows.append(top1)
                top5_rows.append(top5)
                result.val_epochs.append(epoch + 1)
                best = int(torch.argmax(torch.nan_to_num(top1, nan=-math.inf)))
                if float(torch.nan_to_num(top1, nan=-math.inf)[best]) > best_score:
                    best_score, best_class_hits = float(top1[best]), class_hits[best].clone()
                log.info("linear epoch %d/%d (lr factor %.4f): best head lr %.3g top-1 %.2f %%", epoch + 1, epochs,
                         factor, result.lrs[best], float(top1[best]))
            if path is not None and info.is_main:
                _save_state(path, {
                    "key": state_key, "epoch": epoch + 1, "weight": weight.detach().cpu(),
                    "bias": bias.detach().cpu(), "buf_w": buf_w.cpu(), "buf_b": buf_b.cpu(),
                    "val_epochs": list(result.val_epochs), "top1": _stack(top1_rows, len(lrs)),
                    "top5": _stack(top5_rows, len(lrs)), "best_score": best_score,
                    "best_class_hits": best_class_hits,
                })
    result.weight, result.bias = weight.detach(), bias.detach()
    result.top1, result.top5 = _stack(top1_rows, len(lrs)), _stack(top5_rows, len(lrs))
    result.best_class_hits = best_class_hits
    return result


def _stack(rows: list[torch.Tensor], heads: int) -> torch.Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, heads, dtype=torch.float64)


# --- data per epoch -----------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _sampler(length: int, seed: int, epoch: int) -> DistributedSampler:
    """DINO's train order: ``DistributedSampler`` (shuffled, padded to equal shards) with ``set_epoch``."""
    info = dist_info()
    sampler = DistributedSampler(range(length), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


def cached_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shuffled mini-batches of fixed features (the fast protocol), in fp32."""
    order = torch.tensor(list(_sampler(len(labels), seed, epoch)), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size].to(features.device)
        yield features[index].float(), labels[index]


def augmented_batches(
    ctx: TaskContext, spec: FeatureSpec, batch_size: int, seed: int, epoch: int, precision: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches of the epoch: train images through ``train_lin``, then the frozen backbone.

    Augmentation is seeded per (seed, epoch, rank): worker processes take their seeds from the loader's generator;
    with no workers the transforms draw from the global RNG, which is forked and seeded for the epoch."""
    backbone, device = ctx.backbone, ctx.device
    split = ctx.dataset.split("train")
    dataset = split.with_transform(TransformSpec("train_lin", backbone.input_size).build())
    epoch_seed = _epoch_seed(seed, epoch, dist_info().rank)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=_sampler(len(dataset), seed, epoch), num_workers=ctx.workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(epoch_seed), drop_last=False,
    )
    backbone.model.to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epoch_seed)
        for images, labels, _ in tqdm(loader, desc=f"linear epoch {epoch + 1}", disable=hide_progress(),
                                      leave=False):
            with torch.inference_mode(), autocast(device, precision):
                out = compute_features(backbone, images.to(device, non_blocking=True), spec)
            yield out.float().clone(), labels.to(device, non_blocking=True)  # clone: a normal tensor, autograd-safe


# --- the registered task ------------------------------------------------------------------------------------------
@dataclass
class LinearParams:
    recipe: str = "auto"  # C (last-block CLS), D (DINO's per-arch recipe) or auto (= D)
    epochs: int = 100
    batch_size: int = 128  # per process (DINO: 128 per GPU); --batch-size only sets feature extraction
    lrs: tuple[float, ...] = IBOT_LRS  # base lrs, each scaled by total_batch / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    fast: bool = False  # cached centre-crop train features, no augmentation: a different protocol
    seed: int = 0
    val_every: int = 1
    state_dir: str = "auto"  # resume state; auto = <feature cache>/linear-state (off with --no-cache); none = off
    # long-tail groups by training images per class (rows acc_many / acc_medium / acc_few, mean_per_class)
    many_shot: int = 100
    few_shot: int = 20


def _state_root(ctx: TaskContext, params: LinearParams) -> Path | None:
    if params.state_dir.lower() in ("none", "off", ""):
        return None
    if params.state_dir.lower() == "auto":
        if not ctx.use_cache:
            return None
        return (Path(ctx.cache_dir) if ctx.cache_dir is not None else default_cache_dir()) / "linear-state"
    return Path(params.state_dir)


def check_params(params: LinearParams) -> None:
    """The options alone, before any model or data (the same limits ``train_linear_heads`` enforces)."""
    if params.recipe.strip().upper() not in ("AUTO", "C", "D"):
        raise UserError(f"linear recipe {params.recipe!r}; expected one of {', '.join(RECIPES)}")
    check_at_least("linear.epochs", params.epochs, 1)
    check_at_least("linear.batch_size", params.batch_size, 1)
    check_at_least("linear.val_every", params.val_every, 1)
    if not params.lrs or any(not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0) for lr in params.lrs):
        raise UserError(f"linear.lrs must be a non-empty list of finite numbers > 0; got {list(params.lrs)}")
    check_between("linear.momentum", params.momentum, 0, 1, high_open=True)
    check_at_least("linear.weight_decay", params.weight_decay, 0)
    check_shot_groups("linear", params.many_shot, params.few_shot)


@register_task(
    "linear", version=LINEAR_VERSION, params=LinearParams, check=check_params,
    description="linear probe (DINO eval_linear, iBOT 45-lr sweep as parallel heads): best top-1/top-5 on val",
)
def run(ctx: TaskContext, params: LinearParams) -> list[ResultRow]:
    recipe, feature = resolve_recipe(ctx.backbone, params.recipe)
    spec = FeatureSpec(feature)
    if params.batch_size < 1:
        raise UserError(f"linear: batch_size must be >= 1; got {params.batch_size}")
    info = dist_info()
    total_batch = params.batch_size * info.world_size
    scale = total_batch / LR_REFERENCE_BATCH
    lrs = [lr * scale for lr in params.lrs]
    precision = resolve_precision(ctx.precision, ctx.device)
    protocol = LINEAR_FAST_VERSION if params.fast else LINEAR_VERSION
    suffix = FAST_METRIC_SUFFIX if params.fast else ""
    val_transform = ctx.transform("eval_dino")
    train_transform = val_transform if params.fast else TransformSpec("train_lin", ctx.backbone.input_size)

    val = ctx.features("val", spec, val_transform)
    val_x = val.tensor(ctx.device)
    if params.fast:
        train = ctx.features("train", spec, val_transform)
        # stored dtype (fp16 unless it overflows) on the device; batches become fp32 one at a time
        train_x = torch.tensor(np.asarray(train.features)).to(ctx.device)
        train_y = torch.from_numpy(np.asarray(train.labels)).to(ctx.device)

        def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            return cached_batches(train_x, train_y, params.batch_size, params.seed, epoch)
    else:
        def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            return augmented_batches(ctx, spec, params.batch_size, params.seed, epoch, precision)

    state_root, state_path, state_key = _state_root(ctx, params), None, ""
    if state_root is not None:  # the key holds everything that shapes the trajectory
        state_key = json.dumps({
            "protocol": protocol, "weights": ctx.backbone.weights_id(), "feature": spec.text,
            "train": ctx.dataset.split("train").manifest_sha256(), "val": ctx.dataset.split("val").manifest_sha256(),
            "train_transform": train_transform.key, "val_transform": val_transform.key, "precision": precision,
            "lrs": lrs, "world_size": info.world_size, "workers": None if params.fast else ctx.workers,
            **{k: v for k, v in dataclasses.asdict(params).items()
               if k not in ("state_dir", "lrs", "recipe", "many_shot", "few_shot")},
        }, sort_keys=True)
        state_path = state_root / f"linear-{hashlib.sha256(state_key.encode()).hexdigest()[:24]}.pt"
    result = train_linear_heads(
        batches, val_x, torch.from_numpy(np.asarray(val.labels)), ctx.dataset.num_classes, lrs,
        epochs=params.epochs, momentum=params.momentum, weight_decay=params.weight_decay, seed=params.seed,
        val_every=params.val_every, state_path=state_path, state_key=state_key,
    )
    v, head = result.best()
    top1, top5 = float(result.top1[v, head]), float(result.top5[v, head])
    best_over_epochs = torch.nan_to_num(result.top1, nan=-math.inf).amax(0)
    base = {
        "recipe": recipe, "recipe_requested": params.recipe, "feature": spec.text, "fast": params.fast,
        "train_transform": train_transform.key + (" (cached centre crop, no augmentation)" if params.fast else ""),
        "val_transform": val_transform.key, "epochs": params.epochs, "batch_size": params.batch_size,
        "world_size": info.world_size, "total_batch": total_batch, "lr_scale": scale,
        "best_lr_base": float(params.lrs[head]), "best_lr": result.lrs[head], "best_epoch": result.val_epochs[v],
        "heads": len(lrs), "lrs_base": [float(lr) for lr in params.lrs], "momentum": params.momentum,
        "weight_decay": params.weight_decay, "schedule": "cosine per epoch to 0", "init": "N(0, 0.01^2), bias 0",
        "seed": params.seed, "val_every": params.val_every, "precision": precision,
        "selection": "val", "selection_rule": "max val top-1 over validated epochs and lrs (val is the reported set)",
        "top1_by_lr_base": {f"{lr:g}": (None if not math.isfinite(acc) else round(float(acc), 4))
                            for lr, acc in zip(params.lrs, best_over_epochs.tolist())},
        "diverged_heads": len(result.diverged()), "resumed_from_epoch": result.resumed_from_epoch,
    }
    if params.fast:
        base["feature_dtype"] = str(np.asarray(train.features).dtype)
    n = len(val.labels)
    metrics = [(f"top1_{recipe}{suffix}", top1)]
    if ctx.dataset.num_classes >= 5:  # DINO reports top-5 only with at least 5 classes
        metrics.append((f"top5_{recipe}{suffix}", top5))
    rows = [ctx.row(task="linear", protocol=protocol, split="val", metric=metric, value=value, params=base, n=n)
            for metric, value in metrics]
    num_classes = ctx.dataset.num_classes
    groups = group_accuracies(result.best_class_hits.numpy(), np.bincount(val.labels, minlength=num_classes),
                              np.bincount(ctx.dataset.split("train").labels, minlength=num_classes),
                              params.many_shot, params.few_shot)
    group_params = {**base, "many_shot": f"> {params.many_shot}", "few_shot": f"< {params.few_shot}"}
    for name, metric in GROUP_METRICS.items():
        value, count = groups[name]
        rows.append(ctx.row(task="linear", protocol=protocol, split="val", metric=f"{metric}_{recipe}{suffix}",
                            value=value, params=group_params, n=count))
    if state_path is not None and info.is_main:
        state_path.unlink(missing_ok=True)
    log.info("linear [%s%s] best lr %g (base %g) after epoch %d: top-1 %.2f %%, top-5 %.2f %%", recipe, suffix,
             result.lrs[head], params.lrs[head], result.val_epochs[v], top1, top5)
    return rows

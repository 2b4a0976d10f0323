"""One end-to-end fine-tune (protocols.md §8): a trainable copy of a backbone with drop path and a fresh linear head,
AdamW on (layer-decayed) parameter groups, the recipe's lr schedule, mixup / cutmix / label smoothing, bf16 autocast
on CUDA, torchrun DDP, an evaluation after every epoch, and an atomic checkpoint after every epoch.

Resume: ``<out_dir>/checkpoint.pth`` holds the model, the optimizer, the epoch, the evaluation history and the best
epoch so far, the generator states, and the run's settings (everything that shapes the trajectory). A run with the
same settings continues from it; other settings are refused. Randomness is drawn per sample (augmentation: seed,
epoch, sample key) and per step (mixup and drop path: seed, step, rank), so a resumed run gives exactly the weights
and scores of an uninterrupted one, whatever the number of data-loader workers. There is no loss scaler: bf16 needs
none (the checkpoint's ``scaler`` entry stays None).

Outputs in ``out_dir`` (main rank): ``checkpoint.pth``; ``backbone_best.pth`` (the backbone of the best epoch, head
removed, plain timm keys) and ``backbone_final.pth`` (after the last epoch): ``ssl-bench run --ckpt`` reads both.
Under torchrun ``out_dir`` must be a folder every rank can read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .backbones import Backbone
from .data import ImageSplit
from .errors import UserError
from .finetune_data import CROPS, AugmentedSplit, eval_transform, train_sampler, train_transform
from .io import atomic_write
from .layer_decay import is_vit_like, param_groups
from .lr_schedules import deit_epoch_lr, warmup_cosine_steps
from .rng import get_rng_state, mix_seed, preserved_rng, seed_all, seeded, set_rng_state
from .runtime import autocast, barrier, dist_info, hide_progress

log = logging.getLogger(__name__)

FORMAT_KEY = "ssl_bench_finetune"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_BEST = "backbone_best.pth"
BACKBONE_FINAL = "backbone_final.pth"
SCHEDULES = ("step", "epoch")
METRICS = ("accuracy", "mean_per_class")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one fine-tune needs, resolved (no recipe defaults left open). Defaults: BEiT's ImageNet recipe."""

    epochs: int = 100
    batch_size: int = 128  # per process
    lr: float = 1e-3  # peak lr, already scaled by the batch where the recipe says so
    min_lr: float = 1e-6
    warmup_epochs: int = 20
    warmup_lr: float = 0.0  # where the warmup starts
    schedule: str = "step"  # step: BEiT's per-iteration schedule; epoch: DeiT's per-epoch timm scheduler
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # ViTs only; 1 = off
    no_decay_tokens: bool = True  # also exempt model.no_weight_decay() (pos_embed, cls_token) from weight decay
    drop_path: float = 0.1
    head_init_scale: float = 1.0
    repeated_aug: int = 1  # DeiT's repeated augmentation: each image this many times per epoch (1 = off)
    randaug: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    hflip: float = 0.5
    train_crop: str = "auto"  # auto: the references' random crop; none: no spatial augmentation
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    eval_transform: str = "beit"  # beit | deit (finetune_data.eval_transform)
    eval_every: int = 1
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.repeated_aug < 1:
            problems.append("epochs, batch_size, eval_every and repeated_aug must be >= 1")
        if not self.lr > 0 or self.min_lr < 0 or self.warmup_lr < 0 or self.weight_decay < 0:
            problems.append("lr must be > 0 and min_lr, warmup_lr, weight_decay >= 0")
        if not 0 < self.layer_decay <= 1 or not 0 <= self.drop_path < 1 or not 0 <= self.reprob <= 1 \
                or not 0 <= self.hflip <= 1:
            problems.append("layer_decay must lie in (0, 1], drop_path in [0, 1), reprob and hflip in [0, 1]")
        if self.warmup_epochs < 0 or self.mixup < 0 or self.cutmix < 0 or not 0 <= self.smoothing < 1:
            problems.append("warmup_epochs, mixup, cutmix must be >= 0 and smoothing in [0, 1)")
        if self.train_crop not in CROPS:
            problems.append(f"train_crop must be one of {', '.join(CROPS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.mixing and self.batch_size % 2:
            problems.append("mixup / cutmix pair the images of a batch: batch_size must be even")
        if problems:
            raise UserError(f"finetune: {'; '.join(problems)} (got {dataclasses.asdict(self)})")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class FinetuneResult:
    history: list[dict[str, float]]  # one entry per evaluated epoch (epoch is 1-based)
    best: dict[str, float] | None  # the entry with the highest score; ties go to the earlier epoch
    out_dir: Path
    steps_per_epoch: int
    resumed_from_epoch: int = 0
    finished: bool = True
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float] | None:
        return self.history[-1] if self.history else None


# --- model, optimiser, loss ---------------------------------------------------------------------------------------
def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (``head.*`` for ViTs, ``fc.*`` for ResNets)."""
    ids = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def build_model(backbone: Backbone, num_classes: int, drop_path: float = 0.0, head_init_scale: float = 1.0,
                seed: int = 0) -> nn.Module:
    """A trainable copy of ``backbone``: its timm arch rebuilt with ``drop_path`` (rising linearly over the blocks)
    and a ``num_classes`` linear head on the pooled feature (ViT: CLS after the final norm), the backbone's weights
    loaded, the head trunc-normal(0.02) x ``head_init_scale``, bias 0."""
    try:
        with seeded(mix_seed(seed, 0)):
            model = timm.create_model(backbone.arch, pretrained=False, num_classes=num_classes,
                                      drop_path_rate=drop_path)
    except TypeError as exc:
        raise UserError(f"finetune: cannot build {backbone.arch} with drop_path_rate={drop_path}: {exc}") from exc
    head = head_parameter_names(model)
    try:
        missing, unexpected = model.load_state_dict(backbone.model.state_dict(), strict=False)
    except RuntimeError as exc:
        raise UserError(f"finetune: the backbone's weights do not fit a fresh {backbone.arch}: {exc}") from exc
    unloaded = sorted(set(missing) - head)
    if unloaded or unexpected:
        raise UserError(f"finetune: rebuilding {backbone.arch} left tensors unloaded {unloaded[:5]} or unexpected "
                        f"{sorted(unexpected)[:5]}; was the backbone built with non-default options?")
    classifier = model.get_classifier()
    with torch.no_grad(), seeded(mix_seed(seed, 1)):
        nn.init.trunc_normal_(classifier.weight, std=0.02)
        classifier.weight.mul_(head_init_scale)
        if getattr(classifier, "bias", None) is not None:
            nn.init.zeros_(classifier.bias)
    return model


def make_optimizer(model: nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8) on ``param_groups``; layer decay only for ViTs. Fused kernels on CUDA."""
    skip = model.no_weight_decay() if config.no_decay_tokens and hasattr(model, "no_weight_decay") else ()
    layer_decay = config.layer_decay if is_vit_like(model) else 1.0
    if layer_decay != config.layer_decay:
        log.warning("finetune: layer decay applies to ViTs only; %s trains every layer at the same lr",
                    type(model).__name__)
    groups = param_groups(model, config.weight_decay, layer_decay, skip)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def make_loss(config: FinetuneConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup (batch mode, prob 1, switch prob 0.5, smoothing inside the targets) with soft-target CE when
    mixup or cutmix is on; else label-smoothing CE, or plain CE without smoothing."""
    if config.mixing:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=config.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return None, nn.CrossEntropyLoss()


# --- evaluation ---------------------------------------------------------------------------------------------------
def classification_scores(confusion: torch.Tensor, top5_hits: int) -> dict[str, float]:
    """top1, top5 and mean per-class accuracy in % from a (true, predicted) confusion matrix; the per-class mean
    runs over the classes that have samples."""
    confusion = confusion.double().cpu()
    counts = confusion.sum(1)
    n = float(counts.sum())
    present = counts > 0
    per_class = confusion.diagonal()[present] / counts[present]
    return {"top1": 100.0 * float(confusion.trace()) / max(n, 1.0), "top5": 100.0 * top5_hits / max(n, 1.0),
            "mean_per_class": 100.0 * float(per_class.mean()) if present.any() else math.nan, "n": int(n)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """Scores over this rank's loader, summed over ranks (each rank holds a disjoint shard)."""
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    hits5 = torch.zeros((), dtype=torch.long, device=device)
    for images, labels, _ in tqdm(loader, desc="finetune eval", disable=hide_progress(), leave=False):
        with autocast(device, precision):
            logits = model(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        top = logits.float().topk(k, dim=1).indices
        hits5 += (top == labels[:, None]).any(1).sum()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes * num_classes)
    if dist_info().world_size > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(hits5)
    return classification_scores(confusion.view(num_classes, num_classes), int(hits5))


# --- checkpoints --------------------------------------------------------------------------------------------------
def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without its classifier, on the CPU: what the checkpoint adapter loads as a backbone."""
    head = head_parameter_names(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in head}


def _save(path: Path, payload: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_finetune_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read fine-tuning checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or FORMAT_KEY not in state:
        raise UserError(f"{path} is not an ssl-bench fine-tuning checkpoint (no {FORMAT_KEY!r} entry)")
    return state


def _settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def best_entry(history: list[dict[str, float]]) -> dict[str, float] | None:
    best = None
    for entry in history:
        if not math.isnan(entry["score"]) and (best is None or entry["score"] > best["score"]):
            best = entry
    return best


# --- the loop -----------------------------------------------------------------------------------------------------
def _all_mean(value: torch.Tensor) -> float:
    if dist_info().world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist_info().world_size
    return float(value)


@dataclass
class _Data:
    train: AugmentedSplit
    sampler: Any  # has set_epoch
    loader: DataLoader
    eval_loader: DataLoader
    steps: int  # per epoch


def _make_data(train: ImageSplit, evaluation: ImageSplit, config: FinetuneConfig, size: int, workers: int,
               device: torch.device) -> _Data:
    """This rank's loaders: augmented train keys from the recipe's sampler (drop_last), and a disjoint eval shard.
    Steps per epoch: BEiT's N // total_batch, or the repeated-augmentation sampler's full batches."""
    info = dist_info()
    transform = train_transform(size, config.randaug, config.color_jitter, config.reprob, config.hflip,
                                config.train_crop)
    data = AugmentedSplit(train, transform, config.seed)
    sampler = train_sampler(len(train), config.repeated_aug, info.world_size, info.rank, config.seed)
    pin = device.type == "cuda"
    loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                        drop_last=True)
    total_batch = config.batch_size * info.world_size
    steps = len(loader) if config.repeated_aug > 1 else min(len(loader), len(train) // total_batch)
    if steps < 1:
        raise UserError(f"finetune: {len(train)} training images give no full batch of {config.batch_size} per "
                        f"process x {info.world_size} process(es)"
                        + (" (repeated augmentation keeps floor(N / 256) x 256 images per epoch)"
                           if config.repeated_aug > 1 else "") + "; lower batch_size")
    shard = Subset(evaluation.with_transform(eval_transform(size, config.eval_transform)),
                   range(info.rank, len(evaluation), info.world_size))
    eval_loader = DataLoader(shard, batch_size=max(1, int(1.5 * config.batch_size)), num_workers=workers,
                             pin_memory=pin)
    return _Data(data, sampler, loader, eval_loader, steps)


def _train_epoch(ddp: nn.Module, optimizer: torch.optim.Optimizer, data: _Data, epoch: int, config: FinetuneConfig,
                 lr_steps: np.ndarray | None, mixup: Mixup | None, criterion: nn.Module, device: torch.device,
                 precision: str, checkpoint_path: Path) -> tuple[float, float]:
    """One epoch; returns (mean loss over steps and ranks, lr of the last step). Mixup and drop path draw from
    generators seeded per (seed, step, rank)."""
    info = dist_info()
    data.sampler.set_epoch(epoch)
    data.train.set_epoch(epoch)
    epoch_lr = deit_epoch_lr(epoch, config.lr, config.min_lr, config.epochs, config.warmup_epochs, config.warmup_lr)
    ddp.train()
    loss_sum, lr = 0.0, 0.0
    bar = tqdm(data.loader, total=data.steps, desc=f"finetune epoch {epoch + 1}/{config.epochs}",
               disable=hide_progress(), leave=False)
    for it, (images, labels) in enumerate(bar):
        if it >= data.steps:
            break
        step = epoch * data.steps + it
        lr = float(lr_steps[step]) if lr_steps is not None else epoch_lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        seed_all(mix_seed(config.seed, step, info.rank, 1))
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup is not None:
            images, labels = mixup(images, labels)
        with autocast(device, precision):
            logits = ddp(images)
        loss = criterion(logits.float(), labels)
        mean_loss = _all_mean(loss.detach())
        if not math.isfinite(mean_loss):
            raise UserError(f"finetune: non-finite loss ({mean_loss}) at epoch {epoch + 1}, step {step}; lower the "
                            f"lr. The last good checkpoint is {checkpoint_path}"
                            + ("" if checkpoint_path.is_file() else " (none written yet)"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += mean_loss
        bar.set_postfix(loss=f"{mean_loss:.4f}")
    return loss_sum / data.steps, lr


def finetune(
    backbone: Backbone,
    train: ImageSplit,
    evaluation: ImageSplit,
    num_classes: int,
    config: FinetuneConfig,
    out_dir: str | Path,
    device: torch.device,
    precision: str = "fp32",
    metric: str = "accuracy",
    workers: int = 0,
    identity: dict[str, Any] | None = None,
    resume: bool = True,
    stop_after_epoch: int = 0,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``train``, evaluating on ``evaluation`` (scores by ``metric``: accuracy or
    mean_per_class). ``precision`` is a resolved precision (fp32 or bf16). ``identity`` adds what names the run
    (protocol, dataset) to the settings a resume must match. ``resume=False`` starts over, overwriting a checkpoint
    in ``out_dir``. ``stop_after_epoch`` N > 0 stops after epoch N with the checkpoint written (a later call resumes;
    a run resumed past epoch N goes on to the end).
    """
    config.check()
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}; expected one of {', '.join(METRICS)}")
    info = dist_info()
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    data = _make_data(train, evaluation, config, backbone.input_size, workers, device)
    lr_steps = (warmup_cosine_steps(config.lr, config.min_lr, config.epochs, data.steps, config.warmup_epochs,
                                    config.warmup_lr) if config.schedule == "step" else None)
    settings = json.loads(json.dumps({
        **(identity or {}), **dataclasses.asdict(config), "arch": backbone.arch, "weights": backbone.weights_id(),
        "train": train.manifest_sha256(), "eval": evaluation.manifest_sha256(), "num_classes": num_classes,
        "metric": metric, "precision": precision, "world_size": info.world_size, "input_size": backbone.input_size,
        "format_version": FORMAT_VERSION,
    }, sort_keys=True, default=str))

    model = build_model(backbone, num_classes, config.drop_path, config.head_init_scale, config.seed).to(device)
    optimizer = make_optimizer(model, config, device)
    mixup, criterion = make_loss(config, num_classes)
    history: list[dict[str, float]] = []
    start, saved_rng = 0, None
    if checkpoint_path.is_file() and not resume:
        log.warning("finetune: resume is off; %s will be overwritten by a fresh run", checkpoint_path)
    if checkpoint_path.is_file() and resume:
        state = read_finetune_checkpoint(checkpoint_path)
        changed = _settings_diff(state[FORMAT_KEY]["settings"], settings)
        if changed:
            raise UserError(
                f"{checkpoint_path} was fine-tuned with other settings ({', '.join(changed)}); give another out_dir, "
                "or resume=false to start over in this one")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, saved_rng = int(state["epoch"]), list(state["history"]), state["rng"]
        log.info("finetune: resuming %s after epoch %d", checkpoint_path, start)
    result = FinetuneResult(history=history, best=best_entry(history), out_dir=out_dir, steps_per_epoch=data.steps,
                            resumed_from_epoch=start, finished=start >= config.epochs)
    if start == 0 and info.is_main:  # exports of an earlier run in this folder would be mistaken for this one's
        for name in (BACKBONE_BEST, BACKBONE_FINAL):
            (out_dir / name).unlink(missing_ok=True)
    ddp: nn.Module = model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    with preserved_rng():
        if saved_rng is not None:
            set_rng_state(saved_rng)
        for epoch in range(start, config.epochs):
            began = time.time()
            loss, lr = _train_epoch(ddp, optimizer, data, epoch, config, lr_steps, mixup, criterion, device,
                                    precision, checkpoint_path)
            last = epoch + 1 == config.epochs
            if (epoch + 1) % config.eval_every == 0 or last:
                scores = evaluate(model, data.eval_loader, num_classes, device, precision)
                entry = {"epoch": epoch + 1, "lr": lr, "loss": loss, **scores,
                         "score": scores["top1" if metric == "accuracy" else "mean_per_class"]}
                history.append(entry)
                improved = result.best is None or entry["score"] > result.best["score"]
                if improved:
                    result.best = entry
                if improved and info.is_main:
                    _save(out_dir / BACKBONE_BEST, backbone_state(model))
                log.info("finetune epoch %d/%d: loss %.4f, lr %.3g, top-1 %.2f %%, %s %.2f %% (best %.2f %% at "
                         "epoch %d), %.1f s", epoch + 1, config.epochs, loss, lr, scores["top1"], metric,
                         entry["score"], result.best["score"], result.best["epoch"], time.time() - began)
            if info.is_main:
                _save(checkpoint_path, {
                    FORMAT_KEY: {"format_version": FORMAT_VERSION, "arch": backbone.arch, "settings": settings},
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None,
                    "epoch": epoch + 1, "steps_per_epoch": data.steps, "history": history, "best": result.best,
                    "rng": get_rng_state(),
                })
                if last:
                    _save(out_dir / BACKBONE_FINAL, backbone_state(model))
            barrier()
            if last:
                result.finished = True
            elif epoch + 1 == stop_after_epoch:
                log.info("finetune: stopped after epoch %d as asked; run again to continue", epoch + 1)
                break
    result.history = history
    result.exports = {name: str(out_dir / name) for name in (BACKBONE_BEST, BACKBONE_FINAL)
                      if (out_dir / name).is_file()}
    return result

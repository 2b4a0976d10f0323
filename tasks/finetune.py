"""End-to-end fine-tuning of the backbone (protocols.md §8 and §13), reported as the DINO-vMF paper reports it: the
best top-1 over epochs (and over the swept lrs) on the evaluation split.

Recipes (the row's ``protocol`` column says which one ran); every option left unset takes the recipe's value:

``imagenet`` -> ``beit-ft-v1``  BEiT's recipe as iBOT runs it (§8.1): AdamW (wd 0.05; none on norms, biases,
                  ``pos_embed``, ``cls_token``), layer-wise lr decay 0.75 (ViT-S-like) / 0.65 (ViT-B), per-iteration
                  lr: linear warmup from 0 over 20 epochs, cosine to 1e-6, lr not batch-scaled; 128 images per
                  process; drop path 0.1 (width <= 384) / 0.2; 200 (width <= 384) / 100 epochs; head init x 0.001;
                  swept lrs {8e-4, 9e-4, 1e-3, 2e-3}; eval Resize(size / 0.875, bilinear) + CenterCrop.
``small``    -> ``deit-ft-v1``  DeiT's recipe as iBOT's ``eval_cls.py`` runs it (§8.2, §13): lr 7.5e-6 x
                  total_batch / 512 with the total batch pinned at 768 (768 / world_size per process), per-epoch
                  timm cosine (warmup from 1e-6 over 5 epochs, min 1e-5, epoch 0 at the warmup lr), 1000 epochs,
                  repeated augmentation x3, no layer decay, ``pos_embed`` / ``cls_token`` decayed, head init x 1,
                  eval Resize(256/224 size, bicubic) + CenterCrop.
``auto``        ``small`` for the transfer datasets (``cifar10:PATH``, ``flowers:PATH`` ...), else ``imagenet``.

Both: RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel), mixup 0.8 / cutmix 1.0 / label smoothing
0.1 (timm), a fresh linear head (trunc-normal 0.02) on the CLS token after the final norm, bf16 autocast on CUDA,
torchrun DDP. ``lr`` takes a list (``-p lr=8e-4,1e-3``): one fine-tune per lr, the best reported.

Splits: datasets with ``trainval`` and ``test`` (the transfer datasets) train on trainval and are scored on test
(iBOT: CIFAR's full training set, Flowers' train + val); others train on ``train`` and are scored on ``val``.

Score: the dataset's metric (accuracy, or mean per-class accuracy for Aircraft, Caltech, Flowers, Pets); one epoch
is selected per lr by it (ties: the earlier), and the best rows (top1, top5, mean_per_class) all come from that
epoch; ``*_final`` rows from the last epoch. The selection is made on the reported split, as in both references:
rows say ``selection: eval split``.

Not in the references, for data they never met: ``hflip`` (0 where a mirror image is another class) and
``train_crop=none`` (no spatial augmentation, e.g. for 8 x 8 px digits).

Each lr trains in its own folder (``out_dir``; auto = ``<results folder>/finetune/<model>_<dataset>_<recipe>_lr<lr>``)
with a checkpoint per epoch: rerunning the same command resumes (or, when finished, only reports); a folder
holding a run with other settings is refused (``resume=false`` starts over). ``backbone_best.pth`` and
``backbone_final.pth`` there are plain backbone state dicts: ``ssl-bench run --ckpt`` scores the fine-tuned model
with every other task.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ssl_bench.context import TaskContext
from ssl_bench.data import Dataset
from ssl_bench.errors import UserError
from ssl_bench.finetune_data import CROPS, eval_transform_key
from ssl_bench.finetune_loop import FinetuneConfig, FinetuneResult, finetune
from ssl_bench.layer_decay import is_vit_like
from ssl_bench.options import check_at_least, check_between, check_choice, check_positive
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.runtime import dist_info, resolve_precision
from ssl_bench.transfer_data import TRANSFER_DATASETS

log = logging.getLogger(__name__)

PROTOCOLS = {"imagenet": "beit-ft-v1", "small": "deit-ft-v1"}
RECIPES = ("auto", *PROTOCOLS)
BEIT_LRS: tuple[float, ...] = (8e-4, 9e-4, 1e-3, 2e-3)  # DINO-vMF's sweep (§8.1)
DEIT_BASE_LR = 7.5e-6
DEIT_LR_BATCH = 512  # DeiT scales its lr by total_batch / 512
DEIT_TOTAL_BATCH = 768  # iBOT's run.sh: 8 GPUs x 96
SMALL_VIT_MAX_DIM = 384  # ViT-S and narrower take ViT-S's settings
VIT_B_DIM = 768
DEFAULT_RESULTS = "results/runs.csv"


@dataclass
class FinetuneParams:
    recipe: str = "auto"  # imagenet (BEiT) | small (DeiT) | auto (small for transfer datasets)
    lr: tuple[float, ...] = ()  # one fine-tune per value; () = recipe's: imagenet 8e-4,9e-4,1e-3,2e-3; small 7.5e-6
    epochs: int | None = None  # imagenet: 200 (width <= 384) / 100; small: 1000
    batch_size: int | None = None  # per process; imagenet 128; small 768 / world_size (total pinned at 768)
    layer_decay: float | None = None  # imagenet: 0.65 ViT-B, 0.75 other ViTs; small: 1 (off); CNNs: off
    drop_path: float | None = None  # imagenet: 0.1 (width <= 384) / 0.2; small: 0.1
    warmup_epochs: int | None = None  # imagenet 20, small 5
    min_lr: float | None = None  # imagenet 1e-6, small 1e-5
    weight_decay: float = 0.05
    randaug: str = "rand-m9-mstd0.5-inc1"  # none = off
    color_jitter: float = 0.4  # inactive while RandAugment is on (timm)
    reprob: float = 0.25
    hflip: float = 0.5  # horizontal flip probability (0 for data where a mirror image is another class)
    train_crop: str = "auto"  # auto: RandomResizedCrop (RandomCrop pad 4 at <= 32 px); none: no spatial augmentation
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    repeated_aug: int | None = None  # imagenet 1 (off), small 3
    eval_every: int = 1
    seed: int = 0
    out_dir: str = "auto"  # checkpoints + exported backbones; a sweep uses <out_dir>/lr<lr> per lr
    resume: bool = True  # continue a matching checkpoint (refuse other settings); false = start over
    stop_after_epoch: int = 0  # > 0: stop after that epoch with the checkpoint saved (no rows); rerun to continue


# --- recipe -------------------------------------------------------------------------------------------------------
def resolve_recipe(dataset: Dataset, recipe: str = "auto") -> str:
    name = recipe.strip().lower()
    if name not in RECIPES:
        raise UserError(f"finetune recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if name == "auto":
        return "small" if dataset.spec.partition(":")[0] in TRANSFER_DATASETS else "imagenet"
    return name


def splits_for(dataset: Dataset) -> tuple[str, str]:
    """(train split, eval split): trainval -> test where the dataset has both (the transfer datasets, whatever the
    recipe), else train -> val (train -> test without a val split)."""
    names = dataset.splits
    if "trainval" in names and "test" in names:
        return "trainval", "test"
    evaluation = "val" if "val" in names or "test" not in names else "test"
    for split in ("train", evaluation):
        dataset.split(split)  # a clear error when missing
    return "train", evaluation


def default_layer_decay(backbone) -> float:
    """0.65 for ViT-B (width 768), 0.75 for other ViTs, 1 (off) for models without transformer blocks."""
    if not is_vit_like(backbone.model):
        return 1.0
    return 0.65 if backbone.embed_dim == VIT_B_DIM else 0.75


def recipe_config(params: FinetuneParams, recipe: str, backbone, lr: float, world_size: int) -> FinetuneConfig:
    """The run's settings: the recipe's values wherever ``params`` leaves one unset; ``lr`` is used as given."""
    narrow = backbone.embed_dim <= SMALL_VIT_MAX_DIM

    def pick(value, default):
        return default if value is None else value

    common = dict(lr=lr, weight_decay=params.weight_decay, randaug=params.randaug, color_jitter=params.color_jitter,
                  reprob=params.reprob, hflip=params.hflip, train_crop=params.train_crop, mixup=params.mixup,
                  cutmix=params.cutmix, smoothing=params.smoothing, eval_every=params.eval_every, seed=params.seed)
    if recipe == "imagenet":
        return FinetuneConfig(
            epochs=pick(params.epochs, 200 if narrow else 100), batch_size=pick(params.batch_size, 128),
            min_lr=pick(params.min_lr, 1e-6), warmup_epochs=pick(params.warmup_epochs, 20), warmup_lr=0.0,
            schedule="step", layer_decay=pick(params.layer_decay, default_layer_decay(backbone)),
            no_decay_tokens=True, drop_path=pick(params.drop_path, 0.1 if narrow else 0.2), head_init_scale=0.001,
            repeated_aug=pick(params.repeated_aug, 1), eval_transform="beit", **common)
    return FinetuneConfig(
        epochs=pick(params.epochs, 1000), batch_size=pick(params.batch_size, small_batch_size(world_size)),
        min_lr=pick(params.min_lr, 1e-5), warmup_epochs=pick(params.warmup_epochs, 5), warmup_lr=1e-6,
        schedule="epoch", layer_decay=pick(params.layer_decay, 1.0), no_decay_tokens=False,
        drop_path=pick(params.drop_path, 0.1), head_init_scale=1.0, repeated_aug=pick(params.repeated_aug, 3),
        eval_transform="deit", **common)


def small_batch_size(world_size: int) -> int:
    """Per-process batch that keeps the small recipe's total batch at 768 (its lr is tied to it, §13)."""
    if DEIT_TOTAL_BATCH % world_size:
        raise UserError(f"finetune small recipe: the total batch {DEIT_TOTAL_BATCH} does not split over {world_size} "
                        f"processes; give batch_size (per process) explicitly")
    return DEIT_TOTAL_BATCH // world_size


def effective_lr(recipe: str, lr: float, total_batch: int) -> tuple[float, float]:
    """(peak lr, scale): BEiT's lr is used as given; DeiT's is scaled by total_batch / 512."""
    scale = total_batch / DEIT_LR_BATCH if recipe == "small" else 1.0
    return lr * scale, scale


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def run_dir(ctx: TaskContext, params: FinetuneParams, recipe: str, lr: float, sweep: bool) -> Path:
    if params.out_dir.lower() != "auto":
        return Path(params.out_dir) / f"lr{lr:g}" if sweep else Path(params.out_dir)
    results = Path(ctx.extra.get("results", DEFAULT_RESULTS))
    model = _safe(ctx.model_label or ctx.backbone.label)
    return results.parent / "finetune" / f"{model}_{_safe(ctx.dataset.name)}_{recipe}_lr{lr:g}"


def check_params(params: FinetuneParams) -> None:
    """The options alone, before any model or data (the limits ``FinetuneConfig.check`` puts on the resolved run;
    options left to the recipe, None, pass)."""
    check_choice("finetune.recipe", params.recipe.strip().lower(), RECIPES)
    for lr in params.lr:
        check_positive("finetune.lr", lr)
    check_at_least("finetune.epochs", params.epochs, 1)
    check_at_least("finetune.batch_size", params.batch_size, 1)
    check_between("finetune.layer_decay", params.layer_decay, 0, 1, low_open=True)
    check_between("finetune.drop_path", params.drop_path, 0, 1, high_open=True)
    check_at_least("finetune.warmup_epochs", params.warmup_epochs, 0)
    check_at_least("finetune.min_lr", params.min_lr, 0)
    check_at_least("finetune.weight_decay", params.weight_decay, 0)
    check_at_least("finetune.color_jitter", params.color_jitter, 0)
    check_between("finetune.reprob", params.reprob, 0, 1)
    check_between("finetune.hflip", params.hflip, 0, 1)
    check_choice("finetune.train_crop", params.train_crop, CROPS)
    check_at_least("finetune.mixup", params.mixup, 0)
    check_at_least("finetune.cutmix", params.cutmix, 0)
    check_between("finetune.smoothing", params.smoothing, 0, 1, high_open=True)
    check_at_least("finetune.repeated_aug", params.repeated_aug, 1)
    check_at_least("finetune.eval_every", params.eval_every, 1)
    check_at_least("finetune.stop_after_epoch", params.stop_after_epoch, 0)
    if params.batch_size is not None and params.batch_size % 2 and (params.mixup > 0 or params.cutmix > 0):
        raise UserError("finetune: mixup / cutmix pair the images of a batch: batch_size must be even; "
                        f"got {params.batch_size}")


# --- the registered task ------------------------------------------------------------------------------------------
@register_task(
    "finetune", version=PROTOCOLS["imagenet"], params=FinetuneParams, check=check_params,
    description="end-to-end fine-tuning (BEiT recipe / DeiT recipe for transfer datasets): best top-1 over epochs",
)
def run(ctx: TaskContext, params: FinetuneParams) -> list[ResultRow]:
    dataset, backbone = ctx.dataset, ctx.backbone
    if backbone.is_pixels:
        raise UserError(f"finetune: {backbone.label} is the raw image, with no parameters to fine-tune; score it with "
                        "knn, linear, fewshot or transfer")
    recipe = resolve_recipe(dataset, params.recipe)
    protocol = PROTOCOLS[recipe]
    train_split, eval_split = splits_for(dataset)
    info = dist_info()
    lrs = tuple(params.lr) or (BEIT_LRS if recipe == "imagenet" else (DEIT_BASE_LR,))
    if any(not lr > 0 for lr in lrs):
        raise UserError(f"finetune: every lr must be > 0; got {list(lrs)}")
    precision = resolve_precision(ctx.precision, ctx.device)
    metric = dataset.metric
    runs: list[tuple[float, FinetuneConfig, FinetuneResult]] = []
    for base_lr in lrs:
        config = recipe_config(params, recipe, backbone, base_lr, info.world_size)
        lr, scale = effective_lr(recipe, base_lr, config.batch_size * info.world_size)
        config = dataclasses.replace(config, lr=lr)
        out_dir = run_dir(ctx, params, recipe, base_lr, len(lrs) > 1)
        log.info("finetune [%s] lr %g (peak %g) -> %s", recipe, base_lr, lr, out_dir)
        result = finetune(
            backbone, dataset.split(train_split), dataset.split(eval_split), dataset.num_classes, config, out_dir,
            ctx.device, precision=precision, metric=metric, workers=ctx.workers,
            identity={"protocol": protocol, "recipe": recipe, "train_split": train_split, "eval_split": eval_split,
                      "lr_base": base_lr, "lr_scale": scale},
            resume=params.resume, stop_after_epoch=params.stop_after_epoch,
        )
        runs.append((base_lr, config, result))
        if not result.finished:
            log.info("finetune: lr %g stopped after epoch %d of %d; no rows until every lr has finished", base_lr,
                     result.history[-1]["epoch"] if result.history else 0, config.epochs)
            return []
    return make_rows(ctx, params, recipe, protocol, train_split, eval_split, precision, runs)


def make_rows(ctx: TaskContext, params: FinetuneParams, recipe: str, protocol: str, train_split: str, eval_split: str,
              precision: str, runs: list[tuple[float, FinetuneConfig, FinetuneResult]]) -> list[ResultRow]:
    """Rows of the best lr (highest selected score; ties: the first lr given)."""
    scored = [(lr, config, result) for lr, config, result in runs if result.best is not None]
    if not scored:
        raise UserError("finetune: no evaluation produced a score (empty evaluation split?)")
    base_lr, config, result = max(scored, key=lambda run: run[2].best["score"])
    best, final = result.best, result.final
    info = dist_info()
    metric = ctx.dataset.metric
    schedules = {"step": "per iteration, warmup from warmup_lr (BEiT)",
                 "epoch": "per epoch, timm cosine stepped after each epoch (DeiT)"}
    params_out = {
        **dataclasses.asdict(config),
        "recipe": recipe, "recipe_requested": params.recipe, "lr_base": base_lr, "lr_scale": config.lr / base_lr,
        "lrs_base": [float(lr) for lr, _, _ in runs],
        "score_by_lr_base": {f"{lr:g}": round(float(r.best["score"]), 4) for lr, _, r in scored},
        "best_epoch": int(best["epoch"]), "world_size": info.world_size,
        "total_batch": config.batch_size * info.world_size, "steps_per_epoch": result.steps_per_epoch,
        "schedule": schedules[config.schedule],
        "layer_decay": config.layer_decay if is_vit_like(ctx.backbone.model) else 1.0,
        "no_weight_decay": "1-D, biases" + (", pos_embed, cls_token" if config.no_decay_tokens else ""),
        "train_split": train_split, "eval_split": eval_split,
        "eval_transform": eval_transform_key(ctx.backbone.input_size, config.eval_transform), "metric": metric,
        "selection": "eval split",
        "selection_rule": f"max {metric} over epochs, then over lrs, on the reported split (as BEiT and DeiT)",
        "precision": precision, "out_dir": str(result.out_dir), "resumed_from_epoch": result.resumed_from_epoch,
        **result.exports,
    }
    values = [("top1", best["top1"])]
    if ctx.dataset.num_classes >= 5:
        values.append(("top5", best["top5"]))
    values.append(("top1_final", final["top1"]))
    if metric == "mean_per_class":
        values += [("mean_per_class", best["mean_per_class"]), ("mean_per_class_final", final["mean_per_class"])]
    log.info("finetune [%s] best lr %g after epoch %d: top-1 %.2f %% (%s %.2f %%)", recipe, base_lr, best["epoch"],
             best["top1"], metric, best["score"])
    return [ctx.row(task="finetune", protocol=protocol, split=eval_split, metric=name, value=value, params=params_out,
                    n=int(best["n"])) for name, value in values]

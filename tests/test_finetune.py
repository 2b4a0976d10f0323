"""Fine-tuning (tasks/finetune.py and its helpers): layer-decay groups, the two lr schedules against the references'
formulas and timm's scheduler, DeiT's repeated-augmentation sampler, reproducible augmentation, model building,
scores, recipe defaults, a tiny end-to-end fine-tune against the frozen linear probe, exact resume, the exported
backbone, and the task through the CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.context import TaskContext
from ssl_bench.data import ArraySplit, Dataset, resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.finetune_data import AugmentedSplit, RepeatedAugSampler, posterize_bits, train_transform
from ssl_bench.finetune_loop import (
    BACKBONE_BEST, BACKBONE_FINAL, CHECKPOINT_NAME, FinetuneConfig, build_model, classification_scores,
    head_parameter_names, make_optimizer, read_finetune_checkpoint,
)
from ssl_bench.layer_decay import layer_scales, param_groups, vit_layer_id
from ssl_bench.logreg import fit_logistic
from ssl_bench.lr_schedules import deit_epoch_lr, warmup_cosine_steps
from ssl_bench.registry import get_task, parse_params
from ssl_bench.results import read_rows
from ssl_bench.tasks.finetune import (
    FinetuneParams, effective_lr, recipe_config, resolve_recipe, run, small_batch_size, splits_for,
)

from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"


pytestmark = pytest.mark.usefixtures("one_thread")


def vit12(**kwargs) -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=12, num_heads=2, num_classes=5, **kwargs)


def expected_layer(name: str, depth: int = 12) -> int:
    """§8.1 written out: 0 = cls_token / pos_embed / patch_embed, i + 1 = blocks.i, L + 1 = the rest."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


# --- layer decay --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.75, 0.65])
def test_layer_decay_groups_of_a_12_block_vit_follow_the_formula(decay):
    model = vit12()
    groups = param_groups(model, 0.05, decay, skip_decay=model.no_weight_decay())
    seen = {}
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        for name, param in zip(group["names"], group["params"]):
            assert name not in seen
            seen[name] = group
            layer = expected_layer(name)
            assert group["layer_id"] == layer == vit_layer_id(name, 12)
            assert group["lr_scale"] == pytest.approx(decay ** (12 + 1 - layer), rel=1e-12)
            no_decay = param.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert set(seen) == {name for name, _ in model.named_parameters()}
    scale = {name: group["lr_scale"] for name, group in seen.items()}
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert scale["blocks.11.attn.qkv.weight"] == pytest.approx(decay)
    assert scale["blocks.0.mlp.fc1.weight"] == pytest.approx(decay ** 12)
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == pytest.approx(decay ** 13)
    assert layer_scales(decay, 12) == pytest.approx([decay ** (13 - i) for i in range(14)])
    assert len(groups) == 2 * 14  # every layer id has decayed matrices and exempt vectors


def test_small_recipe_groups_decay_pos_embed_and_cls_token_and_have_no_layer_decay():
    model = vit12()
    groups = param_groups(model, 0.05, 1.0)
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name["pos_embed"]["weight_decay"] == by_name["cls_token"]["weight_decay"] == 0.05
    assert by_name["norm.weight"]["weight_decay"] == by_name["blocks.3.attn.qkv.bias"]["weight_decay"] == 0.0
    assert {g["lr_scale"] for g in groups} == {1.0} and len(groups) == 2
    with pytest.raises(ValueError, match="ViT"):
        param_groups(nn.Linear(3, 3), 0.05, 0.75)


def test_optimizer_follows_the_recipe_settings():
    model = vit12()
    beit = make_optimizer(model, FinetuneConfig(layer_decay=0.75, no_decay_tokens=True), torch.device("cpu"))
    deit = make_optimizer(model, FinetuneConfig(layer_decay=1.0, no_decay_tokens=False), torch.device("cpu"))
    assert isinstance(beit, torch.optim.AdamW)
    assert beit.defaults["eps"] == 1e-8 and beit.defaults["betas"] == (0.9, 0.999)
    assert min(g["lr_scale"] for g in beit.param_groups) == pytest.approx(0.75 ** 13)
    assert {g["lr_scale"] for g in deit.param_groups} == {1.0}
    assert sum(len(g["params"]) for g in beit.param_groups) == len(list(model.parameters()))


# --- schedules ----------------------------------------------------------------------------------------------------
def test_beit_per_iteration_schedule_by_hand():
    lrs = warmup_cosine_steps(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1)
    # warmup linspace(0, 1, 2) = [0, 1] (BEiT includes the end point), then 0.5 (1 + cos(pi i / 4)), i = 0..3
    assert lrs == pytest.approx([0.0, 1.0, 1.0, 0.8535534, 0.5, 0.1464466])
    lrs = warmup_cosine_steps(2e-3, 1e-6, epochs=5, steps_per_epoch=7, warmup_epochs=2)
    assert len(lrs) == 35 and lrs[0] == 0.0 and lrs[13] == pytest.approx(2e-3) and lrs[14] == pytest.approx(2e-3)
    assert lrs[-1] > 1e-6 and np.all(np.diff(lrs[14:]) < 0)


@pytest.mark.parametrize("warmup", [5, 0])
def test_deit_per_epoch_lr_matches_timm_scheduler_stepped_as_deit_steps_it(warmup):
    from timm.scheduler import CosineLRScheduler

    epochs, base, final, start = 12, 1.125e-5, 1e-5, 1e-6
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=final, warmup_lr_init=start, warmup_t=warmup,
                                  cycle_limit=1, t_in_epochs=True)
    expected = []
    for epoch in range(epochs):
        expected.append(optimizer.param_groups[0]["lr"])  # the lr this epoch trains with
        scheduler.step(epoch)  # DeiT / iBOT eval_cls.py: after the epoch, with the epoch just finished
    got = [deit_epoch_lr(e, base, final, epochs, warmup, start) for e in range(epochs)]
    assert got == pytest.approx(expected, rel=1e-12)
    if warmup:
        assert got[0] == got[1] == start  # epoch 0 at the warmup lr, and epoch 1 at t = 0 of the warmup


# --- data ---------------------------------------------------------------------------------------------------------
def deit_ra_sampler(n, world, rank, epoch):
    """DeiT's RASampler as written (3 repeats, generator seeded with the epoch), for comparison."""
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.randperm(n, generator=g).tolist()
    indices = [i for i in indices for _ in range(3)]
    total = int(math.ceil(n * 3.0 / world)) * world
    indices += indices[:total - len(indices)]
    return indices[rank:total:world][:int(math.floor(n // 256 * 256 / world))]


@pytest.mark.parametrize("n, world", [(600, 1), (2040, 8), (1000, 3)])
def test_repeated_aug_sampler_is_deits_with_a_key_per_repetition(n, world):
    for rank in range(world):
        sampler = RepeatedAugSampler(n, 3, world, rank, seed=0)
        sampler.set_epoch(4)
        keys = list(sampler)
        assert len(keys) == len(sampler) == n // 256 * 256 // world
        assert [k % n for k in keys] == deit_ra_sampler(n, world, rank, 4)
        assert len(set(keys)) == len(keys)  # every repetition has its own key, hence its own augmentation
    if n == 2040:
        assert len(sampler) // 96 == 2  # Flowers' 2040 images at 8 x 96: two steps per epoch (§13)


def test_augmentation_depends_on_seed_epoch_and_key_only():
    split = resolve_dataset("builtin:digits").split("val")
    data = AugmentedSplit(split, train_transform(32), seed=3)
    state = torch.get_rng_state()
    first = data[5][0]
    torch.manual_seed(123)
    np.random.seed(7)
    assert torch.equal(data[5][0], first)  # whatever the global generators hold
    assert not torch.equal(data[5 + len(split)][0], first)  # the same image, a second repetition: another draw
    data.set_epoch(1)
    assert not torch.equal(data[5][0], first)
    assert data[5 + len(split)][1] == data[5][1] == int(split.labels[5])
    torch.set_rng_state(state)


def test_posterize_keeps_pillows_old_zero_bit_result():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (6, 6, 3), dtype=np.uint8))
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize_bits(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert np.asarray(posterize_bits(image, 0)).max() == 0 and posterize_bits(image, 8) is image


# --- model and scores ---------------------------------------------------------------------------------------------
def test_build_model_copies_the_backbone_and_adds_a_fresh_head():
    backbone = create_backbone(TINY, seed=2)
    model = build_model(backbone, num_classes=7, drop_path=0.1, head_init_scale=1.0, seed=0)
    assert head_parameter_names(model) == {"head.weight", "head.bias"}
    source = backbone.model.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, source[name]), name
    assert model.head.weight.shape == (7, backbone.embed_dim) and torch.count_nonzero(model.head.bias) == 0
    assert 0.016 < float(model.head.weight.detach().std()) < 0.024  # trunc-normal(0.02); its cut-offs are absolute, +-2
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    scaled = build_model(backbone, 7, head_init_scale=0.001, seed=0)
    torch.testing.assert_close(scaled.head.weight, model.head.weight * 0.001)


def test_scores_from_a_confusion_matrix_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 1, 1], [0, 0, 0]])  # class 2 has no samples
    scores = classification_scores(confusion, top5_hits=6)
    assert scores["top1"] == pytest.approx(100 * 4 / 6) and scores["top5"] == pytest.approx(100.0)
    assert scores["mean_per_class"] == pytest.approx(100 * (3 / 4 + 1 / 2) / 2) and scores["n"] == 6


# --- recipes ------------------------------------------------------------------------------------------------------
def stub_backbone(dim: int, vit: bool = True):
    model = nn.Module()
    if vit:
        model.blocks, model.patch_embed = nn.ModuleList(), nn.Identity()
    return SimpleNamespace(model=model, embed_dim=dim)


def test_recipe_defaults():
    assert resolve_recipe(Dataset("cifar10", "cifar10:/data/c10")) == "small"
    assert resolve_recipe(Dataset("flwr", "flowers:/data/f")) == "small"
    assert resolve_recipe(Dataset("imagenet", "imagefolder:/data/in")) == "imagenet"
    assert resolve_recipe(Dataset("cifar10", "cifar10:/x"), "imagenet") == "imagenet"
    with pytest.raises(UserError, match="recipe"):
        resolve_recipe(Dataset("x", "x"), "beit")
    params = FinetuneParams()
    vits, vitb = recipe_config(params, "imagenet", stub_backbone(384), 1e-3, 1), \
        recipe_config(params, "imagenet", stub_backbone(768), 1e-3, 1)
    assert (vits.epochs, vits.drop_path, vits.layer_decay, vits.batch_size) == (200, 0.1, 0.75, 128)
    assert (vitb.epochs, vitb.drop_path, vitb.layer_decay) == (100, 0.2, 0.65)
    assert vits.schedule == "step" and vits.warmup_epochs == 20 and vits.warmup_lr == 0 and vits.min_lr == 1e-6
    assert vits.no_decay_tokens and vits.head_init_scale == 0.001 and vits.repeated_aug == 1
    assert recipe_config(params, "imagenet", stub_backbone(2048, vit=False), 1e-3, 1).layer_decay == 1.0
    small = recipe_config(params, "small", stub_backbone(384), 1e-5, 1)
    assert (small.epochs, small.batch_size, small.layer_decay, small.repeated_aug) == (1000, 768, 1.0, 3)
    assert small.schedule == "epoch" and small.min_lr == 1e-5 and small.warmup_lr == 1e-6 and small.warmup_epochs == 5
    assert not small.no_decay_tokens and small.eval_transform == "deit"
    assert small_batch_size(8) == 96 and small_batch_size(2) == 384
    assert effective_lr("small", 7.5e-6, 768) == pytest.approx((1.125e-5, 1.5))  # §13: barely above min lr 1e-5
    assert effective_lr("imagenet", 1e-3, 1024) == (1e-3, 1.0)
    override = recipe_config(FinetuneParams(epochs=3, layer_decay=0.9, batch_size=6), "imagenet",
                             stub_backbone(384), 1e-3, 1)
    assert (override.epochs, override.layer_decay, override.batch_size) == (3, 0.9, 6)


def test_splits_for_transfer_and_imagenet_layouts():
    digits = resolve_dataset("builtin:digits")
    assert splits_for(digits) == ("train", "val")
    four = Dataset("c", "cifar10:/x", splits={s: digits.split("val") for s in ("train", "val", "trainval", "test")})
    assert splits_for(four) == ("trainval", "test")
    assert splits_for(Dataset("t", "x", splits={"train": digits.split("val"), "test": digits.split("val")})) == \
        ("train", "test")
    with pytest.raises(UserError, match="no split 'train'"):
        splits_for(Dataset("v", "x", splits={"val": digits.split("val")}))


# --- end to end ---------------------------------------------------------------------------------------------------
def digits_subset(n_train: int, n_val: int) -> Dataset:
    digits = resolve_dataset("builtin:digits")
    train, val = digits.split("train"), digits.split("val")
    return Dataset("digits-sub", "builtin:digits", splits={
        "train": ArraySplit(train.images[:n_train], train.labels[:n_train], train.classes, "digits-sub/train"),
        "val": ArraySplit(val.images[:n_val], val.labels[:n_val], val.classes, "digits-sub/val"),
    })


def context(dataset: Dataset, tmp_path, workers: int = 0, seed: int = 0) -> TaskContext:
    return TaskContext(backbone=create_backbone(TINY, seed=seed), dataset=dataset, device=torch.device("cpu"),
                       workers=workers, use_cache=False, extra={"results": str(tmp_path / "results" / "runs.csv")})


def metric_values(rows) -> dict[str, float]:
    return {row.metric: row.value for row in rows}


def test_tiny_finetune_beats_the_frozen_linear_probe_of_the_same_random_init_backbone(tmp_path):
    ctx = context(resolve_dataset("builtin:digits"), tmp_path)
    # the probe: L2 logistic regression (C = 1, scikit-learn's default) on the frozen CLS features, seen through
    # the same eval view as the fine-tune's (Resize + CenterCrop at 32 px)
    train, val = ctx.features("train", "cls", "eval_sslt"), ctx.features("val", "cls", "eval_sslt")
    probe = fit_logistic(train.tensor(), torch.from_numpy(train.labels), 10, C=1.0)
    probe_top1 = 100.0 * probe.score(val.tensor(), torch.from_numpy(val.labels))
    # BEiT's recipe with its augmentation and regularisation off and a constant lr: from random init, a 0.5M-parameter
    # ViT gets only a few epochs on 1347 images of 8 x 8 px, where a crop or a flip can change the digit
    params = FinetuneParams(recipe="imagenet", lr=(5e-4,), epochs=8, batch_size=16, warmup_epochs=0, min_lr=5e-4,
                            layer_decay=1.0, drop_path=0.0, randaug="none", reprob=0.0, mixup=0.0, cutmix=0.0,
                            smoothing=0.0, hflip=0.0, color_jitter=0.0, train_crop="none", eval_every=4)
    rows = run(ctx, params)
    values = metric_values(rows)
    print(f"fine-tune top-1 {values['top1']:.2f} % vs frozen linear probe {probe_top1:.2f} %")
    assert values["top1"] > probe_top1 + 5.0
    best = next(r for r in rows if r.metric == "top1")
    assert best.protocol == "beit-ft-v1" and best.split == "val" and best.n == 450
    assert best.params["best_epoch"] in (4, 8) and best.params["steps_per_epoch"] == 1347 // 16
    assert {"top1", "top5", "top1_final"} <= set(values)


def test_resume_after_an_epoch_equals_the_uninterrupted_run(tmp_path):
    dataset = digits_subset(160, 60)
    # the full recipe's randomness: RandAugment, erasing, mixup / cutmix, drop path, layer decay
    params = FinetuneParams(recipe="imagenet", lr=(1e-3,), epochs=2, batch_size=16, warmup_epochs=1,
                            out_dir=str(tmp_path / "full"))
    full_rows = run(context(dataset, tmp_path), params)
    killed = tmp_path / "killed"
    stopped = dict(vars(params), out_dir=str(killed), stop_after_epoch=1)
    assert run(context(dataset, tmp_path, workers=2), FinetuneParams(**stopped)) == []
    state = read_finetune_checkpoint(killed / CHECKPOINT_NAME)
    assert state["epoch"] == 1 and len(state["history"]) == 1 and not (killed / BACKBONE_FINAL).exists()
    resumed_rows = run(context(dataset, tmp_path, workers=2), FinetuneParams(**dict(stopped, stop_after_epoch=0)))
    assert metric_values(resumed_rows) == metric_values(full_rows)
    assert resumed_rows[0].params["resumed_from_epoch"] == 1 and full_rows[0].params["resumed_from_epoch"] == 0
    a = read_finetune_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    b = read_finetune_checkpoint(killed / CHECKPOINT_NAME)
    assert a["history"] == b["history"] and a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=0, msg=key)
    # a finished run only reports
    again = run(context(dataset, tmp_path), FinetuneParams(**dict(stopped, stop_after_epoch=0)))
    assert metric_values(again) == metric_values(full_rows) and again[0].params["resumed_from_epoch"] == 2
    # other settings in the same folder are refused, naming them
    with pytest.raises(UserError, match=r"other settings \(.*lr.*\)"):
        run(context(dataset, tmp_path), FinetuneParams(**dict(stopped, lr=(2e-3,))))

    # the exported backbone is a plain state dict that the checkpoint adapter loads as any other
    export = killed / BACKBONE_FINAL
    scored = create_backbone(TINY, ckpt=str(export))
    assert scored.load_report.format == "state_dict" and not scored.load_report.unexpected
    for key, tensor in scored.model.state_dict().items():
        assert torch.equal(tensor, b["model"][key]), key
    assert (killed / BACKBONE_BEST).is_file() and resumed_rows[0].params[BACKBONE_FINAL] == str(export)
    whole = create_backbone(TINY, ckpt=str(killed / CHECKPOINT_NAME))  # the checkpoint itself: "wrapped", head unused
    assert whole.load_report.format == "wrapped" and set(whole.load_report.unexpected) == {"head.weight", "head.bias"}


def test_finetune_through_the_cli_with_an_lr_sweep(tmp_path):
    root = make_imagefolder(tmp_path / "imnet", classes=(0, 1, 7), train_per_class=12, val_per_class=5)
    results = tmp_path / "results" / "runs.csv"
    out = CliRunner().invoke(cli, [
        "-q", "run", "--task", "finetune", "--model", TINY, "--data", str(root), "--data-name", "tiny",
        "-p", "lr=8e-4,1e-3", "-p", "epochs=1", "-p", "batch_size=8", "-p", "warmup_epochs=0", "--workers", "0",
        "--no-cache", "--results", str(results)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert {r.metric for r in rows} == {"top1", "top1_final"}  # 3 classes: no top-5
    row = rows[0]
    assert row.task == "finetune" and row.protocol == "beit-ft-v1" and row.dataset == "tiny" and row.n == 15
    assert row.params["lrs_base"] == [8e-4, 1e-3] and set(row.params["score_by_lr_base"]) == {"0.0008", "0.001"}
    assert row.params["recipe"] == "imagenet" and row.params["total_batch"] == 8 and row.params["epochs"] == 1
    folders = sorted(p.name for p in (tmp_path / "results" / "finetune").iterdir())
    assert folders == ["vit_nano_patch4_32_random_init_seed_0_tiny_imagenet_lr0.0008",
                       "vit_nano_patch4_32_random_init_seed_0_tiny_imagenet_lr0.001"]
    params = parse_params(get_task("finetune"), {"lr": "8e-4,9e-4", "epochs": "none", "resume": "false"})
    assert params.lr == (8e-4, 9e-4) and params.epochs is None and params.resume is False

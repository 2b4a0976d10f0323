"""Linear probe (tasks/linear.py): parallel heads against DINO's single-head loop, schedule, init, recipes,
evaluation and selection, resume, two-process training, and the task end to end through the CLI."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.data import DistributedSampler

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.context import TaskContext
from ssl_bench.data import resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.features import FeatureSpec
from ssl_bench.registry import _TASKS, parse_params
from ssl_bench.results import read_rows
from ssl_bench.tasks.linear import (
    IBOT_LRS, LINEAR_FAST_VERSION, LINEAR_VERSION, LinearParams, SweepResult, augmented_batches, cached_batches,
    cosine_lr, evaluate_heads, heads_loss, init_heads, resolve_recipe, run, train_linear_heads,
)

from conftest import free_port

TINY = "vit_nano_patch4_32"

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_problem(n=150, n_val=60, dim=12, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    y, y_val = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n_val,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g)
    x_val = centres[y_val] + torch.randn(n_val, dim, generator=g)
    return x, y, x_val, y_val


def dino_single_head(x, y, batches, lr, epochs, init_weight, momentum=0.9, weight_decay=0.0):
    """DINO's eval_linear loop for one head: nn.Linear, SGD(momentum), CosineAnnealingLR stepped per epoch."""
    head = torch.nn.Linear(x.shape[1], init_weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(init_weight)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    for epoch in range(epochs):
        for xb, yb in batches(epoch):
            loss = F.cross_entropy(head(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return head.weight.detach(), head.bias.detach()


# --- parallel heads = each head alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_parallel_heads_match_each_head_trained_alone(weight_decay):
    x, y, x_val, y_val = toy_problem()
    lrs = [0.002, 0.03, 0.3, 2.0]
    epochs = 4

    def batches(epoch):  # 150 rows in batches of 32: a ragged last batch every epoch
        return cached_batches(x, y, 32, seed=3, epoch=epoch)

    sweep = train_linear_heads(batches, x_val, y_val, 6, lrs, epochs=epochs, weight_decay=weight_decay, seed=1)
    init_weight = init_heads(1, 12, 6, seed=1)[0][0]
    for h, lr in enumerate(lrs):
        ref_w, ref_b = dino_single_head(x, y, batches, lr, epochs, init_weight, weight_decay=weight_decay)
        torch.testing.assert_close(sweep.weight[h], ref_w)
        torch.testing.assert_close(sweep.bias[h], ref_b)
        alone = train_linear_heads(batches, x_val, y_val, 6, [lr], epochs=epochs, weight_decay=weight_decay, seed=1)
        torch.testing.assert_close(sweep.weight[h], alone.weight[0])
        torch.testing.assert_close(sweep.top1[:, h], alone.top1[:, 0])
    # the heads really went different ways, so the comparison means something
    assert (sweep.weight[3] - sweep.weight[0]).abs().max() > 0.5
    assert sweep.val_epochs == [1, 2, 3, 4] and sweep.top1.shape == (4, 4) and sweep.diverged() == []


def test_loss_gradient_of_each_head_is_its_own_cross_entropy_gradient():
    x, y, _, _ = toy_problem(n=40)
    weight = torch.randn(3, 6, 12).requires_grad_(True)
    bias = torch.randn(3, 6).requires_grad_(True)
    heads_loss(weight, bias, x, y).backward()
    for h in range(3):
        w, b = weight[h].detach().clone().requires_grad_(True), bias[h].detach().clone().requires_grad_(True)
        F.cross_entropy(x @ w.T + b, y).backward()
        torch.testing.assert_close(weight.grad[h], w.grad)
        torch.testing.assert_close(bias.grad[h], b.grad)


# --- schedule, grid, init, recipes --------------------------------------------------------------------------------
def test_cosine_lr_per_epoch_matches_cosine_annealing_lr():
    epochs, base = 7, 0.4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], base, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    expected = []
    for _ in range(epochs):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [cosine_lr(base, e, epochs) for e in range(epochs)] == pytest.approx(expected, rel=1e-12)
    # by hand, 4 epochs: 1, (1 + cos(pi/4)) / 2, 1/2, (1 - cos(pi/4)) / 2; the last epoch is not at 0
    assert [cosine_lr(1.0, e, 4) for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])


def test_ibot_lr_grid():
    assert len(IBOT_LRS) == 45 and list(IBOT_LRS) == sorted(IBOT_LRS)
    assert IBOT_LRS[:3] == (1e-4, 2e-4, 3e-4) and IBOT_LRS[-1] == 9.0 and 0.003 in IBOT_LRS and 1.0 in IBOT_LRS


def test_init_statistics():
    weight, bias = init_heads(3, 256, 100, seed=0)
    assert weight.shape == (3, 100, 256) and bias.shape == (3, 100)
    assert float(weight[0].std()) == pytest.approx(0.01, rel=0.02)
    assert abs(float(weight[0].mean())) < 3e-4
    assert torch.equal(bias, torch.zeros(3, 100))
    assert torch.equal(weight[0], weight[2])  # every lr starts from the same draw
    assert torch.equal(weight, init_heads(3, 256, 100, seed=0)[0])
    assert not torch.equal(weight, init_heads(3, 256, 100, seed=1)[0])


@pytest.mark.parametrize(
    "is_vit, dim, recipe, expected",
    [
        (True, 384, "auto", ("D", "last4")),  # ViT-S
        (True, 384, "D", ("D", "last4")),
        (True, 192, "d", ("D", "last4")),  # ViT-Ti follows the ViT-S recipe
        (True, 768, "auto", ("D", "cls+avgpool")),  # ViT-B
        (True, 1024, "D", ("D", "cls+avgpool")),  # ViT-L
        (True, 768, "C", ("C", "cls")),
        (True, 384, "C", ("C", "cls")),
        (False, 2048, "auto", ("D", "cls")),  # ResNet: the pooled output for both columns
        (False, 2048, "C", ("C", "cls")),
    ],
)
def test_recipe_per_arch(is_vit, dim, recipe, expected):
    assert resolve_recipe(SimpleNamespace(is_vit=is_vit, embed_dim=dim), recipe) == expected


def test_recipe_on_real_backbones_and_bad_names():
    assert resolve_recipe(create_backbone(TINY)) == ("D", "last4")
    with pytest.raises(UserError, match="linear recipe 'E'"):
        resolve_recipe(create_backbone(TINY), "E")


# --- evaluation and selection -------------------------------------------------------------------------------------
def test_evaluate_heads_by_hand():
    # Head 0 scores the classes by x, head 1 by -x, head 2 has diverged. Both rows rank the classes 0 > 1 > ... > 5
    # under head 0 and the other way round under head 1. Row 0 is class 0: head 0 top-1; head 1 ranks it last
    # (out of its top 5 of 6). Row 1 is class 4: rank 5 under head 0 (top-5 only), rank 2 under head 1 (top-5).
    x = torch.tensor([[5.0, 4, 3, 2, 1, 0], [5.0, 4, 3, 2, 1, 0]])
    y = torch.tensor([0, 4])
    eye = torch.eye(6)
    weight = torch.stack([eye, -eye, torch.full((6, 6), math.nan)])
    top1, top5, class_hits = evaluate_heads(weight, torch.zeros(3, 6), x, y)
    assert top1[:2].tolist() == [50.0, 0.0] and top5[:2].tolist() == [100.0, 50.0]
    assert class_hits[:2].tolist() == [[1, 0, 0, 0, 0, 0], [0] * 6]  # head 0 gets the class-0 row right
    assert math.isnan(top1[2]) and math.isnan(top5[2])


def test_selection_takes_the_first_best_and_skips_diverged_heads():
    def result(top1):
        top1 = torch.tensor(top1, dtype=torch.float64)
        return SweepResult(lrs=[0.1] * top1.shape[1], weight=torch.zeros(top1.shape[1], 2, 2),
                           bias=torch.zeros(top1.shape[1], 2), val_epochs=list(range(1, 1 + top1.shape[0])),
                           top1=top1, top5=top1)

    assert result([[50, 70, math.nan], [70, 60, math.nan]]).best() == (0, 1)  # the earlier epoch wins a tie
    assert result([[70, 70], [10, 20]]).best() == (0, 0)  # then the smaller lr
    with pytest.raises(UserError, match="every head diverged"):
        result([[math.nan, math.nan]]).best()


def test_bad_settings_are_user_errors():
    x, y, x_val, y_val = toy_problem(n=20, n_val=5)

    def batches(epoch):
        return cached_batches(x, y, 8, 0, epoch)

    for kwargs, message in ((dict(lrs=[]), "lrs must be"), (dict(lrs=[0.1, -1.0]), "lrs must be"),
                            (dict(lrs=[0.1], epochs=0), "epochs and val_every"),
                            (dict(lrs=[0.1], momentum=1.0), "momentum")):
        with pytest.raises(UserError, match=message):
            train_linear_heads(batches, x_val, y_val, 6, **kwargs)


def test_augmented_batches_are_seeded_per_epoch_and_leave_the_global_rng_alone():
    ctx = TaskContext(backbone=create_backbone(TINY), dataset=resolve_dataset("builtin:digits"),
                      device=torch.device("cpu"), workers=0)
    spec = FeatureSpec("cls")

    def first_batch(epoch, seed=0):
        batches = augmented_batches(ctx, spec, 16, seed, epoch, "fp32")
        x, y = next(batches)
        batches.close()
        return x, y

    torch.manual_seed(123)
    x0, y0 = first_batch(0)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the epoch's augmentation drew from a forked RNG
    x0_again, y0_again = first_batch(0)
    assert torch.equal(x0, x0_again) and torch.equal(y0, y0_again)
    assert x0.shape == (16, 96) and not x0.is_inference() and x0.dtype == torch.float32
    assert not torch.equal(first_batch(1)[0], x0)  # another epoch: another order and other crops
    assert not torch.equal(first_batch(0, seed=1)[0], x0)


# --- resume -------------------------------------------------------------------------------------------------------
def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    x, y, x_val, y_val = toy_problem(seed=4)
    lrs, epochs = [0.01, 0.1, 1.0], 5

    def batches(epoch):
        return cached_batches(x, y, 32, 0, epoch)

    def killed_at_3(epoch):
        if epoch == 3:
            raise RuntimeError("killed")
        return batches(epoch)

    whole = train_linear_heads(batches, x_val, y_val, 6, lrs, epochs=epochs, val_every=2)
    state = tmp_path / "state.pt"
    with pytest.raises(RuntimeError, match="killed"):
        train_linear_heads(killed_at_3, x_val, y_val, 6, lrs, epochs=epochs, val_every=2, state_path=state,
                           state_key="k")
    assert torch.load(state, weights_only=True)["epoch"] == 3
    resumed = train_linear_heads(batches, x_val, y_val, 6, lrs, epochs=epochs, val_every=2, state_path=state,
                                 state_key="k")
    assert resumed.resumed_from_epoch == 3 and resumed.val_epochs == whole.val_epochs == [1, 3, 5]
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    assert torch.equal(resumed.top1, whole.top1) and torch.equal(resumed.top5, whole.top5)
    assert torch.equal(resumed.best_class_hits, whole.best_class_hits)
    v, head = whole.best()  # the per-class hits are those of the selected (epoch, lr)
    assert 100.0 * int(whole.best_class_hits.sum()) / len(y_val) == pytest.approx(float(whole.top1[v, head]))
    other = train_linear_heads(batches, x_val, y_val, 6, lrs, epochs=epochs, val_every=2, state_path=state,
                               state_key="other settings")
    assert other.resumed_from_epoch == 0 and torch.equal(other.weight, whole.weight)


# --- two processes (gloo): ranks share each step's gradient ------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, x_val, y_val = toy_problem()
        result = train_linear_heads(lambda e: cached_batches(x, y, 32, 5, e), x_val, y_val, 6, [0.01, 0.5],
                                    epochs=3)
        torch.save({"weight": result.weight, "top1": result.top1}, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_the_joined_batches(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "heads")), nprocs=2)
    x, y, x_val, y_val = toy_problem()

    def joined(epoch):  # step t of one process = step t of rank 0 and rank 1 together (equal shard sizes)
        shards = []
        for rank in (0, 1):
            sampler = DistributedSampler(range(len(y)), num_replicas=2, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            shards.append([order[i:i + 32] for i in range(0, len(order), 32)])
        for a, b in zip(*shards):
            index = torch.cat([a, b])
            yield x[index], y[index]

    single = train_linear_heads(joined, x_val, y_val, 6, [0.01, 0.5], epochs=3)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"heads-{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["weight"], single.weight)
        assert torch.equal(got["top1"], single.top1)


# --- the registered task, end to end through the CLI --------------------------------------------------------------
def test_task_is_registered_and_its_options_parse():
    task = _TASKS["linear"]
    assert task.version == LINEAR_VERSION and task.params is LinearParams and task.run is run
    params = parse_params(task, {"recipe": "C", "epochs": "3", "lrs": "0.001,0.01", "fast": "true"})
    assert params == LinearParams(recipe="C", epochs=3, lrs=(0.001, 0.01), fast=True)
    assert LinearParams().lrs == IBOT_LRS and LinearParams().batch_size == 128 and LinearParams().epochs == 100


def test_cli_fast_and_full_protocol_rows_land_in_the_csv(tmp_path):
    results, cache = tmp_path / "runs.csv", tmp_path / "cache"
    common = ["-q", "run", "--task", "linear", "--model", TINY, "--data", "builtin:digits", "--workers", "0",
              "--cache-dir", str(cache), "--results", str(results), "-p", "batch_size=32"]
    out = CliRunner().invoke(cli, [*common, "-p", "fast=true", "-p", "epochs=5"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli, [*common, "-p", "epochs=3", "-p", "recipe=C", "-p", "lrs=0.1,1,4"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output

    rows = {r.metric: r for r in read_rows(results)}
    groups = {f"{m}_{recipe}" for m in ("mean_per_class", "acc_many", "acc_medium", "acc_few") for recipe in
              ("D_fast", "C")}
    assert set(rows) == {"top1_D_fast", "top5_D_fast", "top1_C", "top5_C"} | groups
    # balanced digits: every class has 100-150 training images, so all 450 val images are many- or medium-shot
    assert rows["acc_few_C"].n == 0 and rows["acc_many_C"].n + rows["acc_medium_C"].n == 450
    rows = {m: r for m, r in rows.items() if m not in groups}
    fast, full = rows["top1_D_fast"], rows["top1_C"]
    assert fast.protocol == LINEAR_FAST_VERSION and rows["top5_D_fast"].protocol == LINEAR_FAST_VERSION
    assert full.protocol == LINEAR_VERSION and rows["top5_C"].protocol == LINEAR_VERSION
    assert all(r.task == "linear" and r.dataset == "digits" and r.split == "val" and r.n == 450 for r in rows.values())
    assert fast.params["fast"] is True and fast.params["feature"] == "last4" and fast.params["recipe"] == "D"
    assert fast.params["train_transform"].startswith("eval_dino@32") and fast.params["epochs"] == 5
    assert full.params["fast"] is False and full.params["feature"] == "cls" and full.params["recipe"] == "C"
    assert full.params["train_transform"] == "train_lin@32" and full.params["val_transform"] == "eval_dino@32"
    for row in (fast, full):
        p = row.params
        assert p["selection"] == "val" and p["total_batch"] == 32 and p["lr_scale"] == 0.125
        assert p["best_lr"] == pytest.approx(p["best_lr_base"] * 0.125) and p["best_lr_base"] in p["lrs_base"]
        assert 1 <= p["best_epoch"] <= p["epochs"]
        assert row.value == pytest.approx(max(v for v in p["top1_by_lr_base"].values() if v is not None), abs=1e-3)
    assert fast.params["heads"] == 45 and full.params["lrs_base"] == [0.1, 1.0, 4.0]
    assert rows["top5_C"].params["best_lr"] == full.params["best_lr"]
    # random-init features: well above chance (10 %) on cached crops (45 % here); above it with heavy crops of 8x8
    # digits too (25 % here; 19.6 to 25.3 % over backbone seeds 0-4)
    assert fast.value > 30 and full.value > 15 and rows["top5_D_fast"].value >= fast.value
    assert not list((cache / "linear-state").glob("*.pt"))  # resume state is dropped once the rows exist

"""The prototypes task: head reading (official DINO and ssl-bench layouts), assignments and void set on heads whose
winners are known, kappa bins, and a CLI run on a fresh tiny_cpu checkpoint."""

from __future__ import annotations

import argparse

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ssl_bench.cli import cli
from ssl_bench.errors import UserError
from ssl_bench.head_weights import assign_prototypes, head_from_checkpoint, read_head
from ssl_bench.pretrain.checkpointing import save_checkpoint
from ssl_bench.pretrain.config import make_config
from ssl_bench.pretrain.network import build_student_teacher
from ssl_bench.prototypes import accuracy_by_bin, cosine_to_negative_mean, kappa_bins, void_prototypes
from ssl_bench.results import read_rows
from ssl_bench.tasks.knn import knn_classify, knn_correct
from ssl_bench.vmf import prototype_logits

from replicas import make_imagefolder

IN_DIM, HIDDEN, BOTTLENECK = 6, 5, 4
G = torch.tensor([2.0, 0.5, 1.0])
V = torch.tensor([[3.0, 0.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, -2.0, 0.0, 0.0]])
# w_k = g_k v_k / ||v_k||: ||v|| = 5, 2, 2
W = torch.tensor([[1.2, 0.0, 1.6, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, -1.0, 0.0, 0.0]])


def _mlp(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {0: (HIDDEN, IN_DIM), 2: (HIDDEN, HIDDEN), 4: (BOTTLENECK, HIDDEN)}
    out = {}
    for i, shape in shapes.items():
        out[f"head.mlp.{i}.weight"] = torch.randn(shape, generator=gen)
        out[f"head.mlp.{i}.bias"] = torch.randn(shape[0], generator=gen)
    return out


def _official(prefix: str = "module.", parametrized: bool = False) -> dict:
    g_key, v_key = (("parametrizations.weight.original0", "parametrizations.weight.original1") if parametrized
                    else ("weight_g", "weight_v"))
    sd = {"backbone.cls_token": torch.zeros(1, 1, IN_DIM), **_mlp(),
          f"head.last_layer.{g_key}": G[:, None].clone(), f"head.last_layer.{v_key}": V.clone(),
          # iBOT's patch head: ignored
          "head.last_layer2.weight_g": torch.ones(7, 1), "head.last_layer2.weight_v": torch.ones(7, BOTTLENECK)}
    sd = {prefix + k: v for k, v in sd.items()}
    return {"teacher": sd, "student": sd, "epoch": 3}


def _manual_y(x: torch.Tensor, mlp: dict[str, torch.Tensor]) -> torch.Tensor:
    h = F.gelu(F.linear(x, mlp["head.mlp.0.weight"], mlp["head.mlp.0.bias"]))
    h = F.gelu(F.linear(h, mlp["head.mlp.2.weight"], mlp["head.mlp.2.bias"]))
    return F.normalize(F.linear(h, mlp["head.mlp.4.weight"], mlp["head.mlp.4.bias"]), dim=-1)


def test_official_and_ssl_bench_heads_hold_the_constructed_prototypes(tmp_path):
    path = tmp_path / "dino_checkpoint.pth"
    torch.save(_official(), path)
    dino = read_head(path)
    assert (dino.format, dino.key, dino.normalization, dino.teacher_temp) == ("dino", "teacher", "none", 0.07)
    assert (dino.in_dim, dino.bottleneck_dim) == (IN_DIM, BOTTLENECK)
    torch.testing.assert_close(dino.head.prototype_weights(), W)
    torch.testing.assert_close(dino.head.prototype_norms(), G)
    torch.save({**_official(), "args": argparse.Namespace(teacher_temp=0.04)}, path)  # DINO keeps its args
    assert read_head(path).teacher_temp == 0.04

    ours = {"ssl_bench": {"format_version": 1, "arch": "vit_nano_patch4_32",
                          "config": {"normalization": "vmf", "bottleneck_dim": BOTTLENECK, "teacher_temp": 0.07}},
            "teacher": {"backbone.cls_token": torch.zeros(1, 1, IN_DIM), **_mlp(),
                        "head.prototype_direction": 3 * V, "head.prototype_norm": G.clone()}}
    torch.save(ours, tmp_path / "checkpoint.pth")
    mine = read_head(tmp_path / "checkpoint.pth")
    assert (mine.format, mine.normalization, mine.teacher_temp) == ("ssl-bench", "vmf", 0.07)
    torch.testing.assert_close(mine.head.prototype_weights(), W)

    x = torch.randn(8, IN_DIM)
    expected_y = _manual_y(x, _mlp())
    with torch.no_grad():
        for loaded in (dino, mine):
            out = loaded.head(x)
            torch.testing.assert_close(out.y, expected_y)
            torch.testing.assert_close(out.dots, expected_y @ W.T)

    # the newer parametrization keys, no prefix; options override what the file records
    other = head_from_checkpoint(_official(prefix="", parametrized=True), "student", "vmf", 0.05)
    assert (other.key, other.normalization, other.teacher_temp) == ("student", "vmf", 0.05)
    torch.testing.assert_close(other.head.prototype_weights(), W)
    assert head_from_checkpoint(ours, normalization="l2").normalization == "l2"


def test_one_layer_head_reads_mlp_without_index():
    checkpoint = {"teacher": {"head.mlp.weight": torch.eye(3), "head.mlp.bias": torch.zeros(3),
                              "head.last_layer.weight_g": torch.ones(2, 1),
                              "head.last_layer.weight_v": torch.eye(3)[:2]}}
    loaded = head_from_checkpoint(checkpoint)
    assert len(loaded.head.mlp) == 1 and loaded.in_dim == 3
    torch.testing.assert_close(loaded.head.prototype_weights(), torch.eye(3)[:2])


@pytest.mark.parametrize("checkpoint, message", [
    ({"cls_token": torch.zeros(1, 1, 4), "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}, "head.* keys"),
    ({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)}, "epoch": 1}, "not teacher_backbone.pth"),
    ({"teacher": {**_mlp(), "head.mlp.1.running_mean": torch.zeros(HIDDEN)}}, "no batch norm"),
    ({"teacher": _mlp()}, "no prototype layer"),
])
def test_checkpoints_without_a_usable_head_are_refused(tmp_path, checkpoint, message):
    path = tmp_path / "teacher_backbone.pth"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="head") as error:
        read_head(path)
    assert message in str(error.value)


def _axis_head(prototypes: torch.Tensor, norms: torch.Tensor, normalization: str) -> object:
    """A one-layer head with an identity MLP: y = x / ||x||, so the winners can be read off the inputs."""
    dim = prototypes.shape[1]
    checkpoint = {"teacher": {"head.mlp.weight": torch.eye(dim), "head.mlp.bias": torch.zeros(dim),
                              "head.last_layer.weight_g": norms[:, None], "head.last_layer.weight_v": prototypes}}
    return head_from_checkpoint(checkpoint, normalization=normalization)


def test_assignments_void_set_and_cosine_to_the_negative_mean():
    # prototypes +e1, +e2, -e1, -e2; the data lies on +e1 (twice) and +e2: the last two are never chosen
    loaded = _axis_head(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), torch.ones(4), "none")
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    assignments, y_sum = assign_prototypes(loaded, x, batch_size=2)
    assert assignments.tolist() == [0, 0, 1]
    torch.testing.assert_close(y_sum, torch.tensor([2.0, 1.0], dtype=torch.float64))
    void = void_prototypes(assignments, 4)
    assert void.tolist() == [False, False, True, True]
    # mean y = (2/3, 1/3); cos(-e1, -mean) = 2/sqrt(5), cos(-e2, -mean) = 1/sqrt(5)
    cos = cosine_to_negative_mean(loaded.head.prototype_weights(), y_sum / 3)
    torch.testing.assert_close(cos, torch.tensor([-2, -1, 2, 1], dtype=torch.float64) / math.sqrt(5))
    assert float(cos[void].mean()) == pytest.approx(3 / (2 * math.sqrt(5)))
    with pytest.raises(UserError, match="2-dim inputs"):
        assign_prototypes(loaded, torch.zeros(2, 3))


def test_vmf_normaliser_changes_which_prototype_wins():
    # A = e1 with norm 1, B at cos 0.9 to e1 with norm 2, y = e1, tau = 0.04.
    # none: 1.8 / tau > 1 / tau, B wins. vmf (p = 3, log C_3(k) ~ log k - k - log 2 pi for large k):
    # B - A = (1.8 - 1) / tau + (log 2 - 2 / tau + 1 / tau) = -0.2 / tau + log 2 = -4.3 < 0, A wins.
    prototypes = torch.tensor([[1.0, 0.0, 0.0], [0.9, math.sqrt(1 - 0.81), 0.0]])
    x = torch.tensor([[5.0, 0.0, 0.0]])
    for normalization, winner in (("none", 1), ("vmf", 0)):
        loaded = _axis_head(prototypes, torch.tensor([1.0, 2.0]), normalization)
        assignments, _ = assign_prototypes(loaded, x)
        assert assignments.tolist() == [winner], normalization
        logits = prototype_logits(torch.tensor([[1.0, 1.8]]), torch.tensor([1.0, 2.0]), 0.04, normalization, 3)
        assert int(logits.argmax()) == winner


def test_kappa_bins_and_accuracy_by_bin():
    kappa = torch.arange(1.0, 11.0)
    used = kappa != 10  # kappa 10 unused: bins are quantiles of 1..9 -> edges 1, 5, 9
    edges, bins = kappa_bins(kappa, used, 2)
    assert edges.tolist() == [1.0, 5.0, 9.0]
    assert bins.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1]
    # val samples on prototypes with kappa 1, 4 (bin 0: 1 of 2 right), 5, 9, 9 (bin 1: 2 of 3 right)
    accuracy, counts = accuracy_by_bin(bins, torch.tensor([0, 3, 4, 8, 8]), torch.tensor([1, 0, 1, 1, 0]).bool(), 2)
    assert counts.tolist() == [2, 3]
    torch.testing.assert_close(accuracy, torch.tensor([50.0, 200 / 3], dtype=torch.float64))
    # tied kappas: every edge but the last is 1, so all go to the last bin and bin 0 has no sample
    edges, bins = kappa_bins(torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.ones(4, dtype=torch.bool), 2)
    assert bins.tolist() == [1, 1, 1, 1]
    accuracy, counts = accuracy_by_bin(bins, torch.tensor([0, 3]), torch.tensor([True, True]), 2)
    assert math.isnan(float(accuracy[0])) and float(accuracy[1]) == 100.0 and counts.tolist() == [0, 2]


def test_knn_correct_agrees_with_the_knn_task():
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(4, 16, generator=gen)
    train_y, val_y = torch.arange(200) % 4, torch.arange(60) % 4
    train_x = centres[train_y] + 4.0 * torch.randn(200, 16, generator=gen)
    val_x = centres[val_y] + 4.0 * torch.randn(60, 16, generator=gen)
    correct = knn_correct(train_x, train_y, val_x, val_y, k=20, backend="torch")
    top1 = knn_classify(train_x, train_y, val_x, val_y, ks=(20,), backend="torch")[20][0]
    assert 100.0 * float(correct.double().mean()) == pytest.approx(top1)
    assert 0 < top1 < 100


def test_prototypes_task_through_the_cli(tmp_path):
    torch.manual_seed(0)
    config = make_config("tiny_cpu")
    student, teacher = build_student_teacher(config)
    with torch.no_grad():  # spread the norms so that the kappa bins are not all one value
        teacher.head.prototype_norm.copy_(torch.linspace(0.5, 2.0, config.out_dim))
    ckpt = tmp_path / "run" / "checkpoint.pth"
    save_checkpoint(ckpt, config, {"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 0})
    root = make_imagefolder(tmp_path / "imnet", classes=(0, 1, 2, 7), train_per_class=10, val_per_class=5)
    results = tmp_path / "results" / "runs.csv"
    common = ["--data", str(root), "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--results", str(results)]
    runner = CliRunner()
    out = runner.invoke(cli, ["-q", "run", "--task", "prototypes", "--ckpt", str(ckpt), "--label", "tiny/run 1",
                              "-p", "bins=4", *common], catch_exceptions=False)
    assert out.exit_code == 0, out.output

    rows = {r.metric: r for r in read_rows(results)}
    thresholds = ("0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99")
    expected = {"n_prototypes", "used_prototypes", "void_prototypes", "void_cos_to_neg_mean",
                "void_cos_to_neg_mean_max", "knn_top1", *(f"unique@{t}" for t in thresholds),
                *(f"largest_duplicate_set@{t}" for t in thresholds), *(f"kappa_p{q}" for q in (0, 10, 50, 90, 100)),
                *(f"knn_acc_kappa_bin{i}" for i in range(4))}
    assert set(rows) == expected
    assert all(r.task == "prototypes" and r.protocol == "dino-vmf-prototypes-v1" for r in rows.values())
    assert rows["n_prototypes"].value == config.out_dim
    assert rows["used_prototypes"].value + rows["void_prototypes"].value == config.out_dim
    assert rows["used_prototypes"].n == 60 and rows["knn_top1"].n == 20
    assert rows["unique@0.99"].value <= config.out_dim and rows["largest_duplicate_set@0.99"].value >= 1
    # kappa = ||w_k|| / tau with norms 0.5 .. 2 and tiny_cpu's teacher temperature 0.04
    assert rows["kappa_p0"].value == pytest.approx(12.5) and rows["kappa_p100"].value == pytest.approx(50.0)
    params = rows["knn_acc_kappa_bin0"].params
    assert (params["normalization"], params["teacher_temp"], params["head_format"]) == ("vmf", 0.04, "ssl-bench")
    assert sum(rows[f"knn_acc_kappa_bin{i}"].n for i in range(4)) == 20
    plots = params["plots"]
    assert Path(plots["unique"]).parent == tmp_path / "results" / "prototypes" / "tiny-run-1"
    for path in plots.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = runner.invoke(cli, ["-q", "run", "--task", "prototypes", "--model", "vit_nano_patch4_32", *common])
    assert out.exit_code != 0 and "give --ckpt checkpoint.pth" in out.output

"""The CLI end to end on the built-in data and on a tiny ImageFolder replica, and its errors."""

from __future__ import annotations

import csv

import pytest
import torch
from click.testing import CliRunner

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.io import sha256_file
from ssl_bench.results import read_rows

from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"


def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def test_list_names_tasks_backbones_and_formats():
    out = invoke("list")
    assert out.exit_code == 0
    for text in ("knn", "vit_small_patch16_224", "resnet50", TINY, "msn", "ssl-bench", "builtin:digits"):
        assert text in out.output


def test_run_knn_on_imagefolder_replica_with_checkpoint(tmp_path):
    root = make_imagefolder(tmp_path / "imnet")
    ckpt = tmp_path / "teacher.pth"
    source = create_backbone(TINY, seed=5)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.model.state_dict().items()}, "epoch": 1}, ckpt)
    results = tmp_path / "results" / "runs.csv"
    out = invoke("run", "--task", "knn", "--model", TINY, "--ckpt", str(ckpt), "--data", str(root),
                 "--data-name", "imagenet", "-p", "ks=5,10", "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--results", str(results), "--method", "dino")
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert {r.metric for r in rows} == {"top1", "top5", "top1_k5", "top5_k5", "top1_k10", "top5_k10", "mean_per_class",
                                        "acc_many", "acc_medium", "acc_few"}
    assert all(r.ckpt_sha256 == sha256_file(ckpt) for r in rows)
    assert all(r.dataset == "imagenet" and r.task == "knn" and r.method == "dino" for r in rows)
    assert all(r.n == 15 for r in rows if not r.metric.startswith("acc_"))
    assert all(r.torch_version == torch.__version__ and r.wall_s is not None and r.protocol for r in rows)
    assert all(r.params["ckpt_format"] == "dino" for r in rows)
    best = next(r for r in rows if r.metric == "top1")
    assert best.value == max(r.value for r in rows if r.metric.startswith("top1_k"))


def test_builtin_digits_two_runs_and_the_leaderboard_pivot(tmp_path):
    results_dir = tmp_path / "results"
    for seed, label in ((0, "net-a"), (1, "net-b")):
        out = invoke("run", "--task", "knn", "--model", TINY, "--data", "builtin:digits", "--workers", "0",
                     "--seed", str(seed), "--label", label, "--cache-dir", str(tmp_path / "cache"),
                     "--results", str(results_dir / "runs.csv"))
        assert out.exit_code == 0, out.output
    rows = {(r.model, r.metric): r.value for r in read_rows(results_dir / "runs.csv")}
    assert rows[("net-a", "top1")] > 30  # random-init features still separate digits far above chance (10 %)
    out = invoke("leaderboard", "--results-dir", str(results_dir), "--metric", "top1")
    assert out.exit_code == 0, out.output
    with open(results_dir / "leaderboard.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["model"] for row in table] == ["net-a", "net-b"]
    assert [float(row["knn/digits/top1"]) for row in table] == pytest.approx(
        [rows[("net-a", "top1")], rows[("net-b", "top1")]], abs=0.005)
    assert "net-a" in out.output and "knn/digits/top1" in out.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--task", "knnn", "--model", TINY, "--data", "builtin:digits"], "unknown task 'knnn'; valid: "),
        (["run", "--task", "knn", "--model", "vit_smal_patch16_224", "--data", "builtin:digits"],
         "unknown model 'vit_smal_patch16_224'"),
        (["run", "--task", "knn", "--model", TINY, "--data", "builtin:cifar"], "unknown dataset 'builtin:cifar'; valid: builtin:digits"),
        (["run", "--task", "knn", "--model", TINY, "--data", "builtin:digits", "-p", "kk=3"], "no task among knn has an option 'kk'"),
        (["run", "--task", "knn", "--model", TINY, "--data", "builtin:digits", "-p", "ks=ten"], "knn.ks='ten'"),
        (["run", "--task", "knn", "--model", "resnet18", "--ckpt", "MISSING.pth", "--data", "builtin:digits"], "MISSING.pth does not exist"),
        (["leaderboard", "--results-dir", "NO_SUCH_DIR"], "does not exist"),
        (["run", "--task", "knn", "--model", TINY], "task(s) knn need --data"),
    ],
)
def test_bad_inputs_give_one_line_errors(args, message, tmp_path):
    out = CliRunner().invoke(cli, args)
    assert out.exit_code != 0
    assert message in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_wrong_checkpoint_is_refused_and_nothing_written(tmp_path):
    ckpt = tmp_path / "resnet.pth"
    torch.save(create_backbone("resnet18").model.state_dict(), ckpt)
    results = tmp_path / "runs.csv"
    out = CliRunner().invoke(cli, ["run", "--task", "knn", "--model", TINY, "--ckpt", str(ckpt), "--data",
                                   "builtin:digits", "--results", str(results)])
    assert out.exit_code != 0 and "backbone tensors unloaded" in out.output
    assert not results.exists()


def test_progress_bars_follow_the_log_level():
    import logging

    from ssl_bench.runtime import hide_progress

    logger = logging.getLogger("ssl_bench")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)  # the CLI's default
        assert not hide_progress()
        logger.setLevel(logging.WARNING)  # ssl-bench -q
        assert hide_progress()
    finally:
        logger.setLevel(before)

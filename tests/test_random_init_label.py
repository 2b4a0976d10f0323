"""Random-init backbones of different --seed are different models: the seed is in their label and in their rows,
so the leaderboard keeps one row per initialisation instead of merging them."""

from __future__ import annotations

import csv

import torch
from click.testing import CliRunner

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli
from ssl_bench.results import read_rows

from replicas import make_imagefolder

TINY = "vit_nano_patch4_32"


def test_random_init_label_names_the_seed_and_a_checkpoint_has_none(tmp_path):
    assert create_backbone(TINY, seed=3).label == f"{TINY} (random init, seed 3)"
    assert create_backbone(TINY).label == f"{TINY} (random init, seed 0)"
    source = create_backbone(TINY, seed=3)
    assert source.init_seed == 3
    ckpt = tmp_path / "teacher.pth"
    torch.save({"teacher": source.model.state_dict()}, ckpt)
    loaded = create_backbone(TINY, ckpt, seed=3)
    assert loaded.init_seed is None and "seed" not in loaded.label and loaded.label.startswith("teacher.pth [")


def test_two_seeds_give_two_labels_rows_and_leaderboard_rows(tmp_path):
    root = make_imagefolder(tmp_path / "imnet")
    results_dir = tmp_path / "results"
    for seed in (1, 2):
        out = CliRunner().invoke(cli, [
            "-q", "run", "--task", "knn", "--model", TINY, "--data", str(root), "--workers", "0", "-p", "ks=5",
            "--seed", str(seed), "--cache-dir", str(tmp_path / "cache"), "--results", str(results_dir / "runs.csv"),
        ], catch_exceptions=False)
        assert out.exit_code == 0, out.output
    rows = read_rows(results_dir / "runs.csv")
    assert {r.model for r in rows} == {f"{TINY} (random init, seed 1)", f"{TINY} (random init, seed 2)"}
    assert all(r.params["init_seed"] == (1 if r.model.endswith("seed 1)") else 2) for r in rows)
    top1 = {r.model: r.value for r in rows if r.metric == "top1"}
    out = CliRunner().invoke(cli, ["-q", "leaderboard", "--results-dir", str(results_dir), "--metric", "top1"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    with open(results_dir / "leaderboard.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["model"], float(row["knn/imnet/top1"])) for row in table] == [
        (model, round(value, 2)) for model, value in sorted(top1.items())]

"""`ssl-bench demo` end to end (1 epoch): per-epoch kNN in the log, three models scored with kNN and the linear
probe, the verdict line, the training-curve PNG and the leaderboard."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ssl_bench.cli import cli
from ssl_bench.results import read_rows


def test_demo_scores_pretrained_random_init_and_pixels(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    out = CliRunner().invoke(cli, ["-q", "demo", "--epochs", "1", "--results-dir", str(results), "--runs-dir",
                                   str(runs), "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in (runs / "demo-tiny_cpu-1ep" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0]
    assert all(0 <= r["knn_top1"] <= 100 and -1 <= r["cls_cosine"] <= 1 for r in records)
    rows = read_rows(results / "runs.csv")
    models = {r.model for r in rows}
    assert {"vit_nano_patch4_32 (random init, seed 0)", "pixels (32x32)"} <= models and len(models) == 3
    assert {(r.task, r.metric) for r in rows} >= {("knn", "top1"), ("linear", "top1_D_fast")}
    verdict = [line for line in out.output.splitlines() if line.startswith("verdict: dino-vmf pretraining ")]
    assert len(verdict) == 1 and "raw pixels" in verdict[0]
    assert "collapse monitor: quiet" in out.output or "collapse warning at epoch(s)" in out.output
    assert (results / "demo_training.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "leaderboard.csv").is_file()

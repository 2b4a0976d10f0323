"""The demo's verdict and training-curve plot, on rows and log records made by hand."""

from __future__ import annotations

import json

import pytest

from ssl_bench.demo import demo_verdict, headline, read_log, save_demo_curves
from ssl_bench.results import ResultRow

PRETRAINED = "vit_nano dino-vmf tiny_cpu 12ep (demo)"
RANDOM = "vit_nano (random init, seed 0)"
PIXELS = "pixels (32x32)"


def _rows(scores: dict[str, tuple[float, float]]) -> list[ResultRow]:
    rows = []
    for model, (knn, linear) in scores.items():
        rows += [ResultRow(model, "a", "knn", "shapes", "val", "top1_k20", knn - 5),
                 ResultRow(model, "a", "knn", "shapes", "val", "top1", knn),
                 ResultRow(model, "a", "linear", "shapes", "val", "top1_D_fast", linear),
                 ResultRow(model, "a", "linear", "shapes", "val", "top5_D_fast", 99.0)]
    return rows


def test_headline_takes_best_k_knn_and_the_linear_top1():
    rows = _rows({PRETRAINED: (60.0, 70.0)})
    assert headline(rows, PRETRAINED, "knn") == 60.0
    assert headline(rows, PRETRAINED, "linear") == 70.0
    with pytest.raises(ValueError, match="no top-1 row"):
        headline(rows, RANDOM, "knn")


def test_verdict_needs_the_margin_over_both_baselines_on_both_probes():
    records = [{"epoch": 0, "collapse": None}, {"epoch": 1, "collapse": None}]
    learned = demo_verdict(_rows({PRETRAINED: (60.0, 70.0), RANDOM: (20.0, 30.0), PIXELS: (15.0, 59.9)}),
                           records, PRETRAINED, "dino-vmf")
    assert learned[0] == ("verdict: dino-vmf pretraining LEARNED: kNN top-1 60.0 (random init 20.0, raw pixels 15.0); "
                          "linear top-1 70.0 (random init 30.0, raw pixels 59.9)")
    assert learned[1] == "collapse monitor: quiet at all 2 epochs"
    # linear only 9.9 points above raw pixels: not learned
    short = demo_verdict(_rows({PRETRAINED: (60.0, 70.0), RANDOM: (20.0, 30.0), PIXELS: (15.0, 60.1)}),
                         records, PRETRAINED, "dino-vmf")
    assert "DID NOT LEARN" in short[0]


def test_verdict_repeats_the_collapse_warning():
    records = [{"epoch": 0, "collapse": None}, {"epoch": 1, "collapse": "uniform output"},
               {"epoch": 2, "collapse": "one prototype"}]
    lines = demo_verdict(_rows({PRETRAINED: (11.0, 12.0), RANDOM: (10.0, 11.0), PIXELS: (12.0, 12.0)}),
                         records, PRETRAINED, "dino")
    assert "DID NOT LEARN" in lines[0]
    assert lines[1] == "collapse warning at epoch(s) 1, 2: one prototype"


def test_curves_png_from_a_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "loss": 5.0 - e, "teacher_entropy": 4.0, "knn_top1": 10.0 * e}) + "\n"
                           for e in (1, 0, 2)))
    records = read_log(log)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    png = save_demo_curves(tmp_path / "curves.png", records)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

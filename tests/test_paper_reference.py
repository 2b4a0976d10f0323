"""Checks on results/paper_reference.csv, the DINO-vMF paper's published numbers (shared/protocols.md §11, §8.1)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ssl_bench.results import COLUMNS, read_rows

REFERENCE = Path(__file__).parents[1] / "results" / "paper_reference.csv"
TRANSFER_DATASETS = ["aircraft", "caltech101", "cifar10", "cifar100", "dtd", "flowers", "food", "pets", "sun397"]


@pytest.fixture(scope="module")
def rows():
    return read_rows(REFERENCE)


def _value(rows, model, task, dataset, metric):
    hits = [r.value for r in rows if (r.model, r.task, r.dataset, r.metric) == (model, task, dataset, metric)]
    assert len(hits) == 1, f"expected one row for {(model, task, dataset, metric)}, got {len(hits)}"
    return hits[0]


def test_header_is_result_row_columns():
    with open(REFERENCE, newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == COLUMNS


@pytest.mark.parametrize(
    ("model", "task", "dataset", "metric", "expected"),
    [
        ("DINO-vMF ViT-B/16 [paper]", "knn", "imagenet", "top1", 77.40),
        ("iBOT-vMF ViT-B/16 [paper]", "davis", "davis2017", "JF_mean", 63.1),
        ("DINO ViT-S/16 [paper]", "fewshot", "imagenet", "top1_1shot", 38.9),
        ("MSN ViT-B/16 [paper]", "linear", "imagenet", "top1_D", 74.80),
        ("iBOT ViT-B/16 [paper]", "linear", "imagenet", "top1_C", 79.33),
        ("DINO-vMF ViT-S/16 [paper]", "retrieval", "rparis6k", "mAP_hard", 33.4),
        ("DINO ViT-B/16 [paper]", "retrieval", "roxford5k", "mAP_medium", 34.3),
        ("DINO-vMF ViT-B/16 [paper]", "fewshot", "imagenet", "top1_1pct", 70.4),
        ("iBOT-vMF ViT-B/16 [paper]", "transfer", "average", "score", 84.1),
        ("iBOT-vMF ViT-B/16 [paper]", "finetune", "imagenet", "top1", 84.1),
    ],
)
def test_values_match_protocols(rows, model, task, dataset, metric, expected):
    assert _value(rows, model, task, dataset, metric) == pytest.approx(expected, abs=1e-9)


def test_no_duplicate_cells(rows):
    keys = [(r.model, r.task, r.dataset, r.metric) for r in rows]
    assert len(keys) == len(set(keys))


def test_every_row_is_a_sourced_paper_row(rows):
    assert rows
    for r in rows:
        assert r.protocol == "paper"
        assert r.model.endswith("[paper]")
        assert isinstance(r.params.get("source"), str) and r.params["source"].strip()
        assert r.timestamp and r.arch and r.method


def test_dino_vits_transfer_average(rows):
    model = "DINO ViT-S/16 [paper]"
    per_dataset = [_value(rows, model, "transfer", ds, "score") for ds in TRANSFER_DATASETS]
    published = _value(rows, model, "transfer", "average", "score")
    assert published == pytest.approx(81.8)
    assert sum(per_dataset) / len(per_dataset) == pytest.approx(published, abs=0.1)


@pytest.mark.parametrize(
    ("model", "dataset", "unique", "total"),
    [
        ("DINO ViT-S/16 [paper]", "imagenet", 1078, 65536),
        ("iBOT-vMF ViT-B/16 [paper]", "imagenet", 1170, 8192),
        ("iBOT ViT-L/16 IN-22K [paper]", "imagenet22k", 969, 8192),
        ("EsViT Swin-T/7 [paper]", "imagenet", 1157, 65536),
        ("DINO ResNet-50 [paper]", "imagenet", 984, 60000),
    ],
)
def test_prototype_utilisation_counts(rows, model, dataset, unique, total):
    assert _value(rows, model, "prototypes", dataset, "unique_prototypes") == unique
    assert _value(rows, model, "prototypes", dataset, "n_prototypes") == total
    source = next(r for r in rows if r.model == model and r.metric == "unique_prototypes").params["source"]
    assert "Partial Prototype Collapse" in source

"""Checks on results/paper_reference.csv: the DINO-vMF paper's published numbers (shared/protocols.md §11, §8.1) and the
KoLeo-Proto (partial prototype collapse) paper's prototype counts and ImageNet-1K table (§11.1)."""

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


# The KoLeo-Proto paper's ImageNet-1K table (shared/protocols.md §11.1): kNN, linear, fine-tuning top-1 and its own
# "Avg. Transfer"; None = "-" in the table (no row).
KOLEO_TABLE = [
    ("DINO-vMF ViT-B/16", "vit_base_patch16_224", "dino-vmf", 77.4, 78.8, 83.6, 86.8),
    ("MSN ViT-B/16", "vit_base_patch16_224", "msn", 73.3, 74.8, None, 85.3),
    ("WE-SSL ViT-B/16", "vit_base_patch16_224", "we-ssl", 77.2, 78.9, None, None),
    ("iBOT-vMF ViT-B/16", "vit_base_patch16_224", "ibot-vmf", 78.7, 80.3, 84.1, 87.3),
    ("iBOT-vMF + KoLeo-Proto ViT-B/16", "vit_base_patch16_224", "ibot-vmf-koleo", 78.8, 80.5, 84.1, 86.6),
    ("DINO-vMF ViT-S/16", "vit_small_patch16_224", "dino-vmf", 74.7, 77.0, 81.8, 85.4),
    ("MSN ViT-S/16", "vit_small_patch16_224", "msn", 74.9, 76.6, None, 84.1),
    ("WE-SSL ViT-S/16", "vit_small_patch16_224", "we-ssl", 75.2, 77.4, None, 84.6),
    ("iBOT-vMF ViT-S/16", "vit_small_patch16_224", "ibot-vmf", 75.3, 77.9, 82.3, 85.5),
    ("iBOT-vMF + KoLeo-Proto ViT-S/16", "vit_small_patch16_224", "ibot-vmf-koleo", 75.5, 77.9, 82.3, 85.6),
]
KOLEO_TAG = " (BMVC 2024) [paper]"
KOLEO_CELLS = (("knn", "imagenet", "top1"), ("linear", "imagenet", "top1"), ("finetune", "imagenet", "top1"),
               ("transfer", "average", "avg_transfer_koleo_paper"))


@pytest.mark.parametrize(("name", "arch", "method", "knn", "linear", "finetune", "transfer"), KOLEO_TABLE)
def test_koleo_paper_imagenet_table(rows, name, arch, method, knn, linear, finetune, transfer):
    model = name + KOLEO_TAG
    mine = [r for r in rows if r.model == model]
    expected = dict(zip(KOLEO_CELLS, (knn, linear, finetune, transfer)))
    assert {(r.task, r.dataset, r.metric) for r in mine} == {cell for cell, value in expected.items() if value is not None}
    for (task, dataset, metric), value in expected.items():
        if value is not None:
            assert _value(rows, model, task, dataset, metric) == pytest.approx(value, abs=1e-9)
    for r in mine:
        assert (r.arch, r.method, r.protocol) == (arch, method, "paper")
        assert "Partial Prototype Collapse" in r.params["source"] and "ImageNet-1K" in r.params["source"]
        assert r.params["via"] == "shared/protocols.md section 11.1"


def test_koleo_paper_rows_are_exactly_the_table(rows):
    tagged = [r for r in rows if r.model.endswith(KOLEO_TAG)]
    assert len(tagged) == sum(v is not None for entry in KOLEO_TABLE for v in entry[3:]) == 35


def test_the_two_papers_transfer_averages_stay_separate_metrics(rows):
    # DINO-vMF ViT-B/16: 83.5 over the nine datasets (DINO-vMF paper), 86.8 over the KoLeo-Proto paper's own set
    assert _value(rows, "DINO-vMF ViT-B/16 [paper]", "transfer", "average", "score") == pytest.approx(83.5)
    assert _value(rows, "DINO-vMF ViT-B/16" + KOLEO_TAG, "transfer", "average", "avg_transfer_koleo_paper") == 86.8
    assert not [r for r in rows if r.metric == "score" and r.model.endswith(KOLEO_TAG)]
    assert not [r for r in rows if r.metric == "avg_transfer_koleo_paper" and not r.model.endswith(KOLEO_TAG)]

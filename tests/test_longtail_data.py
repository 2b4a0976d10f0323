"""Long-tail data: the builtin:digits-lt profile and the iNaturalist-2018 layout (a tiny on-disk replica)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssl_bench.data import long_tail_counts, resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.longtail import class_hits, group_accuracies, shot_groups


def test_long_tail_profile_by_hand():
    # n_max = 100 (smallest available), imbalance 100 over 3 classes: 100, 100 / 10, 100 / 100
    assert long_tail_counts(np.array([120, 100, 130]), 100.0).tolist() == [100, 10, 1]
    assert long_tail_counts(np.array([50, 50, 50, 50, 50]), 16.0).tolist() == [50, 25, 12, 6, 3]


def test_digits_lt_follows_the_profile_exactly_for_a_seed():
    full, lt = resolve_dataset("builtin:digits"), resolve_dataset("builtin:digits-lt")
    available = np.bincount(full.split("train").labels)
    expected = np.floor(available.min() * 100.0 ** -(np.arange(10) / 9) + 1e-9).astype(int)
    assert np.bincount(lt.split("train").labels).tolist() == expected.tolist()
    assert expected[0] == available.min() and expected[-1] == available.min() // 100
    assert len(lt.split("val")) == len(full.split("val")) == 450  # val stays balanced
    again = resolve_dataset("builtin:digits-lt").split("train")
    assert np.array_equal(again.images, lt.split("train").images)  # seeded
    assert lt.split("train").manifest_sha256() != full.split("train").manifest_sha256()


def _inat_replica(root, counts=((3, 2), (1, 1), (2, 1)), category_ids=(7, 3, 11)):
    """ROOT/train_val2018/<supercat>/<id>/<n>.jpg and the two COCO-style json files."""
    for split, column in (("train", 0), ("val", 1)):
        images, annotations, next_id = [], [], 1000 if split == "val" else 0
        for category, per_class in zip(category_ids, counts):
            for _ in range(per_class[column]):
                file_name = f"train_val2018/Plantae/{category}/{next_id}.jpg"
                (root / file_name).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (category * 20, 0, 0)).save(root / file_name)
                images.append({"id": next_id, "file_name": file_name, "width": 12, "height": 10})
                annotations.append({"id": next_id, "image_id": next_id, "category_id": category})
                next_id += 1
        categories = [{"id": c, "name": f"species {c}"} for c in category_ids]
        (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                            "categories": categories}))
    return root


def test_inat2018_replica_parses_to_the_right_classes_and_counts(tmp_path):
    dataset = resolve_dataset(f"inat2018:{_inat_replica(tmp_path)}")
    train, val = dataset.split("train"), dataset.split("val")
    assert train.classes == ["3", "7", "11"]  # category ids in order
    # category 7 -> 3 train / 2 val, 3 -> 1 / 1, 11 -> 2 / 1
    assert np.bincount(train.labels).tolist() == [1, 3, 2] and np.bincount(val.labels).tolist() == [1, 2, 1]
    assert train.load_image(0).size == (12, 10) and dataset.num_classes == 3


def test_inat2018_errors_name_what_is_wrong(tmp_path):
    root = _inat_replica(tmp_path)
    (root / "val2018.json").unlink()
    with pytest.raises(UserError, match="val2018.json is missing"):
        resolve_dataset(f"inat2018:{root}")
    _inat_replica(root)
    content = json.loads((root / "train2018.json").read_text())
    content["annotations"].append({"id": 99, "image_id": 99, "category_id": 7})
    (root / "train2018.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match="annotation points at image id 99"):
        resolve_dataset(f"inat2018:{root}")
    _inat_replica(root)
    (root / "train_val2018/Plantae/11/4.jpg").unlink()
    with pytest.raises(UserError, match=r"train_val2018/Plantae/11/4.jpg is missing"):
        resolve_dataset(f"inat2018:{root}")
    (root / "train2018.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_dataset(f"inat2018:{root}")


def test_group_accuracies_by_hand():
    # classes with 150 / 50 / 5 training images: many, medium, few
    correct = np.array([True, True, False, True, False, True])
    labels = np.array([0, 0, 0, 1, 2, 2])
    hits, counts = class_hits(correct, labels, 3)
    assert hits.tolist() == [2, 1, 1] and counts.tolist() == [3, 1, 2]
    groups = group_accuracies(hits, counts, np.array([150, 50, 5]))
    assert groups["top1"] == pytest.approx((400 / 6, 6))
    assert groups["many"] == pytest.approx((200 / 3, 3)) and groups["medium"] == (100.0, 1)
    assert groups["few"] == (50.0, 2)
    assert groups["mean_per_class"][0] == pytest.approx((200 / 3 + 100 + 50) / 3)
    moved = group_accuracies(hits, counts, np.array([150, 50, 5]), many=40, few=10)  # thresholds are options
    assert moved["many"] == pytest.approx((300 / 4, 4)) and np.isnan(moved["medium"][0])
    assert shot_groups(np.array([101, 100, 20, 19])).tolist() == ["many", "medium", "medium", "few"]


def test_knn_and_linear_on_digits_lt_report_the_shot_groups(tmp_path):
    from click.testing import CliRunner

    from ssl_bench.cli import cli
    from ssl_bench.results import read_rows

    results = tmp_path / "lt.csv"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "knn,linear", "--model", "vit_nano_patch4_32", "--data",
                                   "builtin:digits-lt", "--workers", "0", "--results", str(results), "-p",
                                   "linear.fast=true", "-p", "linear.epochs=3", "-p", "linear.lrs=0.1,1",
                                   "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    for task, suffix in (("knn", ""), ("linear", "_D_fast")):
        rows = {r.metric: r for r in read_rows(results) if r.task == task}
        top1 = rows[f"top1{suffix}"]
        many, medium, few = (rows[f"acc_{g}{suffix}"] for g in ("many", "medium", "few"))
        # digits-lt: class 0 keeps > 100 training images, classes 1-3 have 20-100, classes 4-9 fewer than 20
        assert (many.n, medium.n, few.n) == (45, 136, 269)
        assert few.params["few_shot"] == "< 20" and many.params["many_shot"] == "> 100"
        weighted = (many.value * many.n + medium.value * medium.n + few.value * few.n) / 450
        assert weighted == pytest.approx(top1.value, abs=1e-6)
        assert 0 <= rows[f"mean_per_class{suffix}"].value <= 100
    knn = {r.metric: r for r in read_rows(results) if r.task == "knn"}
    assert knn["acc_many"].params["k"] == knn["top1"].params["best_k"]


def test_inat2018_replica_pretrains_and_scores_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from ssl_bench.cli import cli
    from ssl_bench.results import read_rows

    root, run, results = _inat_replica(tmp_path / "inat"), tmp_path / "run", tmp_path / "rows.csv"
    out = CliRunner().invoke(cli, ["-q", "pretrain", "--preset", "tiny_cpu", "--data", f"inat2018:{root}", "--out",
                                   str(run), "epochs=1", "batch_size=2", "out_dim=64"], catch_exceptions=False)
    assert out.exit_code == 0, out.output  # labels unused: 6 train images, 3 steps
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "knn", "--ckpt", str(run / "checkpoint.pth"), "--data",
                                   f"inat2018:{root}", "--workers", "0", "--results", str(results), "--no-cache",
                                   "-p", "ks=1,2", "-p", "many_shot=2", "-p", "few_shot=2"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = {r.metric: r for r in read_rows(results)}
    # train images per class 1 / 3 / 2 (categories 3, 7, 11): > 2 many, < 2 few, else medium; val 1 / 2 / 1
    assert (rows["acc_many"].n, rows["acc_medium"].n, rows["acc_few"].n) == (2, 1, 1)
    assert rows["top1"].dataset == "inat2018" and rows["top1"].n == 4

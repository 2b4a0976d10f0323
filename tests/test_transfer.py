"""Transfer probes: the metric, CV selection of the L2 strength, and the nine replicas end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ssl_bench.cli import cli
from ssl_bench.results import read_rows
from ssl_bench.tasks.transfer import cross_validate, score, weight_decay_grid

from transfer_replicas import MAKERS, make_cifar100, make_transfer_root


def test_grid_is_45_quarter_decades_read_as_weight_decay():
    grid = weight_decay_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(grid)), 0.25)


def test_accuracy_and_mean_per_class_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 1])
    assert score(y_true, y_pred, "accuracy") == pytest.approx(4 / 7)
    # per class: 0 -> 3/4, 1 -> 1/2, 2 -> 0/1; mean = (0.75 + 0.5 + 0) / 3
    assert score(y_true, y_pred, "mean_per_class") == pytest.approx(1.25 / 3)
    # class 2 absent from this held-out part (only predicted): skipped, not NaN
    assert score(np.array([0, 1]), np.array([2, 1]), "mean_per_class") == pytest.approx(0.5)


def test_cross_validation_prefers_weak_l2_on_separable_data_and_strong_on_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    separable = torch.from_numpy(np.eye(3)[y] * 3 + 0.1 * rng.standard_normal((60, 3)))
    decays = np.array([1e3, 1e-3])
    scores = cross_validate(separable, y, 3, decays, "accuracy", folds=5, seed=0, max_iter=200)
    assert scores[1] == pytest.approx(1.0) and scores[1] > scores[0] - 1e-12
    noise = torch.from_numpy(rng.standard_normal((60, 20)))
    noisy = cross_validate(noise, y, 3, decays, "accuracy", folds=5, seed=0, max_iter=200)
    assert noisy.shape == (2,) and np.all((noisy >= 0) & (noisy <= 1))


@pytest.fixture(scope="module")
def transfer_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transfer") / "root"
    make_transfer_root(root, tuple(k for k in MAKERS if k != "cifar100"))
    make_cifar100(root / "cifar100", train_count=200)  # at least two images of each fine class
    return root


def test_all_nine_end_to_end_with_the_average(tmp_path, transfer_root):
    results = tmp_path / "runs.csv"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "transfer", "--model", "vit_nano_patch4_32", "--data-root",
                                   str(transfer_root), "-p", "folds=2", "-p", "grid=12", "-p", "max_iter=100", "--workers", "0",
                                   "--cache-dir", str(tmp_path / "cache"), "--results", str(results)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = {r.dataset: r for r in read_rows(results)}
    assert set(rows) == set(MAKERS) | {"average"}
    assert rows["average"].value == pytest.approx(np.mean([rows[k].value for k in MAKERS]))
    assert rows["aircraft"].params["metric"] == "mean_per_class" and rows["cifar10"].params["metric"] == "accuracy"
    assert all(0 <= r.value <= 100 and r.split == "test" and r.task == "transfer" for r in rows.values())
    assert len(rows["dtd"].params["cv_scores"]) == 12


def test_sslt_holdout_and_a_missing_dataset_gives_no_average(tmp_path):
    root = make_transfer_root(tmp_path / "root", ("dtd", "pets"))
    results = tmp_path / "runs.csv"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "transfer", "--model", "vit_nano_patch4_32", "--data-root",
                                   str(root), "-p", "protocol=sslt-holdout", "-p", "grid=6", "--workers", "0",
                                   "--cache-dir", str(tmp_path / "cache"), "--results", str(results)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert sorted(r.dataset for r in rows) == ["dtd", "pets"]
    assert all(r.protocol == "transfer-sslt-holdout-v2" and len(r.params["val_scores"]) == 6 for r in rows)
    out = CliRunner().invoke(cli, ["run", "--task", "transfer", "--model", "vit_nano_patch4_32", "--data-root",
                                   str(root), "-p", "datasets=flowers", "--results", str(results)])
    assert out.exit_code != 0 and "flowers not found under" in out.output

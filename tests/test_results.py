"""Result rows: locked appends from many processes, round trips, and the leaderboard pivot."""

from __future__ import annotations

import csv
import multiprocessing as mp

import pytest

from ssl_bench.errors import UserError
from ssl_bench.results import COLUMNS, ResultRow, append_rows, pivot, read_rows, write_leaderboard


def _row(model="m", task="knn", dataset="d", metric="top1", value=1.0, ts="2026-01-01T00:00:00", **kw) -> ResultRow:
    return ResultRow(model=model, arch="a", task=task, dataset=dataset, split="val", metric=metric, value=value,
                     timestamp=ts, **kw)


def test_round_trip_keeps_types(tmp_path):
    row = _row(std=0.5, n=10, params={"k": 20, "ks": [10, 20]}, wall_s=1.25)
    append_rows(tmp_path / "r.csv", [row, _row(value=2.0)])
    back = read_rows(tmp_path / "r.csv")
    assert back[0] == row and back[1].std is None and back[1].n is None
    with open(tmp_path / "r.csv") as handle:
        assert next(csv.reader(handle)) == COLUMNS


def _append_many(path: str, worker: int) -> None:
    append_rows(path, [_row(model=f"w{worker}", value=float(i)) for i in range(50)])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "r.csv")
    with mp.get_context("fork").Pool(4) as pool:
        pool.starmap(_append_many, [(path, w) for w in range(8)])
    rows = read_rows(path)
    assert len(rows) == 400
    assert sorted({r.model for r in rows}) == [f"w{w}" for w in range(8)]


def test_foreign_csv_is_refused(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="expected the result-row columns"):
        append_rows(tmp_path / "r.csv", [_row()])
    with pytest.raises(UserError, match="not a result-row CSV"):
        read_rows(tmp_path / "r.csv")


def test_pivot_is_model_by_task_dataset_metric_latest_wins(tmp_path):
    rows = [
        _row("A", value=70.0, ts="2026-01-01T00:00:00"),
        _row("A", value=71.5, ts="2026-02-01T00:00:00"),  # a rerun replaces the older number
        _row("A", task="fewshot", metric="top1_1shot", value=40.0),
        _row("B", value=60.0),
    ]
    header, table = pivot(rows)
    assert header == ["model", "arch", "method", "fewshot/d/top1_1shot", "knn/d/top1"]
    assert table == [
        {"model": "A", "arch": "a", "method": "", "fewshot/d/top1_1shot": "40.00", "knn/d/top1": "71.50"},
        {"model": "B", "arch": "a", "method": "", "fewshot/d/top1_1shot": "", "knn/d/top1": "60.00"},
    ]
    path, _, _ = write_leaderboard(tmp_path, rows)
    with open(path) as handle:
        assert list(csv.DictReader(handle))[1]["knn/d/top1"] == "60.00"

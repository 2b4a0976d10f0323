"""`ssl-bench report --study longtail`: records from hand-made result rows, the CSV and PNG it writes, errors."""

from __future__ import annotations

import csv
import math

import pytest
from click.testing import CliRunner

from ssl_bench.cli import cli
from ssl_bench.errors import UserError
from ssl_bench.report import longtail_records, write_longtail_report
from ssl_bench.results import ResultRow, append_rows


def _row(model: str, task: str, metric: str, value: float, n: int | None = None, when: str = "2026-01-02T00:00:00",
         dataset: str = "digits-lt", **params) -> ResultRow:
    return ResultRow(model=model, arch="vit_nano_patch4_32", task=task, dataset=dataset, split="val", metric=metric,
                     value=value, n=n, params=params, method="dino-vmf", timestamp=when)


def _group_rows(model: str, task: str, suffix: str, values: tuple[float, ...], when: str = "2026-01-02T00:00:00",
                dataset: str = "digits-lt") -> list[ResultRow]:
    top1, mean, many, medium, few = values
    shots = {"many_shot": "> 100", "few_shot": "< 20"}
    return [
        _row(model, task, f"top1{suffix}", top1, 450, when, dataset),
        _row(model, task, f"mean_per_class{suffix}", mean, 450, when, dataset, **shots),
        _row(model, task, f"acc_many{suffix}", many, 45, when, dataset, **shots),
        _row(model, task, f"acc_medium{suffix}", medium, 136, when, dataset, **shots),
        _row(model, task, f"acc_few{suffix}", few, 269, when, dataset, **shots),
    ]


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results"
    rows = (
        _group_rows("koleo", "knn", "", (60.0, 58.0, 90.0, 70.0, 50.0))
        + _group_rows("koleo", "knn", "", (1.0, 1.0, 1.0, 1.0, 1.0), when="2025-12-31T00:00:00")  # older: ignored
        + _group_rows("plain", "knn", "", (55.0, 52.0, 88.0, 66.0, 45.0))
        + _group_rows("plain", "linear", "_D_fast", (65.0, 61.0, 95.0, 75.0, 55.5))
        + _group_rows("plain", "knn", "", (30.0, 30.0, 30.0, 30.0, 30.0), dataset="digits")
        + [_row("koleo", "prototypes", "unique@0.9", 1020, 1024), _row("koleo", "prototypes", "n_prototypes", 1024),
           _row("koleo", "prototypes", "unique@0.5", 700, 1024),
           _row("paper", "knn", "top1", 74.4, dataset="imagenet")]  # no group rows: not in the study
    )
    append_rows(folder / "runs.csv", rows)
    return folder


def test_records_take_the_newest_rows_and_the_prototype_counts(results_dir):
    from ssl_bench.results import read_rows

    records = longtail_records(read_rows(results_dir / "runs.csv"), dataset="digits-lt")
    assert [(r["model"], r["probe"]) for r in records] == [("koleo", "knn"), ("plain", "knn"),
                                                          ("plain", "linear_D_fast")]
    koleo, plain, linear = records
    assert (koleo["top1"], koleo["acc_many"], koleo["acc_medium"], koleo["acc_few"]) == (60.0, 90.0, 70.0, 50.0)
    assert (koleo["n_many"], koleo["n_medium"], koleo["n_few"]) == (45, 136, 269)
    assert (koleo["unique_prototypes"], koleo["n_prototypes"]) == (1020, 1024)
    assert math.isnan(plain["unique_prototypes"]) and linear["mean_per_class"] == 61.0
    assert koleo["few_shot"] == "< 20"
    other = longtail_records(read_rows(results_dir / "runs.csv"), unique_at=0.5)
    assert len(other) == 4 and next(r for r in other if r["model"] == "koleo")["unique_prototypes"] == 700


def test_report_writes_csv_and_png(results_dir):
    csv_path, png_path, records = write_longtail_report(results_dir, dataset="digits-lt")
    assert csv_path == results_dir / "reports" / "longtail.csv" and len(records) == 3
    with open(csv_path, newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["model"] == "koleo" and table[0]["acc_few"] == "50" and table[0]["unique_prototypes"] == "1020"
    assert table[2]["acc_few"] == "55.50" and table[1]["unique_prototypes"] == ""
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report folder's CSV is not a result-row file, and the leaderboard never reads it
    out = CliRunner().invoke(cli, ["leaderboard", "--results-dir", str(results_dir)], catch_exceptions=False)
    assert out.exit_code == 0, out.output


def test_cli_report_and_its_errors(results_dir, tmp_path):
    out = CliRunner().invoke(cli, ["report", "--study", "longtail", "--results-dir", str(results_dir), "--out",
                                   str(tmp_path / "rep")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "linear_D_fast" in out.output and (tmp_path / "rep" / "longtail.png").is_file()
    out = CliRunner().invoke(cli, ["report", "--study", "longtail", "--results-dir", str(results_dir),
                                   "--dataset", "imagenet"])
    assert out.exit_code != 0 and "no shot-group rows" in out.output and "'imagenet'" in out.output
    out = CliRunner().invoke(cli, ["report", "--study", "other", "--results-dir", str(results_dir)])
    assert out.exit_code != 0 and "longtail" in out.output
    with pytest.raises(UserError, match="does not exist"):
        write_longtail_report(tmp_path / "missing")

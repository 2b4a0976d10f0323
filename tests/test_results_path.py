"""A results path that cannot take the rows fails before any work, and a failed append loses no row (issue 16,
item 5)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import ssl_bench.backbones
import ssl_bench.runner
from ssl_bench.cli import cli
from ssl_bench.errors import UserError
from ssl_bench.results import COLUMNS, ResultRow, append_rows, check_results_path, read_rows, save_rows

TINY = "vit_nano_patch4_32"


def _rows() -> list[ResultRow]:
    return [ResultRow(model="m", arch="a", task="knn", dataset="digits", split="val", metric=metric, value=value,
                      params={"k": 5}, timestamp="2026-01-01T00:00:00") for metric, value in (("top1", 91.25),
                                                                                             ("top5", 99.5))]


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder in which no file can be created: mode 0555 for a normal user; as root (which ignores the mode)
    a read-only system folder, if this machine has one."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in ("/sys", "/proc/sys"):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return Path(candidate)
        os.close(fd)
        os.unlink(name)
    pytest.skip("running as root without a read-only folder to write into")


@pytest.fixture
def no_model(monkeypatch):
    """Model creation raises if reached: a bad results path must fail before it."""
    calls: list[str] = []

    def fail(*args, **kwargs):
        calls.append("create_backbone")
        raise RuntimeError("create_backbone called before the results path was checked")

    monkeypatch.setattr(ssl_bench.backbones, "create_backbone", fail)
    return calls


def _run(results: Path | str, *extra: str):
    return CliRunner().invoke(cli, ["-q", "run", "--task", "knn", "--model", TINY, "--data", "builtin:digits",
                                    "-p", "ks=5", "--workers", "0", "--no-cache", "--results", str(results), *extra])


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder; expected a CSV file path"),
    ("inside_file", "is a file, not a folder"),
    ("read_only", "cannot create files in"),
    ("foreign_csv", "is a CSV with other columns (a, b, ...)"),
])
def test_a_bad_results_path_fails_before_the_model(case, message, tmp_path, no_model):
    if case == "folder":
        results = tmp_path / "results"
        results.mkdir()
    elif case == "inside_file":
        (tmp_path / "notes.txt").write_text("x")
        results = tmp_path / "notes.txt" / "runs.csv"
    elif case == "read_only":
        results = _read_only_folder(tmp_path) / "runs.csv"
    else:
        results = tmp_path / "runs.csv"
        results.write_text("a,b\n1,2\n")
    out = _run(results)
    assert no_model == [], "the model was built before the results path was refused"
    assert out.exit_code == 1 and message in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_a_good_path_passes_and_the_check_creates_nothing(tmp_path):
    assert check_results_path(tmp_path / "new" / "deeper" / "runs.csv") == tmp_path / "new" / "deeper" / "runs.csv"
    assert list(tmp_path.iterdir()) == []
    append_rows(tmp_path / "runs.csv", _rows())
    check_results_path(tmp_path / "runs.csv")  # an existing result CSV is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "runs.csv.lock"]


def test_a_failed_append_writes_the_rows_to_the_fallback_named_in_the_error(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "runs.csv"
    target.mkdir()  # appeared after the check: the append itself fails
    with pytest.raises(UserError) as error:
        save_rows(target, _rows())
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"could not append 2 rows to {target} (IsADirectoryError")
    fallback = Path(message.rsplit("written to ", 1)[1])
    assert fallback.parent == tmp_path and fallback.name.startswith("ssl-bench-unsaved-rows-")
    assert read_rows(fallback) == _rows()
    assert "top1" in caplog.text and "91.25" in caplog.text  # the rows are shown, too


def test_the_fallback_goes_to_the_temp_folder_when_the_working_folder_is_read_only(tmp_path, monkeypatch):
    monkeypatch.chdir(_read_only_folder(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(UserError, match="written to") as error:
        save_rows(tmp_path, _rows())  # a folder: the append fails
    fallback = Path(str(error.value).rsplit("written to ", 1)[1])
    assert fallback.parent == tmp_path and read_rows(fallback) == _rows()


def test_cli_rows_survive_a_results_path_that_breaks_during_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "out" / "runs.csv"

    def run_then_break(tasks, ctx):
        """The scoring (stubbed: rows of a knn run), during which the results path turns into a folder."""
        results.mkdir(parents=True)
        return ssl_bench.runner.stamp(_rows(), ctx, 1.5)

    monkeypatch.setattr(ssl_bench.runner, "run_tasks", run_then_break)
    out = _run(results)
    assert out.exit_code == 1 and "Traceback" not in out.output
    last = out.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not append 2 rows to {results} (IsADirectoryError")
    fallback = Path(last.rsplit("written to ", 1)[1])
    rows = read_rows(fallback)
    assert [(r.metric, r.value, r.wall_s) for r in rows] == [("top1", 91.25, 1.5), ("top5", 99.5, 1.5)]
    with open(fallback, newline="") as handle:
        assert handle.readline().strip().split(",") == COLUMNS
    assert "91.25" in out.output and "99.50" in out.output  # the rows are printed too

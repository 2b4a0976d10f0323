"""Long-format result rows, locked CSV appends, and the wide leaderboard pivot."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError
from .io import atomic_write_text, file_lock


@dataclass
class ResultRow:
    """One number with everything needed to reproduce and compare it."""

    model: str
    arch: str
    task: str
    dataset: str
    split: str
    metric: str
    value: float
    std: float | None = None
    n: int | None = None
    protocol: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    ckpt_sha256: str = ""
    timestamp: str = ""
    ssl_bench_version: str = ""
    git_commit: str = ""
    torch_version: str = ""
    torchvision_version: str = ""
    timm_version: str = ""
    numpy_version: str = ""
    device: str = ""
    wall_s: float | None = None

    def to_csv_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in asdict(self).items():
            if key == "params":
                out[key] = json.dumps(value, sort_keys=True, default=str)
            elif value is None:
                out[key] = ""
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_csv_dict(cls, record: dict[str, str]) -> "ResultRow":
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = record.get(f.name, "")
            if f.name == "params":
                kwargs[f.name] = json.loads(raw) if raw else {}
            elif f.name in ("value", "std", "wall_s"):
                kwargs[f.name] = float(raw) if raw not in ("", None) else (None if f.name != "value" else float("nan"))
            elif f.name == "n":
                kwargs[f.name] = int(float(raw)) if raw not in ("", None) else None
            else:
                kwargs[f.name] = raw or ""
        return cls(**kwargs)


COLUMNS: list[str] = [f.name for f in fields(ResultRow)]
LEADERBOARD_FILE = "leaderboard.csv"
UNSAVED_PREFIX = "ssl-bench-unsaved-rows-"

log = logging.getLogger(__name__)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def append_rows(path: str | os.PathLike, rows: Sequence[ResultRow]) -> None:
    """Append rows under an exclusive lock; the header is written once, when the file is new or empty."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        new_file = not path.exists() or path.stat().st_size == 0
        if not new_file:
            with open(path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
            if header != COLUMNS:
                raise UserError(f"{path}: existing CSV has columns {header}, expected the result-row columns {COLUMNS}")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.to_csv_dict())
        with open(path, "a", newline="", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (the folder an append would create the rest under)."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _can_create_in(folder: Path) -> str | None:
    """None if a file can be created in ``folder`` (tried for real: permission bits lie to root and on read-only
    mounts), else the reason."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ssl-bench-probe-")
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def check_results_path(path: str | os.PathLike) -> Path:
    """Fail before any work, with one line, where ``append_rows(path, ...)`` would fail after it: ``path`` a folder,
    a file where a folder should be, a folder or file that cannot be written, or a CSV with other columns."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"results path {path} is a folder; expected a CSV file path (e.g. --results {path / 'runs.csv'})")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise UserError(f"results path {path}: {base} is a file, not a folder; expected a CSV path in a folder")
    lock = Path(f"{path}.lock")
    if path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
            with open(path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
        except OSError as error:
            raise UserError(f"results file {path} cannot be appended to ({error.strerror or error}); "
                            "expected a writable CSV file") from None
        if header and header != COLUMNS:
            raise UserError(f"results file {path} is a CSV with other columns ({', '.join(header[:4])}, ...); "
                            "expected a result-row CSV or a new file")
    if not (path.exists() and lock.exists()):  # the file or its lock is still to be created
        reason = _can_create_in(base)
        if reason:
            raise UserError(f"results path {path}: cannot create files in {base} ({reason}); "
                            "expected a writable folder (--results DIR/runs.csv)")
    return path


def format_rows(rows: Sequence[ResultRow]) -> str:
    """One line per row (task, dataset, metric, value): what ``ssl-bench run`` prints."""
    return "\n".join(f"{row.task:<10} {row.dataset:<12} {row.metric:<14} {row.value:8.2f}" for row in rows)


def _write_fallback(rows: Sequence[ResultRow]) -> Path | None:
    """The rows as a new result CSV in the working folder, else the temp folder; None if neither takes it."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_csv_dict())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            fd, name = tempfile.mkstemp(dir=folder, prefix=f"{UNSAVED_PREFIX}{stamp}-", suffix=".csv")
        except OSError:
            continue
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            return Path(name)
        except OSError:  # a full disk: no half file left behind; try the next folder
            os.unlink(name)
    return None


def save_rows(path: str | os.PathLike, rows: Sequence[ResultRow]) -> None:
    """``append_rows``, and where that fails, no row is lost: the rows are logged and written to a fallback CSV
    whose path the one-line error names (append it to the results later)."""
    try:
        append_rows(path, rows)
        return
    except (OSError, UserError) as error:
        reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error.strerror or error}"
    log.warning("%d rows not appended to %s:\n%s", len(rows), path, format_rows(rows))
    fallback = _write_fallback(rows)
    where = f"they were written to {fallback}" if fallback else "no fallback file could be written either (rows above)"
    raise UserError(f"could not append {len(rows)} rows to {path} ({reason}); {where}")


def read_rows(path: str | os.PathLike) -> list[ResultRow]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"model", "task", "dataset", "metric", "value"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: not a result-row CSV (missing columns {sorted(missing)})")
        return [ResultRow.from_csv_dict(record) for record in reader]


def result_files(results_dir: str | os.PathLike) -> list[Path]:
    """Every row CSV in the results folder (the leaderboard's own output excluded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"results folder {root} does not exist (expected a folder of result-row CSVs)")
    return sorted(p for p in root.glob("*.csv") if p.name != LEADERBOARD_FILE)


def column_name(row: ResultRow) -> str:
    return f"{row.task}/{row.dataset}/{row.metric}"


def latest_rows(rows: Iterable[ResultRow]) -> dict[tuple[str, str, str, str], ResultRow]:
    """The row per (model, task, dataset, metric) with the latest timestamp (of equal ones, the last read)."""
    latest: dict[tuple[str, str, str, str], ResultRow] = {}
    for row in rows:
        key = (row.model, row.task, row.dataset, row.metric)
        if key not in latest or row.timestamp >= latest[key].timestamp:
            latest[key] = row
    return latest


def pivot(rows: Iterable[ResultRow]) -> tuple[list[str], list[dict[str, str]]]:
    """Model x (task/dataset/metric) table; where a cell has several rows the latest timestamp wins."""
    rows = list(rows)
    info: dict[str, dict[str, str]] = {}
    for row in rows:
        info.setdefault(row.model, {"arch": row.arch, "method": row.method})
    cells: dict[str, dict[str, float]] = {}
    for row in latest_rows(rows).values():
        cells.setdefault(row.model, {})[column_name(row)] = row.value
    metric_columns = sorted({key for model_cells in cells.values() for key in model_cells})
    header = ["model", "arch", "method", *metric_columns]
    table = []
    for model in sorted(cells):
        record = {"model": model, **info[model]}
        for key in metric_columns:
            record[key] = f"{cells[model][key]:.2f}" if key in cells[model] else ""
        table.append(record)
    return header, table


def write_leaderboard(
    results_dir: str | os.PathLike, rows: Iterable[ResultRow]
) -> tuple[Path, list[str], list[dict[str, str]]]:
    """Write ``leaderboard.csv`` atomically; return its path and the table."""
    header, table = pivot(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(table)
    path = Path(results_dir) / LEADERBOARD_FILE
    atomic_write_text(path, buffer.getvalue())
    return path, header, table


def format_table(header: Sequence[str], table: Sequence[dict[str, str]]) -> str:
    """Plain aligned text for the terminal."""
    widths = [max(len(h), *(len(r.get(h, "")) for r in table)) if table else len(h) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(r.get(h, "").ljust(w) for h, w in zip(header, widths)) for r in table]
    return "\n".join(lines)

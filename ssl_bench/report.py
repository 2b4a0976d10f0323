"""Study reports built from the result rows of a results folder (``ssl-bench report --study NAME``).

``longtail``: per model, dataset and classifier ("probe": ``knn``, or ``linear`` with its recipe suffix such as
``linear_D_fast``), the overall top-1, mean per-class accuracy and the accuracy on the many / medium / few-shot
class groups (the rows the knn and linear tasks write), next to the model's unique-prototype count from the
prototypes task when it ran. Written as ``<out>/longtail.csv`` and a grouped bar plot ``<out>/longtail.png``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from .errors import UserError
from .io import atomic_write_text
from .longtail import GROUP_METRICS
from .plots import save_grouped_bars
from .results import ResultRow, latest_rows, read_rows, result_files

LONGTAIL_COLUMNS = [
    "model", "method", "dataset", "probe", "top1", "mean_per_class", "acc_many", "acc_medium", "acc_few",
    "n_many", "n_medium", "n_few", "many_shot", "few_shot", "unique_prototypes", "n_prototypes", "unique_at",
]
_PLOTTED = ("acc_many", "acc_medium", "acc_few", "mean_per_class")
_CATEGORIES = ("many-shot", "medium-shot", "few-shot", "mean per class")
_GROUP_TASKS = ("knn", "linear")


def _prototype_counts(cells: dict, model: str, unique_at: float) -> tuple[float, float]:
    """(unique prototypes at cosine ``unique_at``, K) from the model's newest prototypes rows; nan when absent."""
    def newest(metric: str) -> float:
        found = [r for (m, task, _, name), r in cells.items() if m == model and task == "prototypes" and name == metric]
        return max(found, key=lambda r: r.timestamp).value if found else math.nan

    return newest(f"unique@{unique_at:g}"), newest("n_prototypes")


def longtail_records(rows: list[ResultRow], dataset: str | None = None, unique_at: float = 0.9) -> list[dict]:
    """One record per (model, dataset, probe) that has shot-group rows, values as floats (nan when missing)."""
    cells = latest_rows(rows)
    records = []
    for (model, task, data, metric), few in sorted(cells.items()):
        match = re.fullmatch(r"acc_few(.*)", metric)
        if task not in _GROUP_TASKS or match is None or (dataset is not None and data != dataset):
            continue
        suffix = match.group(1)

        def cell(name: str) -> ResultRow | None:
            return cells.get((model, task, data, f"{name}{suffix}"))

        record = {"model": model, "method": few.method, "dataset": data, "probe": task + suffix,
                  "many_shot": few.params.get("many_shot", ""), "few_shot": few.params.get("few_shot", "")}
        for name in ("top1", *GROUP_METRICS.values()):
            found = cell(name)
            record[name] = found.value if found is not None else math.nan
        for group in ("many", "medium", "few"):
            found = cell(f"acc_{group}")
            record[f"n_{group}"] = found.n if found is not None else None
        record["unique_prototypes"], record["n_prototypes"] = _prototype_counts(cells, model, unique_at)
        record["unique_at"] = unique_at
        records.append(record)
    return sorted(records, key=lambda r: (r["dataset"], r["probe"], r["model"]))


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if not value.is_integer() else f"{value:.0f}"
    return str(value)


def as_text(records: list[dict]) -> list[dict[str, str]]:
    """The records as the CSV holds them: two decimals, whole numbers bare, missing values empty."""
    return [{key: _text(record[key]) for key in LONGTAIL_COLUMNS} for record in records]


def _bar_label(record: dict) -> str:
    if math.isnan(record["unique_prototypes"]):
        return record["model"]
    return f"{record['model']} ({record['unique_prototypes']:.0f}/{record['n_prototypes']:.0f} unique)"


def write_longtail_report(results_dir: str | Path, out_dir: str | Path | None = None, dataset: str | None = None,
                          unique_at: float = 0.9) -> tuple[Path, Path, list[dict]]:
    """Write ``longtail.csv`` and ``longtail.png`` (default folder ``<results_dir>/reports``); return both paths
    and the records."""
    rows = [row for path in result_files(results_dir) for row in read_rows(path)]
    records = longtail_records(rows, dataset, unique_at)
    if not records:
        raise UserError(f"no shot-group rows (acc_many / acc_medium / acc_few of the knn or linear task) in "
                        f"{results_dir}" + (f" for dataset {dataset!r}" if dataset else "")
                        + "; run e.g. `ssl-bench run --task knn --data builtin:digits-lt ...` first")
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "reports"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LONGTAIL_COLUMNS)
    writer.writeheader()
    writer.writerows(as_text(records))
    csv_path = out / "longtail.csv"
    atomic_write_text(csv_path, buffer.getvalue())

    panels: dict[tuple[str, str], dict[str, list[float]]] = {}
    for record in records:
        panels.setdefault((record["dataset"], record["probe"]), {})[_bar_label(record)] = [record[m] for m in _PLOTTED]
    png_path = save_grouped_bars(out / "longtail.png", [(f"{probe} on {data}", series)
                                                       for (data, probe), series in panels.items()],
                                 _CATEGORIES, "top-1 accuracy (%)")
    return csv_path, png_path, records

"""What `ssl-bench demo` reports after its run: the training curves and a verdict on whether pretraining learned.

Pure functions over a run's ``log.jsonl`` records and the result rows, so a test can check them on rows made by
hand; the CLI chains pretraining and scoring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .plots import save_curves
from .results import ResultRow

LEARNED_MARGIN = 10.0  # points above random init and raw pixels, on both probes, for the verdict "learned"
CURVES = (("loss", "loss"), ("teacher_entropy", "teacher entropy (nats)"), ("knn_top1", "kNN top-1 (%)"))


def read_log(path: Path) -> list[dict]:
    """The per-epoch records of a pretraining run's log.jsonl, in epoch order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda record: record["epoch"])


def save_demo_curves(path: Path, records: Sequence[dict]) -> Path:
    """Loss, teacher entropy and kNN top-1 against epoch, one panel each (nan where an epoch lacks a value)."""
    epochs = [record["epoch"] + 1 for record in records]
    curves = [(title, [float(record.get(key, math.nan)) for record in records]) for key, title in CURVES]
    return save_curves(path, epochs, curves, "epoch")


def headline(rows: Sequence[ResultRow], model: str, task: str) -> float:
    """A model's top-1 of one task: kNN at its best k, the linear probe at its selected lr (``top1_<recipe>...``)."""
    def is_headline(metric: str) -> bool:
        return metric == "top1" if task == "knn" else metric.startswith("top1_")

    for row in rows:
        if row.model == model and row.task == task and is_headline(row.metric):
            return row.value
    raise ValueError(f"no top-1 row of task {task!r} for model {model!r}")


def demo_verdict(rows: Sequence[ResultRow], records: Sequence[dict], pretrained: str, method: str) -> list[str]:
    """One verdict line with the three models' kNN and linear top-1, then any collapse warning of the run.

    "learned" needs the pretrained backbone ``LEARNED_MARGIN`` points above both random init and raw pixels on
    both probes."""
    models = {"pretrained": pretrained}
    models.update({kind: next(row.model for row in rows if row.model != pretrained and kind in row.model)
                   for kind in ("random init", "pixels")})
    scores = {kind: (headline(rows, model, "knn"), headline(rows, model, "linear")) for kind, model in models.items()}
    ours = scores["pretrained"]
    learned = all(ours[i] >= scores[other][i] + LEARNED_MARGIN for other in ("random init", "pixels") for i in (0, 1))
    word = "LEARNED" if learned else "DID NOT LEARN"
    lines = [f"verdict: {method} pretraining {word}: kNN top-1 {ours[0]:.1f} (random init {scores['random init'][0]:.1f}, "
             f"raw pixels {scores['pixels'][0]:.1f}); linear top-1 {ours[1]:.1f} (random init "
             f"{scores['random init'][1]:.1f}, raw pixels {scores['pixels'][1]:.1f})"]
    warned = [(record["epoch"], record["collapse"]) for record in records if record.get("collapse")]
    if warned:
        epochs = ", ".join(str(epoch) for epoch, _ in warned)
        lines.append(f"collapse warning at epoch(s) {epochs}: {warned[-1][1]}")
    else:
        lines.append(f"collapse monitor: quiet at all {len(records)} epochs")
    return lines

"""Run tasks against one backbone and dataset, stamping every row with time, versions, device and wall time."""

from __future__ import annotations

import logging
import time
from typing import Any

from .context import TaskContext
from .registry import Task, check_params
from .results import ResultRow, now_iso
from .runtime import device_name, git_commit, library_versions

log = logging.getLogger(__name__)


def stamp(rows: list[ResultRow], ctx: TaskContext, wall_s: float) -> list[ResultRow]:
    versions = library_versions()
    for row in rows:
        row.timestamp = row.timestamp or now_iso()
        row.ssl_bench_version = versions["ssl_bench"]
        row.git_commit = git_commit()
        row.torch_version = versions["torch"]
        row.torchvision_version = versions["torchvision"]
        row.timm_version = versions["timm"]
        row.numpy_version = versions["numpy"]
        row.device = device_name(ctx.device)
        row.wall_s = round(wall_s, 3)
        if ctx.backbone.load_report is not None:
            row.params.setdefault("ckpt_format", ctx.backbone.load_report.format)
            row.params.setdefault("ckpt_key", ctx.backbone.load_report.key)
        if ctx.backbone.init_seed is not None:  # random init: the seed says which initialisation scored
            row.params.setdefault("init_seed", ctx.backbone.init_seed)
    return rows


def run_tasks(tasks: list[tuple[Task, Any]], ctx: TaskContext) -> list[ResultRow]:
    """Run each (task, params) in order; features shared between tasks come from the cache. Every task's options
    are checked first, so a bad option of the last task fails before the first one extracts anything."""
    for task, params in tasks:
        check_params(task, params)
    rows: list[ResultRow] = []
    for task, params in tasks:
        log.info("task %s (%s) on %s", task.name, task.version, ctx.dataset.spec)
        start = time.time()
        task_rows = task.run(ctx, params)
        rows += stamp(task_rows, ctx, time.time() - start)
    return rows

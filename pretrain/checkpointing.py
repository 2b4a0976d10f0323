"""Pretrain checkpoints: written atomically, in the ssl-bench format the checkpoint adapter reads, and only when
every tensor in them is finite, so that the file on disk is always one a run can resume from."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ssl_bench.checkpoint import non_finite_names, read_checkpoint
from ssl_bench.errors import UserError
from ssl_bench.io import atomic_write

from .config import PretrainConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "teacher_backbone.pth"
CHECKED_PARTS = ("student", "teacher", "optimizer")  # what a resume needs finite
PREVIEW = 4


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor under ``value`` (nested dicts and lists, as optimizer state dicts are), with a dotted name."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(f"{prefix}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _flatten(f"{prefix}.{index}", item)


def state_tensors(state: Mapping[str, Any], parts: Iterable[str] = CHECKED_PARTS) -> dict[str, torch.Tensor]:
    """The tensors of ``parts`` of a checkpoint state, named ``student.<key>``, ``optimizer.state.<i>.exp_avg`` ..."""
    return {name: tensor for part in parts if part in state for name, tensor in _flatten(part, state[part])}


def last_good_checkpoint(path: Path) -> str:
    """Names the checkpoint a failed run leaves behind (and its epoch, read from the mapped file), or says none was
    written, for the one-line stop messages."""
    if not path.is_file():
        return f"no checkpoint was written yet (none at {path})"
    try:
        epoch = read_checkpoint(path, mmap=True).get("epoch")
    except (UserError, AttributeError):
        epoch = None
    return f"the last good checkpoint is {path}" + (f" (after epoch {int(epoch) - 1})" if epoch else "")


def check_finite(state: Mapping[str, Any], path: Path) -> None:
    """Refuse a state whose student, teacher or optimizer holds a NaN or an inf: writing it would replace the last
    good checkpoint with one that neither resumes nor scores. One fused check (``non_finite_names``)."""
    tensors = state_tensors(state)
    bad = non_finite_names(tensors)
    if not bad:
        return
    epoch, step = int(state.get("epoch", 0)) - 1, int(state.get("step", 0)) - 1
    shown = ", ".join(bad[:PREVIEW]) + (", ..." if len(bad) > PREVIEW else "")
    raise UserError(
        f"weights went non-finite (NaN or inf) in epoch {epoch}, by step {step}: {len(bad)} of {len(tensors)} "
        f"student / teacher / optimizer tensors ({shown}); stopped without saving, {last_good_checkpoint(path)}. "
        "Lower lr (or clip_grad) and start again"
    )


def save_checkpoint(path: Path, config: PretrainConfig, state: dict[str, Any],
                    data: Mapping[str, str] | None = None) -> None:
    """``state`` holds student, teacher, optimizer, centering, epoch, step; the meta block names the arch, and
    ``data`` (spec, train manifest hash) the data it was trained on, so that a resume on other data is refused.
    Nothing is written, and the file on disk stays as it was, unless every checked tensor is finite."""
    check_finite(state, path)
    meta = {"format_version": FORMAT_VERSION, "arch": config.arch, "method": config.method,
            "config": config.to_dict()}
    if data is not None:
        meta["data"] = dict(data)
    atomic_write(path, lambda tmp: torch.save({"ssl_bench": meta, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return read_checkpoint(path)


def export_teacher_backbone(path: Path, teacher_state: dict[str, torch.Tensor]) -> None:
    """A backbone-only state dict (plain timm keys) for sharing; ``ssl-bench run --ckpt`` reads either file."""
    backbone = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
    atomic_write(path, lambda tmp: torch.save(backbone, tmp))


def _held_open(paths: set[str]) -> set[str]:
    """Which of ``paths`` a live process holds open, from the links under /proc/<pid>/fd (Linux). Processes whose
    fds cannot be read (another user's) are skipped: a run folder's temporaries are written by its own user."""
    held: set[str] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return held
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(os.path.join(entry.path, "fd")):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in paths:
                    held.add(target)
        except OSError:  # the process ended, or its fds are not ours to read
            continue
    return held


def remove_stale_temporaries(folder: Path, names: Iterable[str], started: float | None = None) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an atomic write leaves when it is killed mid-write: those last modified
    before this run ``started`` and held open by no live process (a concurrent writer's file is kept). Logs and
    returns what was removed."""
    started = time.time() if started is None else started
    candidates = [tmp for name in names for tmp in Path(folder).glob(f".{name}.*.tmp") if tmp.is_file()]
    old = [tmp for tmp in candidates if tmp.stat().st_mtime < started]
    if not old:
        return []
    held = _held_open({str(tmp.resolve()) for tmp in old})
    removed: list[Path] = []
    for tmp in old:
        if str(tmp.resolve()) in held:
            log.info("kept %s: a live process holds it open", tmp)
            continue
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
        log.info("removed %s (%d bytes), left by an interrupted write", tmp, size)
    return removed

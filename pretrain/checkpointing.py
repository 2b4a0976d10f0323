"""Pretrain checkpoints: written atomically, in the ssl-bench format the checkpoint adapter reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssl_bench.checkpoint import read_checkpoint
from ssl_bench.io import atomic_write

from .config import PretrainConfig

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "teacher_backbone.pth"


def save_checkpoint(path: Path, config: PretrainConfig, state: dict[str, Any]) -> None:
    """``state`` holds student, teacher, optimizer, centering, epoch, step; the meta block names the arch."""
    payload = {
        "ssl_bench": {"format_version": FORMAT_VERSION, "arch": config.arch, "method": config.method,
                      "config": config.to_dict()},
        **state,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return read_checkpoint(path)


def export_teacher_backbone(path: Path, teacher_state: dict[str, torch.Tensor]) -> None:
    """A backbone-only state dict (plain timm keys) for sharing; ``ssl-bench run --ckpt`` reads either file."""
    backbone = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
    atomic_write(path, lambda tmp: torch.save(backbone, tmp))

"""Where code runs: device choice, torchrun process groups, seeds, and the environment recorded in rows."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def hide_progress() -> bool:
    """Whether progress bars stay off: on every rank but the main one, and when ssl-bench's INFO logs are off
    (``ssl-bench -q``, or a library caller that has not enabled them)."""
    return not (dist_info().is_main and logging.getLogger("ssl_bench").isEnabledFor(logging.INFO))


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device is not None and device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks this process's GPU under torchrun (LOCAL_RANK), else cuda:0, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = bf16 autocast on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        from .errors import UserError

        raise UserError(f"precision {precision!r}; expected fp32, bf16 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"`` (a resolved precision), nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def barrier() -> None:
    """Wait for every rank, when running under torch.distributed; no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Full-precision float32 matrix products on CUDA inside the block (no TF32), whatever the process set."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the ssl-bench checkout this code runs from, or 'unknown' for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    import PIL
    import timm
    import torchvision

    from . import __version__

    return {
        "ssl_bench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }

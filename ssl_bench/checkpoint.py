"""Checkpoint adapter: read any supported checkpoint format into a timm backbone, or refuse loudly.

Formats are detected from the file's structure (protocols.md §1.1):
  ssl-bench   our pretrain checkpoints: {"ssl_bench": meta, "teacher": sd, "student": sd, ...}
  dino        DINO / iBOT / DINO-vMF full checkpoints: {"teacher": sd, "student": sd, "optimizer": ..., ...}
  msn         MSN: {"target_encoder": sd, "encoder": sd, ...}; "teacher" means target_encoder
  wrapped     {"state_dict" | "model" | "module": sd} (timm train scripts, DeiT, BEiT)
  state_dict  a plain state dict: backbone-only exports, timm and torchvision weights
Prefixes module./backbone./encoder. are stripped by anchored match, DINOv2-style chunked block keys are
mapped to timm's, and pos_embed is resampled when the grid differs. Nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS: dict[str, str] = {
    "ssl-bench": "ssl-bench pretrain checkpoint (teacher/student + head)",
    "dino": "DINO / iBOT / DINO-vMF full checkpoint (teacher default, student by option)",
    "msn": "MSN checkpoint (target_encoder; student = encoder)",
    "wrapped": "{state_dict|model|module: weights} (timm, DeiT, BEiT)",
    "state_dict": "backbone-only file or plain timm / torchvision state dict",
}
CHECKPOINT_KEYS = ("teacher", "student")
STRIPPED_PREFIXES = ("module.", "backbone.", "encoder.")
WRAPPER_KEYS = ("state_dict", "model", "module")
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)
# parts of a checkpoint that are not the backbone: pretraining / classifier heads, iBOT's mask token
HEAD_KEY_PREFIXES = ("head.", "fc.", "masked_embed", "mask_token")
SAFE_GLOBALS = (argparse.Namespace,)  # DINO / iBOT store their command-line args in the checkpoint


@dataclass
class LoadReport:
    path: str
    format: str
    key: str | None
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.path}: format {self.format}"
            + (f" [{self.key}]" if self.key else "")
            + f", matched {len(self.matched)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )
        if self.resized:
            text += f", resized {', '.join(self.resized)}"
        if self.unexpected:
            text += f" (unexpected: {_preview(self.unexpected)})"
        return text


def _preview(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an inf, in the mapping's order.

    One fused max-abs (inf-norm) reduction per (device, dtype) group and one host read per group, not one sync per
    tensor: NaN propagates through the max (on CUDA too), and unlike an L2 norm a max cannot overflow on finite
    values, so a large but finite weight is never reported."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            groups.setdefault((tensor.device, tensor.dtype), []).append((name, tensor))
    bad: set[str] = set()
    for members in groups.values():
        norms = torch._foreach_norm([t.detach() for _, t in members], float("inf"))
        finite = torch.isfinite(torch.stack(norms)).cpu()  # the group's one host sync
        bad.update(name for (name, _), ok in zip(members, finite.tolist()) if not ok)
    return [name for name in tensors if name in bad]


def read_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """torch.load on the CPU; weights-only first, full unpickling only for files that need it.

    DINO / iBOT store their ``argparse.Namespace`` under ``args``; that class is allow-listed, so those files
    load weights-only. Anything the fallback cannot read either is refused with a UserError. With ``mmap``
    (zip-format files, i.e. anything torch.save wrote since torch 1.6) tensors are memory-mapped, copy-on-write:
    only the ones used (a backbone, a head) are read from disk, not the optimizer state or the other network.
    Mapped tensors must be copied out and dropped before anything rewrites the file in place (a truncated
    mapping faults with SIGBUS), so only short-lived readers that copy what they need use it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist (expected a .pth/.pt file; nothing is ever downloaded)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file (expected a .pth/.pt file)")
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older ones use the fallback
        with allow(list(SAFE_GLOBALS)) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # a non-allow-listed object, or bytes that are not a pickle at all
        pass
    except Exception as exc:  # truncated files, not-a-checkpoint files
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint, or corrupt ({type(exc).__name__}: {exc})") from exc
    log.warning("%s holds non-tensor objects; loaded it with full unpickling (only load files you trust)", path)
    return checkpoint


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _weights(obj: Mapping, name: str, fmt: str) -> dict[str, torch.Tensor]:
    value = obj[name]
    if not _is_state_dict(value):
        raise UserError(
            f"{fmt} checkpoint entry {name!r} is not a dict of tensors (it holds a {type(value).__name__}"
            + (f" with keys {_preview(list(map(str, value)))}" if isinstance(value, Mapping) else "") + ")"
        )
    return dict(value)


def extract_state_dict(obj: Any, key: str = "teacher") -> tuple[str, str | None, dict[str, torch.Tensor]]:
    """Detect the checkpoint format; return (format, key used, raw state dict)."""
    if key not in CHECKPOINT_KEYS:
        raise UserError(f"checkpoint key {key!r}; expected one of {', '.join(CHECKPOINT_KEYS)}")
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, expected a dict of weights ({', '.join(CHECKPOINT_FORMATS)})")
    if "ssl_bench" in obj or "teacher" in obj or "student" in obj:
        fmt = "ssl-bench" if "ssl_bench" in obj else "dino"
        if key not in obj:
            raise UserError(f"{fmt} checkpoint has no {key!r} weights (it has {', '.join(map(str, obj))})")
        return fmt, key, _weights(obj, key, fmt)
    if "target_encoder" in obj:
        msn_key = "target_encoder" if key == "teacher" else "encoder"
        if msn_key not in obj:
            raise UserError(f"MSN checkpoint has no {msn_key!r} weights (it has {', '.join(map(str, obj))})")
        weights = _weights(obj, msn_key, "MSN")
        return "msn", msn_key, {k: v for k, v in weights.items() if not _strip(k).startswith("fc.")}
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj and _is_state_dict(obj[wrapper]):
            fmt, used, weights = "wrapped", wrapper, dict(obj[wrapper])
            break
    else:
        if not _is_state_dict(obj):
            raise UserError(
                f"unrecognised checkpoint with top-level keys {_preview(list(map(str, obj)))}; expected one of: "
                + "; ".join(f"{k}: {v}" for k, v in CHECKPOINT_FORMATS.items())
            )
        fmt, used, weights = "state_dict", None, dict(obj)
    if key != "teacher":
        raise UserError(
            f"checkpoint key {key!r} asked for, but this {fmt} checkpoint holds a single set of weights; "
            "teacher/student apply only to ssl-bench, dino and msn checkpoints"
        )
    return fmt, used, weights


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def map_keys(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys onto the model's: keys the model already has are kept as they are.

    Two checkpoint keys that land on the same model tensor (``x`` and ``module.x``) are refused, not silently merged."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        new = key if key in model_keys else _strip(key)
        if new not in model_keys:
            new = _CHUNKED_BLOCK.sub(r"blocks.\1.", new)  # DINOv2 block chunking: blocks.<chunk>.<i>.
        if new in source and new not in model_keys:
            new = key  # two leftovers collide: report both, as they are in the file
        if new in source and new in model_keys:
            raise UserError(f"checkpoint keys {source[new]!r} and {key!r} both map to {new!r}; which one to load is ambiguous")
        out[new], source[new] = value, key
    return out


def _resample_pos_embed(model: nn.Module, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old_grid = int(round((tensor.shape[1] - prefix) ** 0.5))
    new_grid = int(round((target.shape[1] - prefix) ** 0.5))
    if old_grid * old_grid != tensor.shape[1] - prefix or new_grid * new_grid != target.shape[1] - prefix:
        raise UserError(f"pos_embed of shape {tuple(tensor.shape)} is not a square grid; cannot resample to {tuple(target.shape)}")
    resampled = resample_abs_pos_embed(
        tensor.float(), new_size=[new_grid, new_grid], old_size=[old_grid, old_grid], num_prefix_tokens=prefix
    )
    return resampled.to(target.dtype)


def checkpoint_arch(checkpoint: Any) -> str | None:
    """The timm architecture an ssl-bench checkpoint records, so ``--model`` can be left out."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("ssl_bench"), Mapping):
        return checkpoint["ssl_bench"].get("arch")
    return None


def load_backbone_weights(model: nn.Module, path: str | Path, key: str = "teacher", checkpoint: Any = None) -> LoadReport:
    """Load a checkpoint into ``model``; raise if any backbone tensor stays unloaded or has the wrong shape.

    ``checkpoint`` is the already-read file content, when the caller has it."""
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    fmt, used_key, raw = extract_state_dict(checkpoint, key)
    target = model.state_dict()
    state = map_keys(raw, set(target))
    report = LoadReport(str(path), fmt, used_key)
    loadable: dict[str, torch.Tensor] = {}
    wrong_shape: list[str] = []
    for name, value in state.items():
        if name not in target:
            report.unexpected.append(name)
            continue
        if value.shape != target[name].shape:
            if name == "pos_embed" and value.ndim == 3 and value.shape[::2] == target[name].shape[::2]:
                value = _resample_pos_embed(model, value, target[name])
                report.resized.append(f"pos_embed {tuple(state[name].shape)}->{tuple(value.shape)}")
            else:
                wrong_shape.append(f"{name} {tuple(value.shape)} vs model {tuple(target[name].shape)}")
                continue
        loadable[name] = value
    report.matched = sorted(loadable)
    report.missing = [k for k in target if k not in loadable and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    if wrong_shape:
        raise UserError(f"{path}: tensors with the wrong shape for this model: {_preview(wrong_shape)}")
    if report.missing:
        raise UserError(
            f"{path} ({fmt}{f' [{used_key}]' if used_key else ''}) leaves {len(report.missing)} of {len(target)} "
            f"backbone tensors unloaded: {_preview(report.missing)}; checkpoint keys look like {_preview(list(raw))}. "
            "Is this checkpoint for a different architecture (--model)?"
        )
    bad = non_finite_names(loadable)
    if bad:
        raise UserError(
            f"{path} ({fmt}{f' [{used_key}]' if used_key else ''}): {len(bad)} of {len(loadable)} backbone tensors "
            f"are not finite (NaN or inf): {_preview(bad)}; a diverged run's weights cannot be scored"
        )
    model.load_state_dict(loadable, strict=False)
    unused = [k for k in report.unexpected if not k.startswith(HEAD_KEY_PREFIXES)]
    if unused:  # tensors of another architecture (a deeper ViT ...) must not pass as a clean load
        log.warning("loaded %s; %d tensors of the file are unused and are no head: %s (is --model the checkpoint's "
                    "architecture?)", report.summary(), len(unused), _preview(unused))
    else:
        log.info("loaded %s", report.summary())
    return report

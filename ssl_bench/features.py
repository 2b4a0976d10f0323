"""Frozen-backbone features: which tokens to take (FeatureSpec), batched extraction sharded over torchrun ranks,
and a content-addressed on-disk cache so a second task on the same features never runs the model again."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .backbones import Backbone
from .data import SKIP_HINT, ImageSplit, UnreadableImageError
from .decode import device_eval_batches
from .errors import UserError
from .io import atomic_write_text
from .runtime import autocast, barrier, dist_info, hide_progress, resolve_precision
from .transforms import TransformSpec

log = logging.getLogger(__name__)

EXTRACTION_VERSION = 1  # bump when extraction semantics change, so old cache entries stop matching
FP16_SAFE_MAX = 60000.0
# A scratch folder of another host (whose processes this one cannot see), or of the old unnamed kind, is stale once
# it is older than this: longer than any extraction runs.
STALE_SCRATCH_S = 2 * 24 * 3600.0
_PART = re.compile(r"^(cls|cls_prenorm|avgpool|patch|last(\d+))$")


@dataclass(frozen=True)
class FeatureSpec:
    """Tokens to take from the backbone, '+'-joined parts concatenated in order.

    cls          CLS after the final norm (ViT) / global-pooled output (CNN): DINO's ``model(x)``
    cls_prenorm  CLS of the last block before the final norm (MSN's few-shot feature)
    lastN        CLS of each of the last N blocks, each through the final norm, concatenated (DINO linear, ViT-S)
    avgpool      mean of the last block's patch tokens after the final norm (ViT) / pooled output (CNN)
    patch        last block's patch tokens after the final norm, shape (N, tokens, D); CNN: the feature map
    """

    text: str = "cls"

    def __post_init__(self) -> None:
        parts = self.parts
        if not parts or any(_PART.match(p) is None for p in parts):
            raise UserError(f"feature spec {self.text!r}; expected '+'-joined parts from cls, cls_prenorm, lastN, avgpool, patch")
        if "patch" in parts and len(parts) > 1:
            raise UserError(f"feature spec {self.text!r}: 'patch' tokens cannot be concatenated with pooled parts")

    @property
    def parts(self) -> list[str]:
        return [p for p in self.text.split("+") if p]

    @property
    def blocks_needed(self) -> int:
        return max([int(m.group(2)) for p in self.parts if (m := _PART.match(p)) and m.group(2)] + [1])


def _vit_features(model: torch.nn.Module, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    blocks = model.forward_intermediates(
        images, indices=spec.blocks_needed, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
    )
    last_patches, last_prefix = blocks[-1]
    outputs = []
    for part in spec.parts:
        if part == "cls_prenorm":
            outputs.append(last_prefix[:, 0])
        elif part == "cls":
            outputs.append(model.norm(last_prefix)[:, 0])
        elif part == "avgpool":
            outputs.append(model.norm(last_patches).mean(dim=1))
        elif part == "patch":
            outputs.append(model.norm(last_patches))
        else:
            count = int(part[4:])
            outputs.append(torch.cat([model.norm(prefix)[:, 0] for _, prefix in blocks[-count:]], dim=-1))
    return torch.cat(outputs, dim=-1)


def _cnn_features(model: torch.nn.Module, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    fmap = model.forward_features(images)
    outputs = []
    for part in spec.parts:
        if part in ("cls", "avgpool") or (part == "cls_prenorm" and getattr(model, "no_final_norm", False)):
            outputs.append(model.forward_head(fmap, pre_logits=True))
        elif part == "patch":
            outputs.append(fmap.flatten(2).transpose(1, 2))
        else:
            raise UserError(f"feature part {part!r} needs a ViT; this backbone is a CNN (use cls, avgpool or patch)")
    return torch.cat(outputs, dim=-1)


def compute_features(backbone: Backbone, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Features of one batch (no grad, whatever precision context the caller set)."""
    if backbone.is_vit:
        return _vit_features(backbone.model, images, spec)
    return _cnn_features(backbone.model, images, spec)


@dataclass
class Features:
    features: np.ndarray  # (N, D) or (N, T, D); float16 unless values overflow it
    labels: np.ndarray  # (N,) int64
    meta: dict
    cached: bool  # True when read from the cache without running the model
    skipped: list[dict] = field(default_factory=list)  # unreadable images left out (index, file, reason)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 on ``device``; the stored dtype crosses to the device first, so host memory holds no fp32 copy."""
        return torch.tensor(np.asarray(self.features)).to(device).float()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSL_BENCH_CACHE", Path.home() / ".cache" / "ssl-bench" / "features"))


def cache_key_fields(backbone: Backbone, split: ImageSplit, transform: TransformSpec, spec: FeatureSpec, precision: str,
                     decode: str = "cpu") -> dict:
    fields = {
        "extraction_version": EXTRACTION_VERSION,
        "weights": backbone.weights_id(),
        "dataset_manifest_sha256": split.manifest_sha256(),
        "transform": transform.key,
        "feature": spec.text,
        "precision": precision,
    }
    if decode == "device":  # its pixels differ from PIL's by a grey level or so: entries of the two never mix
        fields["decode"] = decode
    return fields


DECODES = ("auto", "cpu", "device")


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto``: decode and resize on the device on CUDA (``ssl_bench.decode``), PIL in DataLoader workers on CPU."""
    if decode not in DECODES:
        raise UserError(f"decode={decode!r}; expected one of {', '.join(DECODES)}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return decode


def cache_key(fields: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()



def _shard(n: int, info) -> np.ndarray:
    return np.array_split(np.arange(n), info.world_size)[info.rank]


class _GuardedImages(torch.utils.data.Dataset):
    """(image tensor or None, index, error message) of a split: an unreadable image comes back as its message, so
    the main process decides whether it stops the run or is skipped (a worker's exception would carry its whole
    traceback)."""

    def __init__(self, split: ImageSplit, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(self.split.load_image(index)), index, ""
        except UnreadableImageError as error:
            return None, index, str(error)


def _collate_guarded(batch: list[tuple[torch.Tensor | None, int, str]]
                     ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    good = [(image, index) for image, index, _ in batch if image is not None]
    images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
    return images, torch.tensor([index for _, index in good], dtype=torch.int64), \
        [(index, message) for image, index, message in batch if image is None]


def _batches(split: ImageSplit, transform: TransformSpec, device: torch.device, batch_size: int, workers: int,
             indices: np.ndarray, decode: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]]:
    """(images, split indices of those images, (index, message) of the unreadable ones) per batch."""
    if decode == "device":
        failures: list[tuple[int, str]] = []
        for images, _, index in device_eval_batches(split, transform, device, batch_size, workers, indices.tolist(),
                                                    failures=failures):
            yield images, index, failures[:]
            failures.clear()
        return
    dataset = torch.utils.data.Subset(_GuardedImages(split, transform.build()), indices.tolist())
    yield from torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=_collate_guarded,
    )


def _bad_image_error(message: str, position: int, total: int) -> UnreadableImageError:
    """One line: the file and what the decoder said, how far extraction got, and the way out."""
    return UnreadableImageError(f"{message}; it is image {position + 1} of {total} in split order and the {position} "
                                f"before it read fine; {SKIP_HINT}")


def _run_model(
    backbone: Backbone, split: ImageSplit, transform: TransformSpec, spec: FeatureSpec, device: torch.device,
    precision: str, batch_size: int, workers: int, indices: np.ndarray, desc: str, decode: str = "cpu",
    skipped: list[tuple[int, str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of images ``indices`` and the indices they belong to. An unreadable image raises, or with
    ``skipped`` given is appended there as (index, message) and has no row."""
    backbone.model.to(device).eval()
    chunks: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    batches = _batches(split, transform, device, batch_size, workers, indices, decode)
    with torch.inference_mode(), autocast(device, precision):
        for images, index, failures in tqdm(batches, desc=desc, disable=hide_progress(), leave=False):
            if failures and skipped is None:
                first, message = failures[0]
                raise _bad_image_error(message, int(np.searchsorted(indices, first)), len(indices))
            if failures:
                skipped.extend(failures)
            if len(index):
                out = compute_features(backbone, images.to(device, non_blocking=True), spec)
                chunks.append(out.float().cpu().numpy())
                kept.append(index.numpy())
    if not chunks:
        return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.concatenate(chunks), np.concatenate(kept)


def _check_finite(features: np.ndarray, backbone: Backbone, desc: str, shard: str) -> None:
    """Non-finite features (NaN weights, an overflow) would be cached and scored as if they were real: refuse."""
    rows = features.reshape(len(features), -1)
    bad = int((~np.isfinite(rows).all(axis=1)).sum()) if rows.size else 0
    if bad:
        source = f" (checkpoint {backbone.ckpt_path})" if backbone.ckpt_path else ""
        raise UserError(f"features of {backbone.label}{source} on {desc} are not finite: {bad} of {len(rows)} "
                        f"rows{shard} hold NaN or inf; nothing was cached (expected finite weights)")


def _skip_report(split: ImageSplit, skipped: list[tuple[int, str]]) -> list[dict]:
    return [{"index": int(i), "file": split.describe(int(i)), "reason": message} for i, message in sorted(skipped)]


def _note_skipped(split: ImageSplit, skipped: list[dict], desc: str) -> None:
    """Never silent: a warning now, and the names on the split for the result rows' params."""
    split.skipped_images = tuple(item["file"] for item in skipped)
    if skipped and dist_info().is_main:
        shown = "; ".join(item["reason"] for item in skipped[:3])  # each names its file
        log.warning("%s: %d of %d images are unreadable and were left out (--skip-bad-images): %s%s", desc,
                    len(skipped), len(split), shown, " ..." if len(skipped) > 3 else "")


def _storage_dtype(array: np.ndarray) -> np.dtype:
    return np.float16 if (array.size == 0 or np.abs(array).max() < FP16_SAFE_MAX) else np.float32


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


_SCRATCH = re.compile(r"^\.extract-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def _shared_tmpdir(parent: Path) -> Path:
    """A scratch folder every rank agrees on (rank 0 makes it, the others receive its path). Its name holds rank
    0's host and pid, so a later run can tell a folder left by a dead process from one still being filled."""
    info = dist_info()
    prefix = f".extract-{_host()}-{os.getpid()}-"
    holder = [str(Path(tempfile.mkdtemp(prefix=prefix, dir=parent))) if info.is_main else ""]
    if info.world_size > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def scratch_is_stale(path: Path, now: float | None = None) -> bool:
    """A ``.extract-*`` folder no live extraction holds: on this host, its process is gone; from another host (or
    unnamed), it is older than ``STALE_SCRATCH_S``."""
    match = _SCRATCH.match(path.name)
    if match and match["host"] == _host():
        return not _pid_alive(int(match["pid"]))
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_SCRATCH_S


def clean_stale_scratch(root: Path) -> int:
    """Remove the scratch folders that failed or killed extractions left in the cache; returns how many."""
    removed = 0
    try:
        candidates = [Path(entry.path) for entry in os.scandir(root)
                      if entry.name.startswith(".extract-") and entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for path in candidates:
        if scratch_is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
    if removed:
        log.info("removed %d stale extraction folder(s) from %s", removed, root)
    return removed



def _read_entry(entry: Path) -> Features:
    meta = json.loads((entry / "meta.json").read_text())
    return Features(np.load(entry / "features.npy", mmap_mode="r"), np.load(entry / "labels.npy"), meta, cached=True,
                    skipped=list(meta.get("skipped", [])))


def _where(split: ImageSplit, index: int) -> str:
    """The file an error message names: its full path where the split has one."""
    paths = getattr(split, "paths", None)
    return str(paths[index]) if paths is not None else split.describe(index)


def _precheck(split: ImageSplit, skip: bool, desc: str) -> list[tuple[int, str]]:
    """The cheap checks, before the model runs: fail on the first bad file unless skipping."""
    bad = split.precheck()
    if bad and not skip:
        index, reason = bad[0]
        raise UnreadableImageError(f"{len(bad)} of the {len(split)} files of {desc} checked are unreadable before "
                                   f"decoding; the first is {_where(split, index)} ({reason}); {SKIP_HINT}")
    return bad


def extract(
    backbone: Backbone,
    split: ImageSplit,
    spec: FeatureSpec | str = "cls",
    transform: TransformSpec | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 2,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    desc: str = "features",
    decode: str = "cpu",
) -> Features:
    """Features of every image of ``split``, in split order, on every rank. ``decode``: where images are decoded
    and resized (``resolve_decode``).

    An unreadable image stops extraction with one line naming it, unless the split opts in to skipping
    (``split.skip_bad_images``): then it has no row, and ``Features.skipped`` and a warning say which were left out.
    Non-finite features are refused, never cached. Stale scratch folders of dead extractions are removed.

    Under torchrun each rank runs its contiguous shard; shards meet in a folder under ``cache_dir``
    (which must be shared by the ranks: one node, or a shared filesystem)."""
    spec = FeatureSpec(spec) if isinstance(spec, str) else spec
    transform = transform or TransformSpec("eval_dino", backbone.input_size)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    decode = resolve_decode(decode, device)
    use_cache = use_cache and transform.deterministic
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    skip = bool(split.skip_bad_images)
    fields = cache_key_fields(backbone, split, transform, spec, precision, decode)
    if skip:  # its entries hold fewer rows than the split: they never answer a run that does not skip
        fields["skip_bad_images"] = True
    key = cache_key(fields)
    entry = root / key[:2] / key
    info = dist_info()
    if info.is_main:
        clean_stale_scratch(root)
    if use_cache and (entry / "meta.json").is_file():
        log.info("feature cache hit %s (%s)", key[:12], desc)
        result = _read_entry(entry)
        _note_skipped(split, result.skipped, desc)
        return result
    upfront = _precheck(split, skip, desc)

    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    scratch = _shared_tmpdir(root)
    try:
        result = _extract_into(scratch, entry, backbone, split, transform, spec, device, precision, batch_size,
                               workers, desc, decode, use_cache, fields, key, start, upfront if skip else None)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # a failed extraction leaves nothing behind
        raise
    barrier()
    if info.is_main and scratch.exists():
        shutil.rmtree(scratch, ignore_errors=True)
    _note_skipped(split, result.skipped, desc)
    return result


def _extract_into(
    scratch: Path, entry: Path, backbone: Backbone, split: ImageSplit, transform: TransformSpec, spec: FeatureSpec,
    device: torch.device, precision: str, batch_size: int, workers: int, desc: str, decode: str, use_cache: bool,
    fields: dict, key: str, start: float, upfront: list[tuple[int, str]] | None,
) -> Features:
    """Each rank's shard into ``scratch``; rank 0 joins them and publishes the entry. ``upfront``: None when
    unreadable images stop the run, else the images already known to be unreadable (skipped without reading)."""
    info = dist_info()
    indices = _shard(len(split), info)
    skipped: list[tuple[int, str]] | None = None
    if upfront is not None:
        known = np.asarray([i for i, _ in upfront], dtype=np.int64)
        mine = set(indices.tolist())
        skipped = [(i, reason) for i, reason in upfront if i in mine]
        indices = indices[~np.isin(indices, known)]
    shard, kept = _run_model(backbone, split, transform, spec, device, precision, batch_size, workers, indices, desc,
                             decode, skipped)
    _check_finite(shard, backbone, desc, f" of rank {info.rank}'s shard" if info.world_size > 1 else "")
    np.save(scratch / f"shard-{info.rank:05d}.npy", shard)
    np.save(scratch / f"kept-{info.rank:05d}.npy", kept)
    atomic_write_text(scratch / f"skipped-{info.rank:05d}.json", json.dumps(skipped or []))
    barrier()
    if info.is_main:
        shards = [np.load(scratch / f"shard-{r:05d}.npy") for r in range(info.world_size)]
        kept = np.concatenate([np.load(scratch / f"kept-{r:05d}.npy") for r in range(info.world_size)])
        left_out = sorted(tuple(item) for r in range(info.world_size)
                          for item in json.loads((scratch / f"skipped-{r:05d}.json").read_text()))
        features = np.concatenate([s for s in shards if s.size]) if any(s.size for s in shards) else shards[0]
        if len(features) != len(kept) or len(kept) + len(left_out) != len(split):
            raise RuntimeError(f"extracted {len(features)} features, {len(left_out)} skipped, for {len(split)} images")
        features = features.astype(_storage_dtype(features))
        meta = {**fields, "key": key, "shape": list(features.shape), "dtype": str(features.dtype),
                "world_size": info.world_size, "extract_s": round(time.time() - start, 3)}
        if upfront is not None:
            meta.update(images=len(split), skipped=_skip_report(split, left_out))
        np.save(scratch / "features.npy", features)
        np.save(scratch / "labels.npy", split.labels[kept])
        atomic_write_text(scratch / "meta.json", json.dumps(meta, indent=1))
        for r in range(info.world_size):
            for name in (f"shard-{r:05d}.npy", f"kept-{r:05d}.npy", f"skipped-{r:05d}.json"):
                (scratch / name).unlink()
        if use_cache:
            entry.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(scratch, entry)  # atomic publish; another process may have won the race
            except OSError:
                pass
    barrier()
    if use_cache and (entry / "meta.json").is_file():
        result = _read_entry(entry)
    else:
        result = _read_entry(scratch)
        result.features = np.array(result.features)
    result.cached = False
    return result

"""Frozen-backbone features: which tokens to take (FeatureSpec), batched extraction sharded over torchrun ranks,
and a content-addressed on-disk cache so a second task on the same features never runs the model again."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .backbones import Backbone
from .data import ImageSplit
from .decode import device_eval_batches
from .errors import UserError
from .io import atomic_write_text
from .runtime import autocast, barrier, dist_info, hide_progress, resolve_precision
from .transforms import TransformSpec

log = logging.getLogger(__name__)

EXTRACTION_VERSION = 1  # bump when extraction semantics change, so old cache entries stop matching
FP16_SAFE_MAX = 60000.0
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
        if part in ("cls", "avgpool"):
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


def _run_model(
    backbone: Backbone, split: ImageSplit, transform: TransformSpec, spec: FeatureSpec, device: torch.device,
    precision: str, batch_size: int, workers: int, indices: np.ndarray, desc: str, decode: str = "cpu",
) -> np.ndarray:
    if decode == "device":
        loader = device_eval_batches(split, transform, device, batch_size, workers, indices.tolist())
    else:
        dataset = torch.utils.data.Subset(split.with_transform(transform.build()), indices.tolist())
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        )
    backbone.model.to(device).eval()
    chunks: list[np.ndarray] = []
    with torch.inference_mode(), autocast(device, precision):
        for images, _, _ in tqdm(loader, desc=desc, disable=hide_progress(), leave=False):
            out = compute_features(backbone, images.to(device, non_blocking=True), spec)
            chunks.append(out.float().cpu().numpy())
    if not chunks:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(chunks)


def _storage_dtype(array: np.ndarray) -> np.dtype:
    return np.float16 if (array.size == 0 or np.abs(array).max() < FP16_SAFE_MAX) else np.float32


def _shared_tmpdir(parent: Path) -> Path:
    """A scratch folder every rank agrees on (rank 0 makes it, the others receive its path)."""
    info = dist_info()
    holder = [str(Path(tempfile.mkdtemp(prefix=".extract-", dir=parent))) if info.is_main else ""]
    if info.world_size > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])



def _read_entry(entry: Path) -> Features:
    meta = json.loads((entry / "meta.json").read_text())
    return Features(np.load(entry / "features.npy", mmap_mode="r"), np.load(entry / "labels.npy"), meta, cached=True)


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

    Under torchrun each rank runs its contiguous shard; shards meet in a folder under ``cache_dir``
    (which must be shared by the ranks: one node, or a shared filesystem)."""
    spec = FeatureSpec(spec) if isinstance(spec, str) else spec
    transform = transform or TransformSpec("eval_dino", backbone.input_size)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    decode = resolve_decode(decode, device)
    use_cache = use_cache and transform.deterministic
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fields = cache_key_fields(backbone, split, transform, spec, precision, decode)
    key = cache_key(fields)
    entry = root / key[:2] / key
    if use_cache and (entry / "meta.json").is_file():
        log.info("feature cache hit %s (%s)", key[:12], desc)
        return _read_entry(entry)

    info = dist_info()
    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    scratch = _shared_tmpdir(root)
    indices = _shard(len(split), info)
    shard = _run_model(backbone, split, transform, spec, device, precision, batch_size, workers, indices, desc, decode)
    np.save(scratch / f"shard-{info.rank:05d}.npy", shard)
    barrier()
    if info.is_main:
        shards = [np.load(scratch / f"shard-{r:05d}.npy") for r in range(info.world_size)]
        features = np.concatenate([s for s in shards if s.size]) if any(s.size for s in shards) else shards[0]
        if len(features) != len(split):
            raise RuntimeError(f"extracted {len(features)} features for {len(split)} images")
        features = features.astype(_storage_dtype(features))
        meta = {**fields, "key": key, "shape": list(features.shape), "dtype": str(features.dtype),
                "world_size": info.world_size, "extract_s": round(time.time() - start, 3)}
        np.save(scratch / "features.npy", features)
        np.save(scratch / "labels.npy", split.labels)
        atomic_write_text(scratch / "meta.json", json.dumps(meta, indent=1))
        for r in range(info.world_size):
            (scratch / f"shard-{r:05d}.npy").unlink()
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
    barrier()
    if info.is_main and scratch.exists():
        shutil.rmtree(scratch, ignore_errors=True)
    return result

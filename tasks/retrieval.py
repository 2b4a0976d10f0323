"""Revisited Oxford / Paris image retrieval with DINO's features (``dino/eval_image_retrieval.py``, protocols.md §6).

Each image is thumbnailed to ``imsize`` (never upscaled), fed whole at batch size 1 through the any-size ViT
forward (``ssl_bench.dense.vit_tokens``: CLS after the final norm, DINO's position-embedding interpolation),
optionally at scales {1, 1/sqrt 2, 1/2} averaged, and L2-normalised; the database is ranked by cosine similarity
and scored with revisitop's Easy / Medium / Hard mAP and mP@{1, 5, 10} (``ssl_bench.retrieval_metrics``).

Data layout (revisitop's), under the folder given by ``--data-root``:
``ROOT/roxford5k/gnd_roxford5k.pkl`` + ``ROOT/roxford5k/jpg/<name>.jpg``, the same for ``rparis6k``;
``ROOT/datasets/<name>/`` (where revisitop's downloader puts them) is accepted as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageFile
from tqdm import tqdm

from ssl_bench.backbones import Backbone
from ssl_bench.context import TaskContext
from ssl_bench.dense import vit_tokens
from ssl_bench.errors import UserError
from ssl_bench.features import cache_key, default_cache_dir
from ssl_bench.io import atomic_write_text, sha256_file
from ssl_bench.options import check_at_least, check_ints_at_least
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.retrieval_metrics import DEFAULT_KAPPAS, PROTOCOLS, evaluate_protocols, rank_database
from ssl_bench.runtime import autocast, dist_info, hide_progress, resolve_precision

log = logging.getLogger(__name__)

RETRIEVAL_VERSION = "dino-revisitop-v1"
EXTRACTION_VERSION = 1  # bump when the image -> feature path changes, so old cache entries stop matching
# Per-dataset (imsize, multiscale): dino's README settings, published for its Google-Landmarks-v2 model; taking them
# for ImageNet checkpoints is an assumption (protocols.md §12.5, §13), recorded in every row.
DATASET_DEFAULTS: dict[str, tuple[int, bool]] = {"roxford5k": (224, False), "rparis6k": (512, True)}
MULTI_SCALES: tuple[float, ...] = (1.0, 1 / 2 ** 0.5, 1 / 2)  # dino's [1, 1/2**(1/2), 1/2]
SINGLE_SCALE: tuple[float, ...] = (1.0,)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SETTINGS_NOTE = ("per-dataset defaults = dino README (RParis 512 + multiscale, ROxford 224 single scale), published for "
                 "its GLDv2 model: an assumption for other checkpoints (protocols.md §13)")
LAYOUT = "ROOT/<name>/gnd_<name>.pkl and ROOT/<name>/jpg/<image>.jpg (or ROOT/datasets/<name>/...)"


# --- data ---------------------------------------------------------------------------------------------------------

@dataclass
class RetrievalSet:
    """One revisitop dataset: database and query image names, per-query ground truth, and where the files are."""

    name: str
    folder: Path
    db_names: list[str]
    query_names: list[str]
    gnd: list[dict]
    gnd_sha256: str = ""

    def image_path(self, name: str) -> Path:
        return self.folder / "jpg" / f"{name}.jpg"

    @property
    def db_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.db_names]

    @property
    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.query_names]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        """Each query's bbx [x1, y1, x2, y2] in the pixels of its full image."""
        boxes = []
        for i, query in enumerate(self.gnd):
            try:
                box = np.asarray(query["bbx"], dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                box = np.zeros(0)
            if box.shape != (4,) or not np.isfinite(box).all():
                raise UserError(f"{self.name}: gnd[{i}]['bbx'] = {query['bbx']!r}; expected [x1, y1, x2, y2]")
            boxes.append(tuple(float(v) for v in box))
        return boxes


def find_dataset_folder(root: str | os.PathLike, name: str) -> Path:
    """``ROOT/<name>`` or ``ROOT/datasets/<name>``, whichever holds ``gnd_<name>.pkl``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"retrieval data root {root} is not a folder; expected {LAYOUT}")
    candidates = [root / name, root / "datasets" / name]
    for folder in candidates:
        if (folder / f"gnd_{name}.pkl").is_file():
            return folder
    raise UserError(
        f"{name}: ground-truth file {candidates[0] / f'gnd_{name}.pkl'} not found (nor {candidates[1] / f'gnd_{name}.pkl'}); "
        f"expected {LAYOUT}. Pick the datasets present with -p datasets=roxford5k,rparis6k"
    )


def load_retrieval_set(root: str | os.PathLike, name: str, check_images: bool = True) -> RetrievalSet:
    """Read ``gnd_<name>.pkl`` (imlist, qimlist, gnd with bbx/easy/hard/junk) and check every image file exists."""
    folder = find_dataset_folder(root, name)
    gnd_path = folder / f"gnd_{name}.pkl"
    try:
        with open(gnd_path, "rb") as handle:
            cfg = pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
        raise UserError(f"{gnd_path}: cannot read the ground-truth pickle ({error})") from None
    missing = [key for key in ("imlist", "qimlist", "gnd") if not isinstance(cfg, dict) or key not in cfg]
    if missing:
        raise UserError(f"{gnd_path}: no {', '.join(missing)}; expected a dict with imlist, qimlist and gnd")
    db_names, query_names, gnd = [str(n) for n in cfg["imlist"]], [str(n) for n in cfg["qimlist"]], list(cfg["gnd"])
    if len(gnd) != len(query_names):
        raise UserError(f"{gnd_path}: {len(query_names)} query names (qimlist) but {len(gnd)} ground-truth entries (gnd)")
    if not db_names or not query_names:
        raise UserError(f"{gnd_path}: empty imlist or qimlist")
    for i, query in enumerate(gnd):
        absent = [key for key in ("bbx", "easy", "hard", "junk") if not isinstance(query, dict) or key not in query]
        if absent:
            raise UserError(f"{gnd_path}: gnd[{i}] has no {', '.join(absent)} (expected bbx, easy, hard, junk)")
        for key in ("easy", "hard", "junk"):
            ids = np.asarray(query[key], dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= len(db_names)):
                raise UserError(f"{gnd_path}: gnd[{i}][{key!r}] has index {int(ids.max())} outside imlist "
                                f"(0..{len(db_names) - 1})")
    dataset = RetrievalSet(name, folder, db_names, query_names, gnd, sha256_file(gnd_path))
    if check_images:
        paths = dataset.db_paths + dataset.query_paths
        absent_files = [p for p in paths if not p.is_file()]
        if absent_files:
            raise UserError(f"{name}: image {absent_files[0]} not found ({len(absent_files)} of {len(paths)} images "
                            f"missing); expected {LAYOUT}")
    return dataset


# --- images and features ------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike, imsize: int, bbx: Sequence[float] | None = None) -> Image.Image:
    """RGB image, cropped to ``bbx`` [x1, y1, x2, y2] (original pixels) if given, then thumbnailed in place so that
    its longer side is at most ``imsize`` (aspect kept, LANCZOS, never upscaled), as dino does (ANTIALIAS = LANCZOS)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # dino loads truncated JPEGs rather than failing
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path} ({error})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if bbx is not None:
        width, height = image.size
        x1, y1, x2, y2 = (int(round(v)) for v in bbx)
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x2 <= x1 or y2 <= y1:
            raise UserError(f"query box {list(bbx)} of {path} is empty inside the {width}x{height} image")
        image = image.crop((x1, y1, x2, y2))
    image.thumbnail((imsize, imsize), Image.LANCZOS)
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32: ToTensor (/255) then ImageNet Normalize."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return (array - mean) / std


def _global_feature(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """DINO's ``model(x)`` at any size: the CLS after the final norm (ViT), the pooled output (CNN)."""
    if backbone.is_vit:
        return vit_tokens(backbone, images)[0]
    return backbone.model(images)


def image_feature(backbone: Backbone, image: torch.Tensor, scales: Sequence[float] = SINGLE_SCALE) -> torch.Tensor:
    """Unit-norm feature [B, D] of normalised images [B, 3, H, W]: the mean of the features at each scale (s < 1:
    bilinear resize of the normalised tensor, align_corners False), divided by its L2 norm."""
    total = None
    for scale in scales:
        x = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        feature = _global_feature(backbone, x).float()
        total = feature if total is None else total + feature
    mean = total / len(scales)
    return F.normalize(mean, dim=-1, p=2)


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], imsize: int, boxes: Sequence | None) -> None:
        self.paths, self.imsize, self.boxes = list(paths), imsize, boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        box = self.boxes[index] if self.boxes is not None else None
        return image_tensor(load_image(self.paths[index], self.imsize, box))


def _check_size(shape: Sequence[int], scales: Sequence[float], patch: int | None, path: Path) -> None:
    height, width = shape[-2:]
    smallest = min(math.floor(height * min(scales)), math.floor(width * min(scales)))
    if patch and smallest < patch:
        raise UserError(f"image {path} ({width}x{height} after the thumbnail) is smaller than one {patch}-pixel patch "
                        f"at scale {min(scales):.3f}")


def _run_model(backbone: Backbone, paths: Sequence[Path], imsize: int, scales: Sequence[float],
               boxes: Sequence | None, device: torch.device, precision: str, workers: int,
               indices: np.ndarray, desc: str) -> np.ndarray:
    """Features [len(indices), D] float32, one image at a time (their sizes differ)."""
    subset = torch.utils.data.Subset(_ImageList(paths, imsize, boxes), indices.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=1, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    backbone.model.to(device).eval()
    rows: list[np.ndarray] = []
    with torch.inference_mode(), autocast(device, precision):
        for row, image in enumerate(tqdm(loader, desc=desc, disable=hide_progress(), leave=False)):
            _check_size(image.shape, scales, backbone.patch_size, paths[int(indices[row])])
            feature = image_feature(backbone, image.to(device, non_blocking=True), scales)
            rows.append(feature.float().cpu().numpy())
    if not rows:
        return np.zeros((0, backbone.embed_dim), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


def _gather(local: np.ndarray, indices: np.ndarray, total: int) -> np.ndarray:
    """Every rank's rows put back in order, on every rank (torchrun); the local rows alone otherwise."""
    info = dist_info()
    if info.world_size == 1:
        return local
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, (indices, local))
    dim = next(part[1].shape[1] for part in parts if part[1].size)
    out = np.zeros((total, dim), dtype=np.float32)
    for part_indices, part in parts:
        if part.size:
            out[part_indices] = part
    return out


def extract_features(
    backbone: Backbone, paths: Sequence[Path], imsize: int, scales: Sequence[float] = SINGLE_SCALE,
    boxes: Sequence | None = None, device: torch.device | str = "cpu", precision: str = "auto", workers: int = 0,
    desc: str = "retrieval features",
) -> np.ndarray:
    """L2-normalised features [N, D] float32 of the images at ``paths`` (DINO's retrieval recipe, §6.2).

    Under torchrun each rank runs every world_size-th image and the rows are gathered on every rank."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
    info = dist_info()
    indices = np.arange(len(paths))[info.rank::info.world_size]
    local = _run_model(backbone, paths, imsize, scales, boxes, device, precision, workers, indices, desc)
    features = _gather(local, indices, len(paths))
    # dino normalises every DB and query row once more after extraction; a no-op up to rounding here.
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


# --- feature cache ------------------------------------------------------------------------------------------------

def _images_sha256(paths: Sequence[Path], boxes: Sequence | None) -> str:
    """Names and byte sizes of the images (and the query boxes): cheap, and a different image release (the
    face-blurred v1 files, say) changes the sizes."""
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        digest.update(f"{path.name}\t{path.stat().st_size}".encode())
        if boxes is not None:
            digest.update(("\t" + ",".join(f"{v:.3f}" for v in boxes[i])).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cached_features(
    backbone: Backbone, paths: Sequence[Path], imsize: int, scales: Sequence[float], boxes: Sequence | None,
    device: torch.device | str, precision: str, workers: int, cache_dir: str | os.PathLike | None,
    use_cache: bool, desc: str,
) -> tuple[np.ndarray, bool]:
    """``extract_features`` through an on-disk cache keyed on the weights, the image names + sizes (+ boxes) and the
    extraction settings (Pillow's version included: its thumbnail changed across versions). Returns (features,
    whether they came from the cache)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    fields = {
        "kind": "revisitop-retrieval", "extraction_version": EXTRACTION_VERSION, "weights": backbone.weights_id(),
        "images_sha256": _images_sha256(paths, boxes), "n_images": len(paths), "imsize": imsize,
        "scales": [float(s) for s in scales], "precision": precision, "pillow": PIL.__version__, "feature": "cls",
    }
    key = cache_key(fields)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / key[:2] / key
    if _main_decides(use_cache and (entry / "meta.json").is_file()):
        log.info("retrieval feature cache hit %s (%s)", key[:12], desc)
        return np.load(entry / "features.npy"), True
    features = extract_features(backbone, paths, imsize, scales, boxes, device, precision, workers, desc)
    if use_cache and dist_info().is_main:
        _publish(root, entry, features, {**fields, "key": key, "shape": list(features.shape)})
    return features, False


def _main_decides(flag: bool) -> bool:
    """Rank 0's answer on every rank (torchrun), so that all ranks take the same branch around a collective."""
    if dist_info().world_size == 1:
        return flag
    holder = [flag]
    dist.broadcast_object_list(holder, src=0)
    return bool(holder[0])


def _publish(root: Path, entry: Path, features: np.ndarray, meta: dict) -> None:
    """Write into a scratch folder and rename it into place: readers see a whole entry or none."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".retrieval-", dir=root))
    try:
        np.save(scratch / "features.npy", features.astype(np.float32))
        atomic_write_text(scratch / "meta.json", json.dumps(meta, indent=1))
        entry.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process may have published the same entry first
            os.rename(scratch, entry)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


# --- the task -----------------------------------------------------------------------------------------------------

@dataclass
class RetrievalParams:
    datasets: tuple[str, ...] = ("roxford5k", "rparis6k")
    imsize: int | None = None  # None: per dataset (RParis 512, ROxford 224)
    multiscale: bool | None = None  # None: per dataset (RParis yes, ROxford no)
    crop_query: bool = False  # crop queries to their bbx (revisitop-correct; dino does not)
    kappas: tuple[int, ...] = DEFAULT_KAPPAS


@dataclass
class DatasetSettings:
    imsize: int
    multiscale: bool
    source: dict = field(default_factory=dict)  # which setting came from an option, which from the defaults

    @property
    def scales(self) -> tuple[float, ...]:
        return MULTI_SCALES if self.multiscale else SINGLE_SCALE


def dataset_settings(name: str, params: RetrievalParams) -> DatasetSettings:
    """imsize / multiscale for ``name``: the options when given, else the per-dataset defaults (§12.5)."""
    if name not in DATASET_DEFAULTS:
        raise UserError(f"retrieval dataset {name!r}; expected one of {', '.join(DATASET_DEFAULTS)}")
    imsize, multiscale = DATASET_DEFAULTS[name]
    if params.imsize is not None and params.imsize < 1:
        raise UserError(f"retrieval imsize must be >= 1; got {params.imsize}")
    return DatasetSettings(
        imsize=params.imsize if params.imsize is not None else imsize,
        multiscale=params.multiscale if params.multiscale is not None else multiscale,
        source={"imsize": "option" if params.imsize is not None else "default",
                "multiscale": "option" if params.multiscale is not None else "default"},
    )


def check_params(params: RetrievalParams) -> None:
    """The options alone, before any model or data."""
    if not params.datasets:
        raise UserError("retrieval: datasets is empty; give roxford5k, rparis6k or both")
    unknown = [name for name in params.datasets if name not in DATASET_DEFAULTS]
    if unknown:
        raise UserError(f"retrieval dataset {unknown[0]!r}; expected one of {', '.join(DATASET_DEFAULTS)}")
    check_at_least("retrieval.imsize", params.imsize, 1)
    check_ints_at_least("retrieval.kappas", params.kappas, 1)


def data_root(ctx: TaskContext) -> Path:
    """The folder holding roxford5k/ and rparis6k/ (or datasets/...), from ``--data-root``."""
    root = ctx.extra.get("data_root") or ""
    if not root:
        raise UserError("retrieval needs the revisitop data folder: --data-root PATH (the folder holding roxford5k/ "
                        "and rparis6k/, or datasets/roxford5k/ ...)")
    return Path(root).expanduser()


@register_task(
    "retrieval", version=RETRIEVAL_VERSION, params=RetrievalParams, needs=("data_root",), check=check_params,
    description="Revisited Oxford/Paris retrieval (DINO features, revisitop metric): mAP E/M/H and mP@1/5/10",
)
def run(ctx: TaskContext, params: RetrievalParams) -> list[ResultRow]:
    if not params.datasets:
        raise UserError("retrieval: datasets is empty; give roxford5k, rparis6k or both")
    root = data_root(ctx)
    settings = {name: dataset_settings(name, params) for name in params.datasets}
    sets = {name: load_retrieval_set(root, name) for name in params.datasets}  # every layout checked before any model run
    precision = resolve_precision(ctx.precision, ctx.device)
    rows: list[ResultRow] = []
    for name, data in sets.items():
        setting = settings[name]
        common = dict(imsize=setting.imsize, scales=setting.scales, device=ctx.device, precision=precision,
                      workers=ctx.workers, cache_dir=ctx.cache_dir, use_cache=ctx.use_cache)
        db, db_cached = cached_features(ctx.backbone, data.db_paths, boxes=None, desc=f"{name} database", **common)
        queries, q_cached = cached_features(ctx.backbone, data.query_paths,
                                            boxes=data.query_boxes if params.crop_query else None,
                                            desc=f"{name} queries", **common)
        ranks = rank_database(db, queries)
        results = evaluate_protocols(ranks, data.gnd, PROTOCOLS, params.kappas)
        base = {
            "imsize": setting.imsize, "multiscale": setting.multiscale, "scales": [round(s, 6) for s in setting.scales],
            "crop_query": params.crop_query, "settings_source": setting.source, "settings_note": SETTINGS_NOTE,
            "feature": "cls (after the final norm), L2-normalised", "precision": precision,
            "pillow_version": PIL.__version__, "n_db": len(data.db_names), "n_queries": len(data.query_names),
            "gnd_sha256": data.gnd_sha256, "layout": str(data.folder.relative_to(root)),
            "features_cached": bool(db_cached and q_cached), "kappas": list(params.kappas),
        }
        for protocol in PROTOCOLS:
            result = results[protocol]
            extra = {**base, "protocol_gt": protocol, "n_empty": result["n_empty"]}
            metrics = [(f"mAP_{protocol}", result["mAP"])]
            metrics += [(f"mP@{k}_{protocol}", value) for k, value in result["mP@k"].items()]
            for metric, value in metrics:
                rows.append(ctx.row(task="retrieval", protocol=RETRIEVAL_VERSION, split="test", metric=metric,
                                    value=100.0 * value, params=extra, n=result["n_queries"], dataset=name))
        log.info("%s (imsize %d, %s): mAP E %.2f, M %.2f, H %.2f", name, setting.imsize,
                 "multiscale" if setting.multiscale else "single scale",
                 *(100.0 * results[p]["mAP"] for p in PROTOCOLS))
    return rows

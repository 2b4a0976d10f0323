"""DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO's
``eval_video_segmentation``, protocols.md §7), scored by ``ssl_bench.davis_eval``.

Each frame's patch tokens (last block, after the final norm) are compared by cosine with those of the first
frame and of the 7 previous frames; a target token takes the labels of its 5 most similar source tokens over all
those frames jointly, weighted by exp(cos / 0.1), among sources within +-12 grid cells. Departures from the
reference that do not change its answers: the neighbourhood window is a broadcast of a row test and a column test
(the reference fills a (hw)^2 tensor in four Python loops, 4.9 s per video on its GPU machine); targets are taken
in tiles (12x12 cells on the CPU, bands of whole rows on a GPU), each against only the source cells its windows
can reach, so that at most ``chunk_elements`` affinities exist at once, whatever the frame width or patch size.
Measured with ``benchmarks/davis_propagation.py`` (ViT-S/16, 8 context frames, this 2-core CPU under other load,
2 threads): 832x480 245 ms per frame and +20 MiB, against 803 ms and +247 MiB for the whole-matrix step; 1152x480
669 ms and +54 MiB against 1948 ms and +378 MiB; the same labels on every cell. The ViT forward runs at the
context's precision (bf16 autocast on CUDA by default), the affinities in strict fp32; no device is hard-wired.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ssl_bench.backbones import Backbone
from ssl_bench.context import TaskContext
from ssl_bench.davis_eval import VOID, DavisLayout, evaluate, write_csvs
from ssl_bench.dense import vit_tokens
from ssl_bench.errors import UserError
from ssl_bench.palette import read_label_png, save_label_png
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.runtime import autocast, barrier, dist_info, hide_progress, resolve_precision, strict_fp32

log = logging.getLogger(__name__)

DAVIS_VERSION = "dino-davis-v1"
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)  # DINO's DAVIS normalisation: 0.228, not 0.229, for red
# Affinity elements (target tokens x context frames x source tokens) held at once: 2^24 fp32 = 64 MiB, plus a
# quarter of that for the comparison mask. On a GPU (bands of whole rows) a 480x1152 frame with 8 context frames
# then runs in 3 bands at /16 (30x72 cells) and 12 at /8 (60x144); the CPU's 12x12 tiles stay far below it.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PropagationSettings:
    """DINO's defaults (``eval_video_segmentation.py``); ``size_mask_neighborhood`` 0 turns the window off."""

    topk: int = 5
    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    temperature: float = 0.1
    scale_size: int = 480
    frame_batch: int = 8  # frames per ViT forward; does not change the answers beyond float rounding
    chunk_elements: int = CHUNK_ELEMENTS

    def check(self) -> None:
        if self.topk < 1:
            raise UserError(f"davis topk must be >= 1; got {self.topk}")
        if self.n_last_frames < 0:
            raise UserError(f"davis n_last_frames must be >= 0; got {self.n_last_frames}")
        if self.size_mask_neighborhood < 0:
            raise UserError("davis size_mask_neighborhood must be >= 0 (0 = no window); "
                            f"got {self.size_mask_neighborhood}")
        if not self.temperature > 0:
            raise UserError(f"davis temperature must be > 0; got {self.temperature}")
        if self.scale_size < 64:
            raise UserError(f"davis scale_size must be >= 64 (sides are snapped to multiples of 64); "
                            f"got {self.scale_size}")
        if self.frame_batch < 1 or self.chunk_elements < 1:
            raise UserError("davis frame_batch and chunk_elements must be >= 1")


# --------------------------------------------------------------------------------------------- frames and masks (§7.2)

def target_size(height: int, width: int, scale_size: int = 480) -> tuple[int, int]:
    """(th, tw): the short side becomes ``scale_size``, the long side ``floor(scaled / 64) * 64``.

    854x480 -> 832x480, 910 -> 896, 1152 -> 1152. The reference branches differently for frames and masks when
    height == width; here one rule (the frames') serves both.
    """
    if height > width:
        th, tw = int((scale_size * height / width) // 64 * 64), scale_size
    else:
        th, tw = scale_size, int((scale_size * width / height) // 64 * 64)
    if th < 1 or tw < 1:
        raise UserError(f"a {width}x{height} frame at scale_size {scale_size} has no side left after snapping to 64")
    return th, tw


def read_frame(path: str | Path, scale_size: int = 480) -> tuple[np.ndarray, tuple[int, int]]:
    """Normalised RGB frame [3, th, tw] float32 and the original (height, width).

    OpenCV read (BGR uint8), ``cv2.resize`` (bilinear), /255, BGR -> RGB, mean (0.485, 0.456, 0.406), std (0.228,
    0.224, 0.225).
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read DAVIS frame {path} (missing or not an image)")
    height, width = image.shape[:2]
    th, tw = target_size(height, width, scale_size)
    image = cv2.resize(image, (tw, th)).astype(np.float32) / 255.0
    image = image[:, :, ::-1].transpose(2, 0, 1)
    image = (image - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]
    return np.ascontiguousarray(image, dtype=np.float32), (height, width)


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """One-hot labels [rows * cols, C] of the first mask resized with NEAREST to the feature grid, and C.

    C = largest id left after resizing + 1 (background = channel 0); an object too small to survive the
    resizing can never be predicted (as in the reference). Void (255) counts as background here; the reference
    would make 256 channels of it.
    """
    rows, cols = grid
    small = np.array(Image.fromarray(mask).resize((cols, rows), Image.NEAREST))
    small[small == VOID] = 0
    channels = int(small.max()) + 1
    labels = torch.from_numpy(small.astype(np.int64)).reshape(-1)
    return F.one_hot(labels, channels).float(), channels


# --------------------------------------------------------------------------------------------- propagation (§7.4)

def neighbourhood_mask(rows: int, cols: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [rows*cols, rows*cols]: source cell j lies within +-size rows and columns of target cell i.

    The window is separable: a (rows x rows) test on row indices and a (cols x cols) one on column indices,
    broadcast together; the reference fills the same matrix cell by cell in four Python loops.
    """
    near_rows = _near(torch.arange(rows, device=device), torch.arange(rows, device=device), size)
    near_cols = _near(torch.arange(cols, device=device), torch.arange(cols, device=device), size)
    return (near_rows[:, None, :, None] & near_cols[None, :, None, :]).reshape(rows * cols, rows * cols)


def _near(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    return (a[:, None] - b[None, :]).abs() <= size


def _span(start: int, stop: int, size: int, limit: int) -> tuple[int, int]:
    """Source indices [a, b) that a window of +-size around targets [start, stop) can reach (all when size is 0)."""
    return (max(0, start - size), min(limit, stop + size)) if size > 0 else (0, limit)


def _tile_shape(rows: int, cols: int, n_context: int, size: int, budget: int, side: int) -> tuple[int, int]:
    """Target tile (rows, cols): ``side`` x ``side`` (0: whole rows), shrunk until the affinities of one tile,
    targets x context frames x sources in reach, fit ``budget`` elements."""
    tile_cols = cols if side <= 0 else min(cols, side)
    tile_rows = rows if side <= 0 else min(rows, side)

    def elements(tr: int, tc: int) -> int:
        reach_rows, reach_cols = _span(0, tr, size, rows), _span(0, tc, size, cols)
        return tr * tc * n_context * (reach_rows[1] - reach_rows[0]) * (reach_cols[1] - reach_cols[0])

    while tile_rows > 1 and elements(tile_rows, tile_cols) > budget:
        tile_rows -= 1
    while tile_cols > 1 and elements(tile_rows, tile_cols) > budget:
        tile_cols -= 1
    return tile_rows, tile_cols


def propagate(
    target: torch.Tensor,
    context: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
    topk: int = 5,
    temperature: float = 0.1,
    size: int = 12,
    chunk_elements: int = CHUNK_ELEMENTS,
    tile: int | None = None,
) -> torch.Tensor:
    """Soft labels [N, C] of a target frame's tokens from the context frames' labels.

    target [N, D] and context [n_ctx, N, D]: L2-normalised patch tokens on a rows x cols grid (N = rows * cols);
    labels [n_ctx, N, C]. For target token i: a_j = exp(<t_i, s_j> / temperature) for the sources j of every
    context frame within +-size cells (all sources when size is 0), the others 0; sources below the topk-th
    largest a over all context frames jointly are zeroed (ties at it kept); weights a / sum(a) average the labels.

    Targets are taken in tiles of ``tile`` x ``tile`` cells (0: bands of whole rows; default: ``size`` on the CPU,
    where it saves arithmetic, whole rows on a GPU, where fewer launches matter more), each compared only with
    the source cells its windows can reach: the rest would be zeroed, so the answers do not change. At most
    ``chunk_elements`` affinities exist at once. The window is a (row test) x (column test) broadcast; the
    normalisation divides the C label sums, not the affinities (one product gives the sums and the total).
    """
    rows, cols = grid
    n_ctx, n, dim = context.shape
    channels = labels.shape[-1]
    if target.shape != (n, dim) or labels.shape[:2] != (n_ctx, n) or n != rows * cols:
        raise ValueError(f"propagate: target {tuple(target.shape)}, context {tuple(context.shape)}, labels "
                         f"{tuple(labels.shape)} do not fit a {rows}x{cols} grid")
    if tile is None:
        tile = size if target.device.type == "cpu" else 0
    tile_rows, tile_cols = _tile_shape(rows, cols, n_ctx, size, chunk_elements, tile)
    # A column of ones after the labels: the product with the kept affinities gives their total as well.
    labels = torch.cat([labels, labels.new_ones((n_ctx, n, 1))], dim=-1).view(n_ctx, rows, cols, channels + 1)
    context = context.view(n_ctx, rows, cols, dim)
    target = target.view(rows, cols, dim)
    out = labels.new_empty((rows, cols, channels))
    row_ids, col_ids = torch.arange(rows, device=target.device), torch.arange(cols, device=target.device)
    for r0 in range(0, rows, tile_rows):
        r1 = min(rows, r0 + tile_rows)
        s0, s1 = _span(r0, r1, size, rows)
        for c0 in range(0, cols, tile_cols):
            c1 = min(cols, c0 + tile_cols)
            q0, q1 = _span(c0, c1, size, cols)
            m, reach = (r1 - r0) * (c1 - c0), (s1 - s0) * (q1 - q0)
            keys = context[:, s0:s1, q0:q1].reshape(n_ctx * reach, dim)
            # <t, s> / T as (t / T) @ s: the scaling costs m x D operations instead of a pass over the affinities
            aff = (target[r0:r1, c0:c1].reshape(m, dim) * (1.0 / temperature)) @ keys.T
            if size > 0:  # exp(-inf) = 0, as the reference's 0/1 mask multiplies it
                far_rows = ~_near(row_ids[r0:r1], row_ids[s0:s1], size)
                far_cols = ~_near(col_ids[c0:c1], col_ids[q0:q1], size)
                far = (far_rows[:, None, :, None] | far_cols[None, :, None, :]).reshape(m, 1, reach)
                aff.view(m, n_ctx, reach).masked_fill_(far, -math.inf)
            aff = aff.exp_()
            kth = aff.topk(min(topk, aff.shape[1]), dim=1).values[:, -1:]
            aff.masked_fill_(aff < kth, 0.0)
            sums = aff @ labels[:, s0:s1, q0:q1].reshape(n_ctx * reach, channels + 1)
            out[r0:r1, c0:c1] = (sums[:, :channels] / sums[:, channels:]).view(r1 - r0, c1 - c0, channels)
    return out.view(n, channels)


def soft_to_labels(soft: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Label map [rows*patch, cols*patch] (int64) of soft labels [N, C]: bilinear x patch, min-max, argmax.

    Each channel whose maximum is > 0 is rescaled to [0, 1] before the argmax (background included), which changes
    decisions. A constant positive channel is 0/0 = NaN in the reference, and NaN wins its argmax; here such a
    channel becomes +inf, which wins the same way (the first of them, as for NaN).
    """
    rows, cols = grid
    maps = soft.T.reshape(1, -1, rows, cols)
    maps = F.interpolate(maps, scale_factor=patch, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False)[0]
    top = maps.amax(dim=(1, 2), keepdim=True)
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = top - low
    scaled = (maps - low) / torch.where(span > 0, span, torch.ones_like(span))
    scaled = torch.where(span > 0, scaled, torch.full_like(maps, math.inf))
    maps = torch.where(top > 0, scaled, maps)
    return maps.argmax(dim=0)


# --------------------------------------------------------------------------------------------- one video


def _frame_batches(paths: Sequence[Path], scale_size: int, batch: int, pool: ThreadPoolExecutor
                   ) -> Iterator[list[tuple[np.ndarray, tuple[int, int]]]]:
    """Decoded frames in batches; the next batch is decoded on worker threads while this one is used."""
    pending = [pool.submit(read_frame, p, scale_size) for p in paths[:batch]]
    for start in range(0, len(paths), batch):
        ready = [f.result() for f in pending]
        pending = [pool.submit(read_frame, p, scale_size) for p in paths[start + batch:start + 2 * batch]]
        yield ready


def frame_tokens(backbone: Backbone, frames: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
    """L2-normalised fp32 patch tokens [B, rows, cols, D] of normalised frames [B, 3, th, tw]."""
    images = torch.from_numpy(frames).to(device, non_blocking=True)
    with autocast(device, precision):
        _, tokens = vit_tokens(backbone, images)
    return F.normalize(tokens.float(), dim=-1)


def _write_frame(path: Path, labels: torch.Tensor, size: tuple[int, int]) -> None:
    height, width = size
    image = Image.fromarray(labels.cpu().numpy())
    if image.size != (width, height):
        image = image.resize((width, height), Image.NEAREST)
    save_label_png(path, np.asarray(image))


@torch.inference_mode()
def segment_video(
    backbone: Backbone,
    frames: Sequence[Path],
    annotation: Path,
    out_folder: Path,
    settings: PropagationSettings = PropagationSettings(),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    workers: int = 2,
) -> int:
    """Propagate the first frame's annotation through ``frames``; write ``out_folder/<frame>.png`` (indexed) for
    every frame, frame 0 being the annotation unchanged. Returns the number of frames written.

    ``workers`` threads decode the next batch of frames and encode the PNGs while the model and the propagation
    run; ``precision`` (fp32 or bf16) applies to the ViT forward only, the affinities are always strict fp32.
    """
    device = torch.device(device)
    patch = backbone.patch_size
    if not patch:
        raise UserError(f"{backbone.arch} has no patch size; DAVIS propagation needs a ViT")
    mask = read_label_png(annotation)
    if int((mask == VOID).sum()):
        log.warning("%s: void (255) pixels in the first mask are propagated as background", annotation)
    out_folder.mkdir(parents=True, exist_ok=True)
    writes: list[Future] = []
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames)
    original: tuple[int, int] | None = None
    index = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, strict_fp32():
        for batch in _frame_batches(frames, settings.scale_size, settings.frame_batch, pool):
            sizes = {size for _, size in batch} | ({original} if original else set())
            if len(sizes) != 1:
                raise UserError(f"frames of {frames[0].parent} differ in size: {sorted(sizes)}")
            original = batch[0][1]
            tokens = frame_tokens(backbone, np.stack([image for image, _ in batch]), device, precision)
            grid = (tokens.shape[1], tokens.shape[2])
            tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
            for feats in tokens:
                if first is None:
                    if mask.shape != original:
                        raise UserError(f"annotation {annotation} is {mask.shape[1]}x{mask.shape[0]}, its frame "
                                        f"{frames[0]} is {original[1]}x{original[0]}")
                    labels, _ = first_frame_labels(mask, grid)
                    first = (feats.clone(), labels.to(device))  # not a view that pins its batch
                    writes.append(pool.submit(save_label_png, out_folder / f"{frames[0].stem}.png", mask))
                else:
                    context = torch.stack([first[0]] + [f for f, _ in queue])
                    context_labels = torch.stack([first[1]] + [s for _, s in queue])
                    soft = propagate(feats, context, context_labels, grid, settings.topk, settings.temperature,
                                     settings.size_mask_neighborhood, settings.chunk_elements)
                    if settings.n_last_frames:
                        queue.append((feats, soft))
                    labels = soft_to_labels(soft, grid, patch).to(torch.uint8)  # copied to the host by the writer
                    writes.append(pool.submit(_write_frame, out_folder / f"{frames[index].stem}.png", labels, original))
                index += 1
        for write in writes:
            write.result()
    return index


# --------------------------------------------------------------------------------------------- the task

@dataclass
class DavisParams:
    split: str = "val"  # ImageSets/2017/<split>.txt
    out_dir: str = ""  # predicted PNGs and CSVs; default: runs/davis-<model> beside the results folder
    topk: int = 5
    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    temperature: float = 0.1
    scale_size: int = 480
    frame_batch: int = 8


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"


def default_out_dir(ctx: TaskContext) -> Path:
    results = ctx.extra.get("results")
    runs = Path(results).resolve().parent.parent / "runs" if results else Path("runs")
    return runs / f"davis-{_slug(ctx.model_label or ctx.backbone.label)}"



def check_params(params: DavisParams) -> None:
    """The options alone, before any model or data."""
    if not params.split:
        raise UserError("davis.split is empty; expected a name of ImageSets/2017/<split>.txt (val, train)")
    PropagationSettings(params.topk, params.n_last_frames, params.size_mask_neighborhood, params.temperature,
                        params.scale_size, params.frame_batch).check()


@register_task(
    "davis", version=DAVIS_VERSION, params=DavisParams, needs=("data_root",), check=check_params,
    description="DAVIS-2017 semi-supervised VOS by label propagation (DINO): J&F, J, F mean/recall/decay",
)
def run(ctx: TaskContext, params: DavisParams) -> list[ResultRow]:
    root = ctx.extra.get("data_root") or ""
    if not root:
        raise UserError("davis needs the DAVIS-2017 folder: --data-root PATH (JPEGImages/480p, Annotations/480p, "
                        "ImageSets/2017)")
    settings = PropagationSettings(params.topk, params.n_last_frames, params.size_mask_neighborhood,
                                   params.temperature, params.scale_size, params.frame_batch)
    settings.check()
    if not ctx.backbone.is_vit:
        raise UserError(f"{ctx.backbone.arch} is not a ViT; DAVIS propagation needs patch tokens")
    layout = DavisLayout(Path(root))
    sequences = layout.sequences(params.split)
    videos = {seq: layout.check_sequence(seq) for seq in sequences}  # frames and masks lined up before any work
    out_dir = Path(params.out_dir) if params.out_dir else default_out_dir(ctx)
    precision = resolve_precision(ctx.precision, ctx.device)
    ctx.backbone.model.to(ctx.device).eval()
    info = dist_info()
    mine = sequences[info.rank::info.world_size]
    frames = 0
    for seq in tqdm(mine, desc=f"DAVIS {params.split} propagation", disable=hide_progress()):
        frames += segment_video(ctx.backbone, videos[seq][0], videos[seq][1], out_dir / seq, settings, ctx.device,
                                precision, workers=max(1, ctx.workers))
    log.info("DAVIS: %d frames of %d sequences written to %s", frames, len(mine), out_dir)
    barrier()
    scores = evaluate(layout, out_dir, sequences)
    if info.is_main:
        paths = write_csvs(scores, out_dir, params.split)
        log.info("DAVIS results written to %s and %s", *paths)
    totals = scores.global_scores()
    row_params = {
        **asdict(params), "root": str(root), "out_dir": str(out_dir), **asdict(settings), "precision": precision,
        "patch_size": ctx.backbone.patch_size, "frame_mean": list(MEAN), "frame_std": list(STD),
        "sequences": len(sequences), "objects": len(scores.objects), "evaluated_frames": scores.frames,
        "pillow_version": PIL.__version__, "opencv_version": cv2.__version__,
        "evaluator": "davis2017 semi-supervised, first and last frames excluded",
    }
    metrics = (("JF_mean", "J&F-Mean"), ("J_mean", "J-Mean"), ("J_recall", "J-Recall"), ("J_decay", "J-Decay"),
               ("F_mean", "F-Mean"), ("F_recall", "F-Recall"), ("F_decay", "F-Decay"))
    log.info("DAVIS %s: J&F %.1f, J %.1f, F %.1f (%d objects)", params.split, 100 * totals["J&F-Mean"],
             100 * totals["J-Mean"], 100 * totals["F-Mean"], len(scores.objects))
    return [ctx.row(task="davis", protocol=DAVIS_VERSION, split=params.split, metric=metric, value=100 * totals[key],
                    params=row_params, n=len(scores.objects), dataset="davis2017") for metric, key in metrics]

"""DAVIS label propagation at 480p: frames/s and peak memory of ssl-bench's propagation, beside a reference-style
one (whole (n_ctx*hw) x hw affinity, neighbourhood mask filled in Python loops), on the same features.

    python benchmarks/davis_propagation.py                       # CPU, 2 threads, ViT-S/16, 6 frames of 854x480
    python benchmarks/davis_propagation.py --width 1152          # the widest DAVIS frames
    python benchmarks/davis_propagation.py --device cuda --frames 40 --steps 60

A synthetic video (textured background, three textured ellipses moving; JPEG frames and a palette PNG first
mask) is written to a temporary folder. Three measurements:
1. end to end: ``segment_video`` (decode, ViT forward, propagation, PNG writing), frames/s and peak memory;
2. propagation only, features precomputed: ``propagate`` against the reference-style step for ``--steps``
   target frames (the frames' features reused cyclically so that the context fills up to 1 + 7 frames), with
   the labels each gives and the loop-built mask's one-off cost per video;
3. peak memory of each propagation (CPU: resident set sampled every 2 ms; CUDA: torch's peak allocation).
The backbone is randomly initialised: speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ssl_bench.backbones import create_backbone
from ssl_bench.palette import save_label_png
from ssl_bench.tasks.davis import (
    PropagationSettings, _tile_shape, first_frame_labels, frame_tokens, propagate, read_frame, segment_video,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--frames", type=int, default=6, help="frames of the synthetic video (end to end)")
    parser.add_argument("--steps", type=int, default=10, help="target frames propagated in the propagation-only run")
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="of the ViT forward")
    parser.add_argument("--tile", type=int, default=None,
                        help="target tile side in cells (0: bands of whole rows); default: the task's choice")
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference-style propagation")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- synthetic video

def make_video(folder: Path, frames: int, height: int, width: int, seed: int) -> tuple[list[Path], Path]:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype(np.float32)
    background = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    background += rng.normal(0, 12, background.shape).astype(np.float32)
    objects = [((120, 200), (60, 90), (4, 6)), ((300, 500), (80, 50), (-3, 5)), ((240, 700), (50, 70), (2, -6))]
    textures = [rng.uniform(0, 255, (8, 8, 3)).astype(np.float32) for _ in objects]
    paths = []
    first_mask = None
    for t in range(frames):
        image = background.copy()
        mask = np.zeros((height, width), np.uint8)
        for k, (((cy, cx), (ay, ax), (vy, vx)), texture) in enumerate(zip(objects, textures), start=1):
            centre = (int(cx * width / 854 + vx * t), int(cy * height / 480 + vy * t))
            blob = np.zeros((height, width), np.uint8)
            cv2.ellipse(blob, centre, (ax, ay), 0, 0, 360, 1, -1)
            tiled = cv2.resize(texture, (width, height), interpolation=cv2.INTER_NEAREST)
            image[blob > 0] = tiled[blob > 0]
            mask[blob > 0] = k
        path = folder / f"{t:05d}.jpg"
        cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
        if t == 0:
            first_mask = mask
    annotation = folder / "00000.png"
    save_label_png(annotation, first_mask)
    return paths, annotation


# --------------------------------------------------------------------------------------------- reference-style

def loop_mask(rows: int, cols: int, size: int) -> torch.Tensor:
    """The neighbourhood mask filled one cell at a time, as the reference does (float 0/1, [hw, hw])."""
    mask = torch.zeros(rows, cols, rows, cols)
    for i in range(rows):
        for j in range(cols):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    r, c = i - size + p, j - size + q
                    if 0 <= r < rows and 0 <= c < cols:
                        mask[i, j, r, c] = 1
    return mask.reshape(rows * cols, rows * cols)


def reference_step(target: torch.Tensor, context: list[torch.Tensor], labels: list[torch.Tensor], mask: torch.Tensor,
                   topk: int, temperature: float) -> torch.Tensor:
    """One target frame with whole matrices: [n_ctx, hw, hw] affinities, dense mask, top-k over n_ctx*hw rows."""
    n = target.shape[0]
    sources = torch.stack(context)
    aff = torch.exp(torch.bmm(target.expand(len(context), -1, -1), sources.transpose(1, 2)) / temperature)
    aff *= mask
    aff = aff.transpose(2, 1).reshape(-1, n)
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = torch.stack(labels).reshape(-1, labels[0].shape[-1]).T
    return (segs @ aff).T


# --------------------------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak resident set (CPU, sampled) or peak CUDA allocation above the level at entry, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (max(self._peak, self._rss()) - self._base) / 2 ** 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_propagation(kind: str, feats: list[torch.Tensor], first: torch.Tensor, grid: tuple[int, int],
                    settings: PropagationSettings, steps: int, device: torch.device, tile: int | None = None
                    ) -> tuple[list[torch.Tensor], float, float, float]:
    """(soft labels per step, seconds per step, peak MiB, one-off mask seconds) of ``steps`` target frames."""
    mask_s = 0.0
    mask = None
    if kind == "reference":
        start = time.perf_counter()
        mask = loop_mask(*grid, settings.size_mask_neighborhood).to(device)
        sync(device)
        mask_s = time.perf_counter() - start
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs, times = [], []
    with PeakMemory(device) as memory:
        for step in range(1, steps + 1):
            target = feats[step % len(feats)]
            context = [feats[0]] + [f for f, _ in queue]
            labels = [first] + [s for _, s in queue]
            sync(device)
            start = time.perf_counter()
            if kind == "ours":
                soft = propagate(target, torch.stack(context), torch.stack(labels), grid, settings.topk,
                                 settings.temperature, settings.size_mask_neighborhood, settings.chunk_elements, tile)
            else:
                soft = reference_step(target, context, labels, mask, settings.topk, settings.temperature)
            sync(device)
            times.append(time.perf_counter() - start)
            queue = (queue + [(target, soft)])[-settings.n_last_frames:]
            outputs.append(soft.argmax(dim=1).cpu())
    steady = times[settings.n_last_frames:] or times  # full context from step n_last_frames + 1
    return outputs, statistics.median(steady), memory.peak_mib, mask_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = create_backbone(args.model, seed=args.seed)
    backbone.model.to(device).eval()
    settings = PropagationSettings()
    patch = backbone.patch_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, annotation = make_video(folder, args.frames, args.height, args.width, args.seed)
        image, _ = read_frame(paths[0])
        grid = (image.shape[1] // patch, image.shape[2] // patch)
        tile = args.tile if args.tile is not None else (settings.size_mask_neighborhood if device.type == "cpu" else 0)
        tile_shape = _tile_shape(*grid, 1 + settings.n_last_frames, settings.size_mask_neighborhood,
                                 settings.chunk_elements, tile)
        print(f"{args.model} on {device} ({torch.get_num_threads()} threads)" if device.type == "cpu"
              else f"{args.model} on {torch.cuda.get_device_name(device)}", f"torch {torch.__version__}",
              "load average %.1f %.1f %.1f" % os.getloadavg())
        print(f"frames {args.width}x{args.height} -> {image.shape[2]}x{image.shape[1]}, grid {grid[0]}x{grid[1]}, "
              f"target tile {tile_shape[0]}x{tile_shape[1]} cells, affinity budget {settings.chunk_elements} elements")

        # 1. end to end (one untimed frame pair first: allocator and kernel warm-up)
        segment_video(backbone, paths[:2], annotation, folder / "warm", settings, device, args.precision)
        sync(device)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            written = segment_video(backbone, paths, annotation, folder / "out", settings, device, args.precision)
            sync(device)
            wall = time.perf_counter() - start
        print(f"end to end ({written} frames: decode, ViT {args.precision}, propagate, write PNG): "
              f"{written / wall:.2f} frames/s, {wall:.1f} s, peak memory +{memory.peak_mib:.0f} MiB")

        # 2. propagation only, on precomputed features
        with torch.inference_mode():
            feats = []
            for path in paths:
                tokens = frame_tokens(backbone, read_frame(path)[0][None], device, args.precision)
                feats.append(tokens.reshape(-1, tokens.shape[-1]))
            from ssl_bench.palette import read_label_png

            first, _ = first_frame_labels(read_label_png(annotation), grid)
            first = first.to(device)
            ours, ours_s, ours_mib, _ = run_propagation("ours", feats, first, grid, settings, args.steps, device, tile)
            print(f"propagation, ours: {1 / ours_s:.1f} frames/s ({1000 * ours_s:.1f} ms per frame with 8 context "
                  f"frames), peak +{ours_mib:.0f} MiB")
            if not args.no_baseline:
                ref, ref_s, ref_mib, mask_s = run_propagation("reference", feats, first, grid, settings, args.steps,
                                                              device)
                agree = float(np.mean([(a == b).float().mean().item() for a, b in zip(ours, ref)]))
                print(f"propagation, reference-style: {1 / ref_s:.1f} frames/s ({1000 * ref_s:.1f} ms per frame), "
                      f"peak +{ref_mib:.0f} MiB; loop-built mask {mask_s:.2f} s per video")
                print(f"speed-up per frame {ref_s / ours_s:.2f}x, memory ratio {ref_mib / max(ours_mib, 1e-9):.1f}x; "
                      f"argmax labels agree on {100 * agree:.3f} % of cells")


if __name__ == "__main__":
    sys.exit(main())

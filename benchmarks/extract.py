"""Feature-extraction throughput: model-only (tensors already on the device) and end to end (JPEG decode +
protocol transform + DataLoader workers), fp32 against bf16 autocast, as ratios to the fp32 model-only run.

    python benchmarks/extract.py --model vit_small_patch16_224 --images 2048 --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_bench.backbones import create_backbone
from ssl_bench.data import resolve_dataset
from ssl_bench.features import FeatureSpec, compute_features, extract
from ssl_bench.runtime import autocast, resolve_device


def model_only(backbone, device, precision: str, batch: int, steps: int) -> float:
    size = backbone.input_size
    images = torch.randn(batch, 3, size, size, device=device)
    backbone.model.to(device).eval()
    spec = FeatureSpec("cls")
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(2):
            compute_features(backbone, images, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            compute_features(backbone, images, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def make_jpeg_folder(root: Path, count: int, side: int = 375) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        folder = root / split / "n00000000"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count if split == "val" else 1):
            pixels = rng.integers(0, 256, (side, int(side * 4 / 3), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def end_to_end(backbone, device, precision: str, root: Path, batch: int, workers: int) -> float:
    split = resolve_dataset(str(root)).split("val")
    start = time.perf_counter()
    extract(backbone, split, "cls", device=device, batch_size=batch, workers=workers, precision=precision, use_cache=False,
            cache_dir=root / "scratch")
    return len(split) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=512, help="JPEGs for the end-to-end run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = parser.parse_args()
    device = resolve_device(args.device)
    backbone = create_backbone(args.model)
    precisions = ["fp32", "bf16"]
    print(f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"batch {args.batch_size}, torch {torch.__version__}")
    rates = {p: model_only(backbone, device, p, args.batch_size, args.steps) for p in precisions}
    with tempfile.TemporaryDirectory() as tmp:
        make_jpeg_folder(Path(tmp), args.images)
        e2e = {p: end_to_end(backbone, device, p, Path(tmp), args.batch_size, args.workers) for p in precisions}
    base = rates["fp32"]
    print(f"{'run':<28}{'images/s':>10}{'x fp32 model-only':>20}")
    for p in precisions:
        print(f"{'model only ' + p:<28}{rates[p]:>10.0f}{rates[p] / base:>20.2f}")
    for p in precisions:
        print(f"{f'with decode ({args.workers} workers) ' + p:<28}{e2e[p]:>10.0f}{e2e[p] / base:>20.2f}")


if __name__ == "__main__":
    main()

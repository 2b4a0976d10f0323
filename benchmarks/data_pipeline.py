"""Data pipeline throughput: (a) PIL decode + the CPU eval transform per image in DataLoader workers against
(b) workers reading bytes only, then decode_batch + eval_batch on the device; and the pretraining multi-crop
(2 x 224 + 10 x 96): (c) PIL decode + DINO's augmentation in the workers against (d) bytes, decode_batch and
DeviceMultiCrop on the device. Ratios are to (a), and (d) also to (c), all measured in one run.

    python benchmarks/data_pipeline.py --device cpu --images 256 --workers 2 --threads 2
    python benchmarks/data_pipeline.py --device cuda --images 4096 --workers 16 --batch-size 256

Also prints (b)'s stages alone (bytes already in memory): decode_batch, and eval_batch on decoded images.
The synthetic JPEGs are smooth noise (photo-like file sizes, ~15x smaller than white noise), 500x375 at quality 90.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ssl_bench.data import image_folder
from ssl_bench.decode import BytesDataset, decode_batch, device_eval_batches, eval_batch, eval_batch_params
from ssl_bench.pretrain.device_augment import DeviceMultiCrop
from ssl_bench.pretrain.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from ssl_bench.transforms import TransformSpec


def make_jpegs(root: Path, count: int, width: int, height: int, quality: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "train" / "n00000000"
    folder.mkdir(parents=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=quality)


def best_rate(run: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` runs (each run returns how many images it made)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, main process")
    parser.add_argument("--repeats", type=int, default=2, help="each figure is the best of this many passes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = TransformSpec("eval_dino", 224)

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp), args.images, args.width, args.height, args.quality)
        split = image_folder(tmp, splits=("train",)).split("train")
        mean_kb = np.mean([os.path.getsize(p) for p in split.paths]) / 1024

        def cpu_pil() -> int:
            loader = torch.utils.data.DataLoader(split.with_transform(spec.build()), batch_size=args.batch_size,
                                                 num_workers=args.workers, pin_memory=device.type == "cuda")
            return sum(len(images.to(device, non_blocking=True)) for images, _, _ in loader)

        def device_path() -> int:
            return sum(len(images) for images, _, _ in
                       device_eval_batches(split, spec, device, args.batch_size, args.workers))

        source = BytesDataset(split)
        data = [source[i][0] for i in range(len(split))]
        paths = [source.path(i) for i in range(len(split))]
        chunks = range(0, len(data), args.batch_size)

        def decode_only() -> int:
            return sum(len(decode_batch(data[s:s + args.batch_size], paths[s:s + args.batch_size], device))
                       for s in chunks)

        decoded = decode_batch(data, paths, device)
        params = eval_batch_params(spec)

        def eval_only() -> int:
            return sum(len(eval_batch(decoded[s:s + args.batch_size], **params)) for s in chunks)

        augmentation = MultiCropAugmentation(224, 96, 10)

        def multicrop_loader(encoded: bool) -> torch.utils.data.DataLoader:
            dataset = MultiCropDataset(split, augmentation, encoded=encoded)
            return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                               collate_fn=collate_multicrop, pin_memory=device.type == "cuda")

        def cpu_multicrop() -> int:
            return sum(len(crops[0].to(device, non_blocking=True)) for crops, _, _ in multicrop_loader(False))

        device_crops = DeviceMultiCrop(augmentation)

        def device_multicrop() -> int:
            made = 0
            for encoded, _, indices in multicrop_loader(True):
                images = decode_batch(encoded, [paths[i] for i in indices.tolist()], device)
                made += len(device_crops(images, indices, 0)[0])
            return made

        if device.type == "cuda":  # first nvjpeg call and first kernels pay for initialisation
            eval_batch(decode_batch(data[:2], paths[:2], device), **params)
            device_crops(decode_batch(data[:2], paths[:2], device), [0, 1], 0)
        rates = {
            f"(a) PIL + CPU transform, {args.workers} workers": best_rate(cpu_pil, device, args.repeats),
            f"(b) bytes, {args.workers} workers, decode+eval on {device.type}": best_rate(device_path, device,
                                                                                       args.repeats),
            f"    decode_batch only ({device.type})": best_rate(decode_only, device, args.repeats),
            f"    eval_batch only ({device.type})": best_rate(eval_only, device, args.repeats),
            f"(c) multi-crop: PIL + DINO augmentation, {args.workers} workers": best_rate(cpu_multicrop, device,
                                                                                       args.repeats),
            f"(d) multi-crop: bytes + decode + DeviceMultiCrop on {device.type}": best_rate(device_multicrop, device,
                                                                                          args.repeats),
        }

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {os.cpu_count()} cores"
    print(f"{args.images} JPEGs {args.width}x{args.height} q{args.quality} (mean {mean_kb:.0f} KiB), eval_dino@224, "
          f"batch {args.batch_size}, {args.threads} torch threads, {name}, torch {torch.__version__}")
    base = next(iter(rates.values()))
    width = max(map(len, rates)) + 2
    multicrop_base = rates[next(k for k in rates if k.startswith("(c)"))]
    print(f"{'pipeline':<{width}}{'images/s':>10}{'x (a)':>8}{'x (c)':>8}")
    for label, rate in rates.items():
        versus_c = f"{rate / multicrop_base:>8.2f}" if label.startswith(("(c)", "(d)")) else ""
        print(f"{label:<{width}}{rate:>10.1f}{rate / base:>8.2f}{versus_c}")


if __name__ == "__main__":
    main()

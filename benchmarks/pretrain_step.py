"""Pretraining step throughput and peak memory: DINO, DINO-vMF, iBOT and iBOT-vMF on the same model and batch.

Each configuration runs in its own process (clean peak memory); crops are random tensors of the preset's
sizes (and, for iBOT, block masks of the preset's settings), so the figure is the training step alone (forward,
loss, backward, AdamW, EMA), not the data pipeline. Ratios are against DINO in the same run.

    python benchmarks/pretrain_step.py                       # tiny_cpu and ViT-S/16 on this machine
    python benchmarks/pretrain_step.py --presets dino_vits16 --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = {  # the vMF methods differ from their base only in prototype normalisation and centering
    "dino": {"method": "dino", "normalization": "none", "centering": "logit"},
    "dino-vmf": {"method": "dino-vmf", "normalization": "vmf", "centering": "probability"},
    "ibot": {"method": "ibot", "normalization": "l2", "centering": "logit"},
    "ibot-vmf": {"method": "ibot-vmf", "normalization": "vmf", "centering": "probability"},
}


def measure(preset: str, variant: str, batch: int, steps: int, device: str, overrides: dict[str, str]) -> dict:
    import torch

    from ssl_bench.pretrain.config import make_config
    from ssl_bench.pretrain.trainer import Trainer

    values = {**overrides, **VARIANTS[variant], "batch_size": str(batch), "num_workers": "0", "epochs": "1",
              "warmup_epochs": "0", "freeze_last_layer": "0"}
    config = make_config(preset, values)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        # The loader is built from the builtin data but not used: crops come from memory.
        trainer = Trainer(config, "builtin:digits", out, device)
        trainer.schedules.lr[:] = 1e-4
        sizes = [config.global_size] * 2 + [config.local_size] * config.n_local
        crops = [torch.randn(batch, 3, s, s) for s in sizes]
        masks = None
        if config.masked_modeling:
            import numpy as np

            from ssl_bench.pretrain.trainer import _mask_grid

            rng, grid, masking = np.random.default_rng(0), _mask_grid(config, trainer.student_module.backbone), \
                config.block_masking()
            masks = [torch.from_numpy(np.stack([masking(*grid, rng) for _ in range(batch)])) for _ in range(2)]
        dev = trainer.device
        for step in range(2):  # warm-up
            trainer.train_step(crops, epoch=0, step=step, masks=masks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for step in range(steps):
            trainer.train_step(crops, epoch=0, step=step % trainer.steps_per_epoch, masks=masks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images_per_s": batch * steps / elapsed, "step_s": elapsed / steps, "peak_mib": peak / 2**20,
            "device": str(dev), "arch": config.arch, "crops": f"2x{config.global_size}+{config.n_local}x{config.local_size}",
            "out_dim": config.out_dim}


def measure_end_to_end(preset: str, variant: str, batch: int, steps: int, device: str, overrides: dict[str, str],
                       images: int, workers: int) -> dict:
    """``ssl-bench pretrain`` itself (loader, augmentation, step) on a folder of synthetic JPEGs: images/s over
    ``steps`` steps after two warm-up steps."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from data_pipeline import make_jpegs
    from ssl_bench.pretrain.config import make_config
    from ssl_bench.pretrain.trainer import SimulatedKill, Trainer

    values = {**overrides, **VARIANTS[variant], "batch_size": str(batch), "num_workers": str(workers),
              "epochs": "1", "warmup_epochs": "0", "freeze_last_layer": "0"}
    config = make_config(preset, values)
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "data", images, 500, 375, 90)
        first = next((Path(tmp) / "data" / "train" / "n00000000").iterdir())
        (Path(tmp) / "data" / "val" / "n00000000").mkdir(parents=True)  # the ImageNet layout wants a val split
        shutil.copy(first, Path(tmp) / "data" / "val" / "n00000000")
        trainer = Trainer(config, str(Path(tmp) / "data"), Path(tmp) / "run", device)
        if trainer.steps_per_epoch < steps + 2:
            raise SystemExit(f"--images {images} gives {trainer.steps_per_epoch} steps of {batch}; need {steps + 2}")
        step_fn, marks = trainer.train_step, {}

        def timed_step(crops, epoch, step, masks=None):
            if step == 2:
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()
            return step_fn(crops, epoch, step, masks)

        trainer.train_step = timed_step
        try:
            trainer.fit(stop_at_step=steps + 2)
        except SimulatedKill:
            pass
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - marks["start"]
    return {"images_per_s": batch * steps / elapsed, "step_s": elapsed / steps, "peak_mib": float("nan"),
            "device": str(trainer.device), "arch": config.arch,
            "crops": f"2x{config.global_size}+{config.n_local}x{config.local_size}", "out_dim": config.out_dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny_cpu,dino_vits16")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 for tiny_cpu, 4 otherwise")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(VARIANTS), help="the first is the ratios' baseline")
    parser.add_argument("--compile", action="store_true", help="compile=true (the warm-up steps pay the compile)")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="IMAGES",
                        help="run `ssl-bench pretrain` on IMAGES synthetic JPEGs, data included, with augment=cpu "
                             "and augment=device (ratios against cpu)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers for --end-to-end")
    parser.add_argument("--augment", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, variant, batch = args.worker
        overrides = {"compile": "true"} if args.compile else {}
        if args.end_to_end:
            result = measure_end_to_end(preset, variant, int(batch), args.steps, args.device,
                                        {**overrides, "augment": args.augment}, args.end_to_end, args.workers)
        else:
            result = measure(preset, variant, int(batch), args.steps, args.device, overrides)
        print(json.dumps(result))
        return
    if args.end_to_end:
        end_to_end(args)
        return
    methods = args.methods.split(",")
    print(f"{'preset':<16}{'method':<10}{'crops':<16}{'batch':>6}{'img/s':>9}{'s/step':>9}{'peak MiB':>10}"
          f"{'vs ' + methods[0]:>12}")
    for preset in args.presets.split(","):
        batch = args.batch_size or (64 if preset == "tiny_cpu" else 4)
        results = {}
        for variant in methods:
            out = subprocess.run([sys.executable, __file__, "--worker", preset, variant, str(batch), "--steps",
                                  str(args.steps), "--device", args.device, *(["--compile"] if args.compile else [])],
                                 capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        for variant, r in results.items():
            ratio = r["images_per_s"] / results[methods[0]]["images_per_s"]
            print(f"{preset:<16}{variant:<10}{r['crops']:<16}{batch:>6}{r['images_per_s']:>9.1f}{r['step_s']:>9.3f}"
                  f"{r['peak_mib']:>10.0f}{ratio:>12.2f}")


def end_to_end(args: argparse.Namespace) -> None:
    print(f"{'preset':<16}{'method':<10}{'augment':<9}{'batch':>6}{'img/s':>9}{'s/step':>9}{'vs cpu':>8}")
    for preset in args.presets.split(","):
        batch = args.batch_size or (64 if "tiny" in preset else 4)
        for variant in args.methods.split(","):
            rates = {}
            for augment in ("cpu", "device"):
                out = subprocess.run([sys.executable, __file__, "--worker", preset, variant, str(batch), "--steps",
                                      str(args.steps), "--device", args.device, "--end-to-end", str(args.end_to_end),
                                      "--workers", str(args.workers), "--augment", augment,
                                      *(["--compile"] if args.compile else [])],
                                     capture_output=True, text=True, check=True)
                r = rates[augment] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{preset:<16}{variant:<10}{augment:<9}{batch:>6}{r['images_per_s']:>9.1f}{r['step_s']:>9.3f}"
                      f"{r['images_per_s'] / rates['cpu']['images_per_s']:>8.2f}")


if __name__ == "__main__":
    main()

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny_cpu,dino_vits16")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 for tiny_cpu, 4 otherwise")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(VARIANTS), help="the first is the ratios' baseline")
    parser.add_argument("--compile", action="store_true", help="compile=true (the warm-up steps pay the compile)")
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, variant, batch = args.worker
        overrides = {"compile": "true"} if args.compile else {}
        print(json.dumps(measure(preset, variant, int(batch), args.steps, args.device, overrides)))
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


if __name__ == "__main__":
    main()

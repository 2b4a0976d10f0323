"""Reading a backbone and its projection head out of a full pretraining checkpoint, as `ssl-bench run` and the
prototypes task do: torch.load into memory against memory-mapped loading (``read_checkpoint(mmap=...)``).

    python benchmarks/checkpoint_read.py [--arch vit_base_patch16_224] [--out-dim 65536]

A synthetic DINO-style checkpoint (student and teacher backbone + head, AdamW moments for the student) is written
to a temporary folder; each mode reads it twice (backbone, then head) after the file is in the page cache.
Printed: wall time per mode and its ratio to the in-memory read, and the peak RSS growth while reading (Linux).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, time
import timm
from ssl_bench.checkpoint import load_backbone_weights, read_checkpoint
from ssl_bench.head_weights import head_from_checkpoint
path, arch, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = timm.create_model(arch, pretrained=False, num_classes=0)
def rss_mib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # Linux: restart the peak (VmHWM) from the current RSS
before = rss_mib("VmRSS")
start = time.perf_counter()
load_backbone_weights(model, path, "teacher", checkpoint=read_checkpoint(path, mmap=mmap))
head_from_checkpoint(read_checkpoint(path, mmap=mmap), "teacher")
print(time.perf_counter() - start, rss_mib("VmHWM") - before)
"""


def write_checkpoint(path: Path, arch: str, out_dim: int) -> float:
    import timm
    import torch

    from ssl_bench.dino_head import DINOHead

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    head = DINOHead(model.num_features, out_dim, norm_last_layer=False)
    net = {**{f"backbone.{k}": v for k, v in model.state_dict().items()},
           **{f"head.{k}": v for k, v in head.state_dict().items()}}
    moments = {i: {"exp_avg": v.clone(), "exp_avg_sq": v.clone()} for i, v in enumerate(net.values())}
    torch.save({"student": net, "teacher": {k: v.clone() for k, v in net.items()},
                "optimizer": {"state": moments, "param_groups": []}, "epoch": 1}, path)
    return path.stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pth"
        size = write_checkpoint(path, args.arch, args.out_dim)
        path.read_bytes()  # into the page cache: both modes read warm
        print(f"{args.arch} + head K={args.out_dim}: checkpoint {size:.0f} MiB (student, teacher, AdamW moments)")
        results = {}
        for mmap in (False, True):
            runs = [subprocess.run([sys.executable, "-c", CHILD, str(path), args.arch, "1" if mmap else "0"],
                                   check=True, capture_output=True, text=True).stdout.split()
                    for _ in range(args.repeats)]
            results[mmap] = (min(float(r[0]) for r in runs), min(float(r[1]) for r in runs))
        base = results[False][0]
        print(f"{'read':<28}{'best of ' + str(args.repeats) + ' s':>14}{'x in-memory':>13}{'peak RSS + MiB':>16}")
        for mmap, (seconds, rss) in results.items():
            name = "memory-mapped" if mmap else "torch.load into memory"
            print(f"{name:<28}{seconds:>14.2f}{base / seconds:>13.2f}{rss:>16.0f}")


if __name__ == "__main__":
    main()

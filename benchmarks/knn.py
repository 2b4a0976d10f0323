"""Weighted kNN: the reference algorithm (similarity and top-k recomputed for each k) against ssl-bench's one-pass
search, torch and faiss backends, in one run on the same random clustered features.

    python benchmarks/knn.py [--n-train 100000 --n-test 10000 --dim 384 --classes 1000 --threads 2]
    python benchmarks/knn.py --device cuda --n-train 1281167 --n-test 50000      # ImageNet size on a GPU

Each method runs in its own subprocess (so its peak RSS is its own; torch allocations are invisible to
tracemalloc) on features the parent wrote to a temporary folder. Prints wall time, peak RSS, the RSS the method
added on top of the loaded features, the speed-up over the reference measured in this run, and fails if the
methods disagree on any accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("reference", "torch", "faiss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch, MKL, OpenMP and faiss threads")
    parser.add_argument("--ks", default="10,20,100,200")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--noise", type=float, default=3.5, help="per-dimension noise around unit-variance class centres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; faiss-cpu always searches on the CPU")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all on CPU, no faiss on CUDA)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_features(args: argparse.Namespace, folder: Path) -> None:
    """Gaussian classes: centre ~ N(0, I), sample = centre + noise * N(0, I), written as float32 .npy files."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        labels = rng.integers(0, args.classes, n)
        features = centres[labels]
        features += np.float32(args.noise) * rng.standard_normal((n, args.dim), dtype=np.float32)
        np.save(folder / f"{split}_features.npy", features)
        np.save(folder / f"{split}_labels.npy", labels)


def reference_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """The reference's loop: for every k, 100 test chunks, each with its full similarity row block and top-k,
    one-hot votes weighted by exp(s / T), classes sorted by score."""
    import torch
    import torch.nn.functional as F

    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    n_test = test.shape[0]
    step = max(1, n_test // 100)  # the reference uses n_test // 100 rows per chunk (and crashes below 100)
    out = {}
    for k in ks:
        top1 = top5 = 0
        for start in range(0, n_test, step):
            sims = test[start:start + step] @ train.T
            rows = sims.shape[0]
            values, indices = sims.topk(k, dim=1, largest=True, sorted=True)
            votes = torch.zeros(rows * k, num_classes, device=sims.device)
            votes.scatter_(1, train_labels[indices].view(-1, 1), 1)
            scores = (votes.view(rows, k, num_classes) * (values / temperature).exp().view(rows, k, 1)).sum(1)
            _, ranked = scores.sort(1, True)
            correct = ranked.eq(test_labels[start:start + step].view(-1, 1))
            top1 += int(correct[:, :1].sum())
            top5 += int(correct[:, :min(5, k)].sum())
        out[k] = (100.0 * top1 / n_test, 100.0 * top5 / n_test)
    return out


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    from ssl_bench.tasks.knn import knn_classify

    folder = Path(args.data)
    train = torch.from_numpy(np.load(folder / "train_features.npy"))
    train_labels = torch.from_numpy(np.load(folder / "train_labels.npy"))
    test = torch.from_numpy(np.load(folder / "test_features.npy"))
    test_labels = torch.from_numpy(np.load(folder / "test_labels.npy"))
    ks = tuple(int(k) for k in args.ks.split(","))
    device = torch.device(args.device)
    host = (train, train_labels, test, test_labels)  # kept alive so that the RSS before the method is its peak so far
    train, train_labels, test, test_labels = (t.to(device) for t in host)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = current_rss_mib()
    start = time.perf_counter()
    if args.worker == "reference":
        accuracies = reference_knn(train, train_labels, test, test_labels, ks, args.temperature, args.classes)
    else:
        accuracies = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=args.temperature,
                                  num_classes=args.classes, backend=args.worker)
    wall = time.perf_counter() - start  # accuracies are Python floats: the device has finished
    device_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"method": args.worker, "wall_s": wall, "peak_rss_mib": peak_rss_mib(), "device_mib": device_mib,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "load": os.getloadavg()[0],
                      "added_mib": peak_rss_mib() - before, "accuracies": {str(k): v for k, v in accuracies.items()}}))


def run_method(method: str, args: argparse.Namespace, folder: Path) -> dict:
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    command = [sys.executable, __file__, "--worker", method, "--data", str(folder), "--threads", threads,
               "--ks", args.ks, "--temperature", str(args.temperature), "--classes", str(args.classes),
               "--device", args.device]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if m != "faiss" or not args.device.startswith("cuda"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    import torch

    print(f"kNN {args.n_train} train x {args.n_test} test x {args.dim} dims, {args.classes} classes, ks {args.ks}, "
          f"T {args.temperature}; {args.threads} threads on {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory(prefix="knn-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        make_features(args, folder)
        data_mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"features: {data_mib:.0f} MiB, made in {time.perf_counter() - start:.1f} s")
        results = []
        for method in methods:
            result = run_method(method, args, folder)
            print(f"  {method:<9} {result['wall_s']:7.2f} s  (process CPU {result['cpu_s']:.1f} s, load {result['load']:.2f})",
                  flush=True)
            results.append(result)

    baseline = next((r for r in results if r["method"] == "reference"), None)
    ks = args.ks.split(",")
    header = f"{'method':<10}{'wall s':>9}{'speed-up':>10}{'peak RSS MiB':>14}{'added MiB':>11}{'GPU MiB':>9}  " + "  ".join(
        f"k={k} top1/top5" for k in ks)
    print(header)
    for r in results:
        speedup = f"{baseline['wall_s'] / r['wall_s']:.1f}x" if baseline else "-"
        accuracy = "  ".join(f"{r['accuracies'][k][0]:6.2f}/{r['accuracies'][k][1]:6.2f}".ljust(len(f"k={k} top1/top5"))
                             for k in ks)
        gpu = f"{r['device_mib']:.0f}" if r["device_mib"] is not None else "-"
        print(f"{r['method']:<10}{r['wall_s']:9.2f}{speedup:>10}{r['peak_rss_mib']:14.0f}{r['added_mib']:11.0f}{gpu:>9}  "
              f"{accuracy}")
    first = results[0]
    for r in results[1:]:
        assert r["accuracies"] == first["accuracies"], (
            f"{r['method']} disagrees with {first['method']}: {r['accuracies']} vs {first['accuracies']}")
    print(f"all {len(results)} methods give the same accuracies")
    if max(r["load"] for r in results) > args.threads + 0.5:
        print(f"note: the 1-min load average exceeded --threads ({args.threads}): other processes shared the CPUs, "
              "so the times are inflated and noisy")


if __name__ == "__main__":
    main()

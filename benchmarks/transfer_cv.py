"""The transfer probes' L2 sweep (45 weight decays x 5 stratified folds, then a refit) on features of CIFAR-10 size
(50k x 384, 10 classes) and Aircraft size (6.7k x 768, 100 classes): ssl-bench's warm-started L-BFGS path against
plain scikit-learn LogisticRegression (lbfgs) fitted per C, with held-out accuracy of both.

scikit-learn is slow here, so it fits one fold only, and on CIFAR-10-sized features only every 9th C of the grid
(``--sklearn-every``; every C on Aircraft-sized ones, whose fits take seconds); its full-sweep time is then
extrapolated from the measured per-fit time and printed as an estimate.

    python benchmarks/transfer_cv.py [--sklearn-every N] [--threads 2] [--sizes cifar10,aircraft]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes (unit noise per dimension, centres 0.15 per dimension apart): separable but not trivially,
    with the same class centres for every seed so train and test share classes."""
    centres = np.random.default_rng(1234).standard_normal((classes, dim)) * 0.15
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, dim))
    return x.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--grid", type=int, default=45)
    parser.add_argument("--sklearn-every", type=int, default=None,
                        help="fit scikit-learn on every n-th C only (default: 9 for cifar10, 1 for aircraft)")
    parser.add_argument("--sizes", default="cifar10,aircraft")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from ssl_bench.logreg import fit_path
    from ssl_bench.tasks.transfer import weight_decay_grid

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    shapes = {"cifar10": (50_000, 384, 10), "aircraft": (6_667, 768, 100)}
    every = {"cifar10": 9, "aircraft": 1}
    cs = 1.0 / weight_decay_grid(args.grid)
    print(f"{'features':<22}{'method':<34}{'seconds':>10}{'accuracy@C':>12}")
    for name in args.sizes.split(","):
        n, dim, classes = shapes[name]
        x, y = make_features(n, dim, classes)
        test_x, test_y = make_features(n // 5, dim, classes, seed=1)
        folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(x, y))
        label = f"{name} {n}x{dim}x{classes}"

        start = time.perf_counter()
        for fit_idx, _ in folds:
            models = fit_path(torch.from_numpy(x[fit_idx]).double(), torch.from_numpy(y[fit_idx]), classes, cs)
        ours_s = time.perf_counter() - start
        probe = len(cs) // 2
        ours_acc = float((models[probe].predict(torch.from_numpy(test_x).double()).numpy() == test_y).mean())
        print(f"{label:<22}{'ssl-bench path (45 C x folds)':<34}{ours_s:>10.1f}{ours_acc:>12.4f}")

        subset = list(range(0, len(cs), args.sklearn_every or every[name]))
        start = time.perf_counter()
        fit_idx = folds[0][0]
        for i in subset:
            clf = LogisticRegression(C=cs[i], max_iter=1000, tol=1e-6).fit(x[fit_idx], y[fit_idx])
            if i == subset[len(subset) // 2]:
                sk_acc, sk_c = float(clf.score(test_x, test_y)), cs[i]
        per_fit = (time.perf_counter() - start) / len(subset)
        estimate = per_fit * len(cs) * args.folds
        mine = float((fit_path(torch.from_numpy(x[fit_idx]).double(), torch.from_numpy(y[fit_idx]), classes,
                               [sk_c])[0].predict(torch.from_numpy(test_x).double()).numpy() == test_y).mean())
        print(f"{label:<22}{f'sklearn lbfgs, {len(subset)} fits measured':<34}{per_fit * len(subset):>10.1f}"
              f"{sk_acc:>12.4f}")
        print(f"{label:<22}{'sklearn full sweep (estimate)':<34}{estimate:>10.1f}{'':>12}")
        print(f"{label:<22}{f'ours at the same C={sk_c:.3g}':<34}{'':>10}{mine:>12.4f}")
        print(f"{label:<22}{'speed-up vs sklearn (estimate)':<34}{estimate / ours_s:>10.1f}x")


if __name__ == "__main__":
    main()

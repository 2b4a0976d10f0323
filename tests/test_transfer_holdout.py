"""``protocol=sslt-holdout`` follows ssl-transfer's code path (protocols.md §5.3-5.4) to the last fit (issue 16, item 8):
the chosen C and the test score equal a scikit-learn run written here, on digits pixels, where most fits stop at
the 100-iteration cap (so any other solver stops elsewhere)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ssl_bench.tasks.transfer import PROTOCOLS, TransferParams, evaluate_dataset, sslt_weight_decays


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw 8x8 pixels (64 float64 features), 70 / 30 trainval / test; val = ssl-transfer's random 20 % of trainval
    (``np.random.seed(0)``, shuffle, first floor(0.2 n))."""
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64)
    order = np.random.RandomState(0).permutation(len(y))
    test, trainval = order[:540], np.sort(order[540:])
    shuffled = np.arange(len(trainval))
    np.random.seed(0)
    np.random.shuffle(shuffled)
    cut = int(np.floor(0.2 * len(trainval)))
    val, train = trainval[np.sort(shuffled[:cut])], trainval[np.sort(shuffled[cut:])]
    return {name: (x[idx], y[idx]) for name, idx in
            (("train", train), ("val", val), ("trainval", trainval), ("test", test))}


def reference_sslt(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, list[float], list[int]]:
    """ssl-transfer's linear.py as protocols.md §5.3-5.4 describes it, on its own: (chosen C, test accuracy %,
    val accuracies %, iterations per grid fit)."""
    clf = LogisticRegression(solver="lbfgs", warm_start=True)  # default max_iter=100, tol=1e-4
    best_score, best_c, val_scores, iterations = 0.0, None, [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for wd in torch.logspace(-6, 5, 45):
            c = 1.0 / wd.item()
            clf.set_params(C=c)
            clf.fit(*data["train"])
            val_score = 100.0 * clf.score(*data["val"])
            val_scores.append(val_score)
            iterations.append(int(clf.n_iter_[0]))
            if val_score > best_score:
                best_score, best_c = val_score, c
        clf.set_params(C=best_c)
        clf.fit(*data["trainval"])
    return best_c, 100.0 * clf.score(*data["test"]), val_scores, iterations


def _stub_context(data: dict[str, tuple[np.ndarray, np.ndarray]]):
    """A task context whose features are the pixels (the extraction is not what is tested here)."""
    def features(split, spec, transform, dataset=None):
        x, y = data[split]
        return SimpleNamespace(tensor=lambda device: torch.from_numpy(x).float(), labels=y)
    return SimpleNamespace(features=features, device=torch.device("cpu"))


def test_holdout_picks_sklearns_c_and_test_score(digits):
    dataset = SimpleNamespace(name="digits", num_classes=10, metric="accuracy")
    with threadpool_limits(1):  # tiny fits: threads only wait on each other (and on other processes)
        want_c, want_acc, want_val, iterations = reference_sslt(digits)
        value, details = evaluate_dataset(_stub_context(digits), dataset, TransferParams(protocol="sslt-holdout"))
    assert sum(n == 100 for n in iterations) >= 5  # the regime at issue: many fits stop at the cap
    assert details["best_C"] == want_c
    assert value == pytest.approx(want_acc, abs=1e-9)
    assert details["val_scores"] == [round(s / 100, 5) for s in want_val]
    assert details["n_iter"] == iterations and details["fits_at_max_iter"] == sum(n >= 100 for n in iterations)


def test_grid_is_ssl_transfers_float32_logspace_in_increasing_weight_decay():
    decays = sslt_weight_decays()
    assert decays.dtype == np.float64 and len(decays) == 45 and np.all(np.diff(decays) > 0)
    assert np.array_equal(decays, torch.logspace(-6, 5, 45).numpy().astype(np.float64))
    assert 1.0 / decays[20] == pytest.approx(10.0, rel=1e-7) and 1.0 / decays[20] != 10.0  # float32 round-off
    assert PROTOCOLS["sslt-holdout"] == "transfer-sslt-holdout-v2" and PROTOCOLS["cv5"] == "transfer-cv5-v1"

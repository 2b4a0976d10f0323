"""Linear probes on the nine small transfer datasets (protocols.md §5): L2 strength chosen by 5-fold stratified
cross-validation over 45 values (DINO-vMF A.6.3, §5.5), or ssl-transfer's single hold-out split (§5.4).

The CV protocol fits with ssl_bench.logreg (fast, converged fits). The hold-out protocol exists to reproduce
ssl-transfer's code path, whose fits mostly stop at scikit-learn's 100-iteration cap, so where they stop depends on
the solver: it runs scikit-learn's own lbfgs, one warm-started estimator along the grid, as ssl-transfer does."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ssl_bench.context import TaskContext
from ssl_bench.data import Dataset
from ssl_bench.errors import UserError
from ssl_bench.logreg import fit_logistic, fit_path
from ssl_bench.options import check_at_least, check_choice, check_feature, check_transform
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow
from ssl_bench.transfer_data import TRANSFER_DATASETS, find_transfer_datasets

log = logging.getLogger(__name__)

# v2 of the hold-out: scikit-learn's lbfgs along the grid (v1 ran ssl_bench.logreg with sklearn's settings, which
# stops elsewhere than sklearn where the 100-iteration cap cuts the fits short: other C, other test scores).
PROTOCOLS = {"cv5": "transfer-cv5-v1", "sslt-holdout": "transfer-sslt-holdout-v2"}
# ssl-transfer's LogisticRegression(solver="lbfgs", multi_class="multinomial", warm_start=True) with the defaults
# max_iter=100, tol=1e-4, fit_intercept=True, L2 (§5.3); multinomial is scikit-learn's default for lbfgs now
# with more than two classes (all nine datasets have more).
SSLT_SOLVER = {"solver": "lbfgs", "warm_start": True, "max_iter": 100, "tol": 1e-4}


def weight_decay_grid(count: int = 45) -> np.ndarray:
    """10^linspace(-6, 5, count) read as weight decay; the classifier's C is 1 / wd (§5.3, §12.3)."""
    return np.logspace(-6, 5, count)


def sslt_weight_decays(count: int = 45) -> np.ndarray:
    """ssl-transfer's grid exactly: ``torch.logspace(-6, 5, count)`` in float32, widened to float64 without change,
    so C = 1 / wd carries the same float32 round-off (C = 9.99999985... for wd = 0.1) (§5.3)."""
    return torch.logspace(-6, 5, count, dtype=torch.float32).double().numpy()


def score(y_true: np.ndarray, y_pred: np.ndarray, metric: str) -> float:
    """Accuracy, or mean per-class accuracy over the classes of the confusion matrix (true and predicted labels,
    as sklearn's ``confusion_matrix``) that have true samples: a class absent from a fold's held-out part is
    skipped instead of making the mean NaN (§5.6)."""
    if metric == "accuracy":
        return float(np.mean(y_true == y_pred))
    if metric != "mean_per_class":
        raise ValueError(f"unknown metric {metric!r}")
    per_class = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(per_class))


def cross_validate(x: torch.Tensor, y: np.ndarray, num_classes: int, weight_decays: np.ndarray, metric: str,
                   folds: int, seed: int, max_iter: int, name: str = "") -> np.ndarray:
    """Mean held-out score of every weight decay over stratified folds, shape (len(weight_decays),)."""
    counts = np.bincount(y, minlength=num_classes)
    if counts[counts > 0].min() < folds:
        raise UserError(f"{name}: {folds}-fold stratified CV needs at least {folds} images per class; the smallest class "
                        f"has {counts[counts > 0].min()}")
    cs = 1.0 / weight_decays
    scores = np.zeros((folds, len(cs)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (fit_idx, held_idx) in enumerate(splitter.split(np.zeros(len(y)), y)):
        models = fit_path(x[fit_idx], torch.from_numpy(y[fit_idx]), num_classes, cs, max_iter=max_iter)
        for i, model in enumerate(models):
            scores[fold, i] = score(y[held_idx], model.predict(x[held_idx]).cpu().numpy(), metric)
    return scores.mean(axis=0)


@dataclass
class HoldoutFit:
    """What ssl-transfer's hold-out selection gives: the estimator after the trainval refit, and the path to it."""

    classifier: LogisticRegression
    best: int  # index of the selected weight decay
    val_scores: list[float] = field(default_factory=list)  # per weight decay, in grid order
    n_iter: list[int] = field(default_factory=list)  # lbfgs iterations per grid fit (max_iter = stopped at the cap)


def sslt_holdout(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 trainval: tuple[np.ndarray, np.ndarray], weight_decays: np.ndarray, metric: str) -> HoldoutFit:
    """ssl-transfer's ``LinearTester.validate`` + ``evaluate`` (§5.4): ONE scikit-learn estimator (``SSLT_SOLVER``)
    is fitted on train for C = 1 / wd in the given (increasing wd) order, each fit warm-started from the previous
    one, and scored on val; the first strictly greater score wins (ties keep the larger C); the same estimator,
    still warm from the last grid fit, is refitted on trainval with the chosen C. Inputs are float64 arrays (the
    float64 fits ssl-transfer's scikit-learn ran; newer ones would fit float32 input in float32)."""
    classifier = LogisticRegression(**SSLT_SOLVER)
    result = HoldoutFit(classifier, best=0)
    best_score = 0.0  # ssl-transfer starts from 0 and needs a strictly greater score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # ssl-transfer ignores them too: most fits hit the cap
        for i, wd in enumerate(weight_decays):
            classifier.set_params(C=1.0 / float(wd))
            classifier.fit(*train)
            value = score(val[1], classifier.predict(val[0]), metric)
            result.val_scores.append(value)
            result.n_iter.append(int(np.max(classifier.n_iter_)))
            if value > best_score:
                best_score, result.best = value, i
        classifier.set_params(C=1.0 / float(weight_decays[result.best]))
        classifier.fit(*trainval)
    return result


@dataclass
class TransferParams:
    protocol: str = "cv5"  # cv5 (paper) | sslt-holdout (ssl-transfer's code path)
    folds: int = 5
    grid: int = 45
    datasets: tuple[str, ...] = ()  # default: every one of the nine found under --data-root
    feature: str = "cls"
    transform: str = "eval_sslt"
    max_iter: int = 1000
    seed: int = 0


def _features(ctx: TaskContext, dataset: Dataset, split: str, params: TransferParams) -> tuple[torch.Tensor, np.ndarray]:
    feats = ctx.features(split, params.feature, params.transform, dataset=dataset)
    return feats.tensor(ctx.device).double(), np.asarray(feats.labels)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def evaluate_dataset(ctx: TaskContext, dataset: Dataset, params: TransferParams) -> tuple[float, dict]:
    """Test score (x100) with the selected C, and what was selected."""
    decays = weight_decay_grid(params.grid)
    num_classes = dataset.num_classes
    metric = dataset.metric
    if params.protocol == "cv5":
        x, y = _features(ctx, dataset, "trainval", params)
        mean_scores = cross_validate(x, y, num_classes, decays, metric, params.folds, params.seed, params.max_iter,
                                     dataset.name)
        best = int(np.argmax(mean_scores))  # first maximum: ties go to the smaller wd (larger C)
        model = fit_logistic(x, torch.from_numpy(y), num_classes, 1.0 / decays[best], max_iter=params.max_iter)

        def predict(features: torch.Tensor) -> np.ndarray:
            return model.predict(features).cpu().numpy()
        selection = {"cv_scores": [round(float(s), 5) for s in mean_scores]}
    else:  # sslt: scikit-learn along decreasing C (warm start), pick on val, refit on trainval warm-started
        decays = sslt_weight_decays(params.grid)
        x_train, y_train = _features(ctx, dataset, "train", params)
        x_val, y_val = _features(ctx, dataset, "val", params)
        x, y = _features(ctx, dataset, "trainval", params)
        fit = sslt_holdout((_numpy(x_train), y_train), (_numpy(x_val), y_val), (_numpy(x), y), decays, metric)
        best = fit.best

        def predict(features: torch.Tensor) -> np.ndarray:
            return fit.classifier.predict(_numpy(features))
        selection = {"val_scores": [round(float(s), 5) for s in fit.val_scores], "n_iter": fit.n_iter,
                     "fits_at_max_iter": sum(n >= SSLT_SOLVER["max_iter"] for n in fit.n_iter)}
    x_test, y_test = _features(ctx, dataset, "test", params)
    value = 100.0 * score(y_test, predict(x_test), metric)
    return value, {"metric": metric, "best_wd": float(decays[best]), "best_C": float(1.0 / decays[best]),
                   "n_trainval": int(len(y)), **selection}


def check_params(params: TransferParams) -> None:
    """The options alone, before any model or data."""
    check_choice("transfer.protocol", params.protocol, list(PROTOCOLS))
    check_at_least("transfer.folds", params.folds, 2)
    check_at_least("transfer.grid", params.grid, 1)
    check_at_least("transfer.max_iter", params.max_iter, 1)
    unknown = sorted(set(params.datasets) - set(TRANSFER_DATASETS))
    if unknown:
        raise UserError(f"unknown transfer dataset(s) {', '.join(unknown)}; valid: {', '.join(TRANSFER_DATASETS)}")
    check_feature("transfer.feature", params.feature, pooled=True)
    check_transform("transfer.transform", params.transform)


@register_task("transfer", version=PROTOCOLS["cv5"], params=TransferParams, needs=("data_root",), check=check_params,
               description="linear probes on the nine transfer datasets, L2 by 5-fold CV (or sslt hold-out)")
def run(ctx: TaskContext, params: TransferParams) -> list[ResultRow]:
    if params.protocol not in PROTOCOLS:
        raise UserError(f"transfer protocol {params.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    found = find_transfer_datasets(ctx.extra["data_root"])
    wanted = list(params.datasets) or list(TRANSFER_DATASETS)
    unknown = sorted(set(wanted) - set(TRANSFER_DATASETS))
    if unknown:
        raise UserError(f"unknown transfer dataset(s) {', '.join(unknown)}; valid: {', '.join(TRANSFER_DATASETS)}")
    missing = [k for k in wanted if k not in found]
    if params.datasets and missing:
        raise UserError(f"{', '.join(missing)} not found under {ctx.extra['data_root']}")
    if not [k for k in wanted if k in found]:
        raise UserError(f"none of the transfer datasets found under {ctx.extra['data_root']}")
    protocol = PROTOCOLS[params.protocol]
    if params.protocol == "cv5":
        setup = {"grid": "wd=10^linspace(-6,5,%d), C=1/wd" % params.grid, "folds": params.folds, "seed": params.seed,
                 "solver": f"ssl_bench.logreg lbfgs, max_iter={params.max_iter}"}
    else:
        setup = {"grid": "wd=torch.logspace(-6,5,%d) float32, C=1/wd" % params.grid,
                 "solver": "sklearn LogisticRegression lbfgs, one warm-started estimator along the grid, "
                           "max_iter=100, tol=1e-4"}
    base = {"protocol": params.protocol, **setup, "feature": params.feature, "transform": params.transform,
            "sklearn": sklearn.__version__}
    rows, values = [], {}
    for key in wanted:
        if key not in found:
            continue
        value, details = evaluate_dataset(ctx, found[key], params)
        values[key] = value
        log.info("transfer %s: %.2f (%s, C=%g)", key, value, details["metric"], details["best_C"])
        rows.append(ctx.row(task="transfer", protocol=protocol, split="test", metric="score", value=value,
                            params={**base, **details}, dataset=key, n=None))
    if missing:
        log.warning("transfer: %s not found under %s; no nine-dataset average", ", ".join(missing), ctx.extra["data_root"])
    elif len(values) == len(TRANSFER_DATASETS):
        rows.append(ctx.row(task="transfer", protocol=protocol, split="test", metric="score",
                            value=float(np.mean(list(values.values()))), params={**base, "datasets": list(values)},
                            dataset="average"))
    return rows

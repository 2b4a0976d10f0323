"""ImageNet few-shot logistic regression, MSN protocol (``msn/logistic_eval.py``; protocols.md §4, §12.1, §13).

For 1, 2 and 5 training images per class, three splits each (mean and std of top-1 over the splits), and the 1 %
subset: a multinomial L2 logistic regression without intercept on frozen features of the subset's images, scored
on the full val split. Features: last-block CLS before the final norm (MSN's ``forward_blocks``; ``feature=cls``
for the post-norm CLS), transform ``eval_msn``, fp32 extraction; every row centred on its own mean, then scaled to
unit L2 norm (cyanure's ``preprocess(centering=True, normalize=True, columns=False)``), train and val alike.

Splits come from MSN's files (``split_dir`` holding ``imagenet_subsets{1,2,3}/``, or any files in its line format
through ``split_file``) or, without files, are drawn per class with a recorded seed (nested, 1 within 2 within 5 in a
split, as MSN's are). Only the images of the splits go through the backbone: at ImageNet scale their union is
about 23k images (1 % plus the other splits' 5-shot sets), against 1.28M for the whole train split, and the union
is a split of its own in the feature cache, so a rerun of the same splits never runs the model again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_bench.context import TaskContext
from ssl_bench.data import Dataset, FileSplit, ImageSplit
from ssl_bench.errors import UserError
from ssl_bench.io import sha256_file
from ssl_bench.logreg import fit_logistic
from ssl_bench.options import check_at_least, check_feature, check_ints_at_least, check_positive, check_transform
from ssl_bench.registry import register_task
from ssl_bench.results import ResultRow

log = logging.getLogger(__name__)

FEWSHOT_VERSION = "msn-fewshot-v1"
MSN_LAMBD = 0.075  # DINO-vMF's few-shot L2 strength (MSN's ``lambd``)
ONE_PERCENT = 0.01
ONE_PERCENT_FILE = "imagenet_subsets1/1percent.txt"
MSN_FORMAT = "one ImageNet train file name per line, <wnid>_<id>.JPEG (MSN's imagenet_subsets files)"
SUBSET_SPLIT = "train_fewshot"  # name of the split holding the union of the subsets' images


@dataclass(frozen=True)
class FewShotSplit:
    """The training rows of one split: indices into the train split, and where they came from."""

    indices: np.ndarray
    source: dict  # {"file": path, "sha256": ...} or {"seed": n}


@dataclass
class Setting:
    """A few-shot setting (``1shot``, ``1pct``, ...) and its splits; one result row each."""

    name: str
    shots: int | None  # images per class when every class has the same number
    splits: list[FewShotSplit]

    @property
    def metric(self) -> str:
        return f"top1_{self.name}"


# --- split files ----------------------------------------------------------------------------------------------

def msn_split_file(split_dir: str | os.PathLike, shots: int, split: int) -> Path:
    """MSN's file for ``shots`` images per class, split 1..3: ``imagenet_subsets{split}/{shots}imgs_class.txt``.

    Split 3 of the 5-shot setting is named ``3imgs_class.txt`` in MSN's repository (it holds 5 images per class,
    protocols.md §4.1); it is used when ``5imgs_class.txt`` is absent there.
    """
    folder = Path(split_dir) / f"imagenet_subsets{split}"
    path = folder / f"{shots}imgs_class.txt"
    if shots == 5 and split == 3 and not path.exists() and (folder / "3imgs_class.txt").exists():
        return folder / "3imgs_class.txt"
    return path


def read_split_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, file name) for every non-blank line; LF or CRLF, surrounding blanks ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file {path} does not exist; expected {MSN_FORMAT}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def image_index(train: ImageSplit) -> dict[tuple[str, str], int]:
    """(class folder, file name) -> index into the train split, for mapping split-file lines to images."""
    if not isinstance(train, FileSplit):
        raise UserError("split files need an ImageFolder dataset (train/<wnid>/<image>); "
                        "without split files, k-per-class splits are drawn from a seed")
    index: dict[tuple[str, str], int] = {}
    for i, (path, label) in enumerate(zip(train.paths, train.labels.tolist())):
        index.setdefault((train.classes[label], os.path.basename(path)), i)
    return index


def parse_split_file(path: str | os.PathLike, train: ImageSplit,
                     index: dict[tuple[str, str], int] | None = None) -> np.ndarray:
    """Train-split indices of the images a split file names, in file order.

    A line ``<wnid>_<id>.JPEG`` names ``<train root>/<wnid>/<wnid>_<id>.JPEG``: the class is the text before the first
    ``_``. A line that does not have that form or names no image of the train split is an error naming the line.
    """
    index = image_index(train) if index is None else index
    classes = set(train.classes)
    root = Path(getattr(train, "root", ".")) / "train"
    indices: list[int] = []
    for number, name in read_split_lines(path):
        wnid, sep, rest = name.partition("_")
        if not sep or not wnid or not rest or "/" in name or any(c.isspace() for c in name):
            raise UserError(f"{path}, line {number}: {name!r} is not <wnid>_<id>.JPEG; expected {MSN_FORMAT}")
        if wnid not in classes:
            raise UserError(f"{path}, line {number}: {name!r} names class {wnid!r}, which is not a class folder of "
                            f"the train split ({len(classes)} classes, e.g. {sorted(classes)[0]!r})")
        found = index.get((wnid, name))
        if found is None:
            raise UserError(f"{path}, line {number}: no image {root / wnid / name} in the train split")
        indices.append(found)
    if not indices:
        raise UserError(f"split file {path} is empty; expected {MSN_FORMAT}")
    if len(set(indices)) != len(indices):
        log.warning("split file %s names %d images more than once; they are used as often as listed (as MSN does)",
                    path, len(indices) - len(set(indices)))
    return np.asarray(indices, dtype=np.int64)


def per_class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)


def check_every_class(counts: np.ndarray, classes: Sequence[str], what: str) -> None:
    """MSN's solver (cyanure) silently skips fitting unless labels are exactly 0..K-1 (§13): demand every class."""
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        names = ", ".join(classes[i] for i in missing[:5])
        raise UserError(f"{what} has no image of {len(missing)} of the {len(classes)} classes ({names}"
                        f"{', ...' if len(missing) > 5 else ''}); the protocol trains on every class")


def uniform_shots(counts: np.ndarray) -> int | None:
    return int(counts[0]) if len(counts) and bool((counts == counts[0]).all()) else None


# --- generated splits -----------------------------------------------------------------------------------------

def _class_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Each class's train indices in a seeded random order (one generator per seed, classes in label order)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def _check_class_sizes(orders: list[np.ndarray], needed: Sequence[int], classes: Sequence[str]) -> None:
    short = [(classes[c], len(order), need) for c, (order, need) in enumerate(zip(orders, needed)) if len(order) < need]
    if short:
        listing = ", ".join(f"{name} ({n} of {need})" for name, n, need in short[:5])
        raise UserError(f"too few training images in {len(short)} classes for the few-shot split: "
                        f"{listing}{', ...' if len(short) > 5 else ''}")


def generate_split(labels: np.ndarray, num_classes: int, shots: int, seed: int,
                   classes: Sequence[str] | None = None) -> np.ndarray:
    """``shots`` train indices per class, every class, drawn with ``seed`` (sorted).

    The first ``shots`` of each class's seeded order, so splits drawn with one seed are nested (1 within 2 within 5).
    """
    if shots < 1:
        raise UserError(f"few-shot: shots must be >= 1; got {shots}")
    classes = classes if classes is not None else [str(c) for c in range(num_classes)]
    orders = _class_orders(np.asarray(labels), num_classes, seed)
    _check_class_sizes(orders, [shots] * num_classes, classes)
    return np.sort(np.concatenate([order[:shots] for order in orders]))


def generate_fraction(labels: np.ndarray, num_classes: int, fraction: float, seed: int,
                      classes: Sequence[str] | None = None) -> np.ndarray:
    """``round(fraction * N)`` train indices in all (at least one per class), spread evenly over the classes, drawn
    with ``seed`` (sorted).

    Like SimCLR's 1 % ImageNet file that MSN uses (12,811 images, 12 or 13 per class whatever the class size):
    every class gets the floor or the ceiling of the per-class share, the classes that get one more are drawn with
    the seed, and each class takes the first images of the same seeded order as ``generate_split`` (so the
    5-shot split of that seed lies inside whenever the share is at least 5).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"few-shot: fraction must be in (0, 1]; got {fraction}")
    classes = classes if classes is not None else [str(c) for c in range(num_classes)]
    labels = np.asarray(labels)
    orders = _class_orders(labels, num_classes, seed)
    total = max(num_classes, round(fraction * len(labels)))
    counts = np.full(num_classes, total // num_classes)
    extra = np.random.default_rng([seed, 1]).choice(num_classes, total - int(counts.sum()), replace=False)
    counts[extra] += 1
    _check_class_sizes(orders, counts.tolist(), classes)
    return np.sort(np.concatenate([order[:count] for order, count in zip(orders, counts.tolist())]))


# --- preprocessing and classifier -------------------------------------------------------------------------------

def preprocess(features: torch.Tensor) -> torch.Tensor:
    """Each row minus its own mean over the feature dimensions, then scaled to unit L2 norm (per sample, so train and
    val are treated alike without leakage). float64."""
    x = features.double()
    return F.normalize(x - x.mean(dim=1, keepdim=True), p=2, dim=1)


def penalty_to_C(lambd: float) -> float:
    """scikit-learn's C for MSN's ``lambd``.

    cyanure minimises (1/n) sum_i loss_i + (lambda/2) ||W||^2 with lambda = lambd / n (MSN divides by n), i.e.
    (1/n) sum_i loss_i + (lambd / (2n)) ||W||^2. Multiplying by n / lambd, a positive constant that moves no
    minimiser, gives (1/lambd) sum_i loss_i + 0.5 ||W||^2: scikit-learn's objective with C = 1 / lambd, whatever n.
    """
    if not lambd > 0:
        raise UserError(f"few-shot: lambd must be > 0; got {lambd}")
    return 1.0 / lambd


def fewshot_top1(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, lambd: float = MSN_LAMBD, tol: float = 1e-6, max_iter: int = 1000,
                 device: torch.device | str | None = None) -> tuple[float, dict]:
    """Top-1 % on val of MSN's classifier fitted on (train_x, train_y); features already ``preprocess``-ed.

    Returns (accuracy, solver report). No intercept, L2 penalty ``lambd`` as MSN means it (``penalty_to_C``).
    """
    model = fit_logistic(train_x, train_y, num_classes, C=penalty_to_C(lambd), fit_intercept=False, tol=tol,
                         max_iter=max_iter, dtype=torch.float64, device=device)
    top1 = 100.0 * model.score(val_x, val_y)
    return top1, {"n_iter": model.n_iter, "converged": model.converged, "stop_reason": model.stop_reason,
                  "grad_rel": model.grad_rel}


# --- the task ---------------------------------------------------------------------------------------------------

@dataclass
class FewShotParams:
    shots: tuple[int, ...] = (1, 2, 5)
    splits: int = 3
    one_percent: bool = True
    feature: str = "cls_prenorm"
    transform: str = "eval_msn"
    lambd: float = MSN_LAMBD
    split_dir: str | None = None  # folder holding MSN's imagenet_subsets1/ 2/ 3/
    split_file: tuple[str, ...] = ()  # split files in MSN's line format, each one split (shots/splits then unused)
    seed: int = 0  # generated splits: split s is drawn with seed + s, the 1 % subset with seed
    tol: float = 1e-6  # solver: relative gradient (ssl_bench.logreg)
    max_iter: int = 1000


def _file_split(path: str | os.PathLike, train: ImageSplit, index: dict) -> tuple[FewShotSplit, np.ndarray]:
    indices = parse_split_file(path, train, index)
    counts = per_class_counts(train.labels[indices], len(train.classes))
    check_every_class(counts, train.classes, f"split file {path}")
    return FewShotSplit(indices, {"file": str(path), "sha256": sha256_file(path)}), counts


def _settings_from_msn_dir(params: FewShotParams, train: ImageSplit) -> list[Setting]:
    if not 1 <= params.splits <= 3:
        raise UserError(f"few-shot: MSN's split files hold 3 splits per setting; splits={params.splits}")
    index = image_index(train)
    settings = []
    for shots in params.shots:
        splits = []
        for s in range(1, params.splits + 1):
            path = msn_split_file(params.split_dir, shots, s)
            split, counts = _file_split(path, train, index)
            if not bool((counts == shots).all()):
                raise UserError(f"split file {path} should hold {shots} images per class; it holds "
                                f"{counts.min()} to {counts.max()}")
            splits.append(split)
        settings.append(Setting(f"{shots}shot", shots, splits))
    if params.one_percent:
        path = Path(params.split_dir) / ONE_PERCENT_FILE
        if not path.is_file():
            raise UserError(f"{path} does not exist (MSN's 1 % split); add it or pass -p one_percent=false")
        settings.append(Setting("1pct", None, [_file_split(path, train, index)[0]]))
    return settings


def _settings_from_files(files: Sequence[str], train: ImageSplit) -> list[Setting]:
    """Each file one split; files with the same images-per-class count form one setting (``{k}shot``); MSN's
    ``1percent.txt`` is ``1pct``; any other file is a setting named after it."""
    index = image_index(train)
    settings: dict[str, Setting] = {}
    for path in files:
        split, counts = _file_split(path, train, index)
        shots = uniform_shots(counts)
        stem = Path(path).stem
        if stem == "1percent":
            name = "1pct"
        elif shots is not None:
            name = f"{shots}shot"
        else:
            name = "".join(c if c.isalnum() else "_" for c in stem)
        settings.setdefault(name, Setting(name, shots, [])).splits.append(split)
    return list(settings.values())


def _generated_settings(params: FewShotParams, train: ImageSplit) -> list[Setting]:
    if params.splits < 1:
        raise UserError(f"few-shot: splits must be >= 1; got {params.splits}")
    labels, k = train.labels, len(train.classes)
    settings = [
        Setting(f"{shots}shot", shots, [
            FewShotSplit(generate_split(labels, k, shots, params.seed + s, train.classes), {"seed": params.seed + s})
            for s in range(params.splits)
        ])
        for shots in params.shots
    ]
    if params.one_percent:
        indices = generate_fraction(labels, k, ONE_PERCENT, params.seed, train.classes)
        settings.append(Setting("1pct", None, [FewShotSplit(indices, {"seed": params.seed, "fraction": ONE_PERCENT})]))
    return settings


def build_settings(params: FewShotParams, train: ImageSplit) -> tuple[str, list[Setting]]:
    """(split source, settings): MSN's folder, given files, or seeded draws."""
    if not params.shots and not params.split_file and not params.one_percent:
        raise UserError("few-shot: nothing to run; give shots, one_percent=true or split_file")
    if params.split_dir and params.split_file:
        raise UserError("few-shot: give split_dir (MSN's imagenet_subsets folders) or split_file, not both")
    if params.split_file:
        return "files", _settings_from_files(params.split_file, train)
    if params.split_dir:
        return "msn-files", _settings_from_msn_dir(params, train)
    return "generated", _generated_settings(params, train)


class SubsetSplit(ImageSplit):
    """Some images of a split, as a split of their own (own manifest, so the feature cache keys on exactly them)."""

    def __init__(self, parent: ImageSplit, indices: np.ndarray) -> None:
        self.parent, self.indices = parent, np.asarray(indices, dtype=np.int64)
        self.classes = parent.classes
        self.labels = parent.labels[self.indices]

    def load_image(self, index: int):
        return self.parent.load_image(int(self.indices[index]))

    def manifest_lines(self) -> list[str]:
        parent = self.parent
        if isinstance(parent, FileSplit):  # the parent's own lines for these files, without stat-ing the rest
            return [f"{os.path.relpath(parent.paths[i], parent.root)}\t{os.path.getsize(parent.paths[i])}\t"
                    f"{parent.labels[i]}" for i in self.indices.tolist()]
        return [f"subset of {parent.manifest_sha256()}", ",".join(map(str, self.indices.tolist()))]


def check_params(params: FewShotParams) -> None:
    """The options alone, before any model or data: ranges, and that the named split files and folder exist."""
    check_ints_at_least("fewshot.shots", params.shots, 1, allow_empty=True)
    check_at_least("fewshot.splits", params.splits, 1)
    check_positive("fewshot.lambd", params.lambd)
    check_positive("fewshot.tol", params.tol)
    check_at_least("fewshot.max_iter", params.max_iter, 1)
    check_feature("fewshot.feature", params.feature, pooled=True)
    check_transform("fewshot.transform", params.transform)
    if not params.shots and not params.split_file and not params.one_percent:
        raise UserError("few-shot: nothing to run; give shots, one_percent=true or split_file")
    if params.split_dir and params.split_file:
        raise UserError("few-shot: give split_dir (MSN's imagenet_subsets folders) or split_file, not both")
    if params.split_dir and not params.splits <= 3:
        raise UserError(f"few-shot: MSN's split files hold 3 splits per setting; splits={params.splits}")
    if params.split_dir and not Path(params.split_dir).is_dir():
        raise UserError(f"fewshot.split_dir {params.split_dir} is not a folder; expected MSN's imagenet_subsets parent")
    absent = [f for f in params.split_file if not Path(f).is_file()]
    if absent:
        raise UserError(f"split file {absent[0]} does not exist; expected {MSN_FORMAT}")


@register_task(
    "fewshot", version=FEWSHOT_VERSION, params=FewShotParams, check=check_params,
    description="few-shot logistic regression (MSN protocol): 1/2/5 img/class x 3 splits and 1 %, top-1 on val",
)
def run(ctx: TaskContext, params: FewShotParams) -> list[ResultRow]:
    train, val = ctx.dataset.split("train"), ctx.dataset.split("val")
    num_classes = ctx.dataset.num_classes
    source, settings = build_settings(params, train)
    union = np.unique(np.concatenate([s.indices for setting in settings for s in setting.splits]))
    # MSN extracts in fp32 (§13): "auto" means fp32 here, on any device; an explicit --precision is honoured.
    precision = "fp32" if ctx.precision == "auto" else ctx.precision
    sub = dataclasses.replace(ctx, precision=precision, dataset=Dataset(
        name=ctx.dataset.name, spec=ctx.dataset.spec, splits={SUBSET_SPLIT: SubsetSplit(train, union), "val": val}))
    train_features = sub.features(SUBSET_SPLIT, params.feature, params.transform)
    val_features = sub.features("val", params.feature, params.transform)
    if train_features.features.ndim != 2:
        raise UserError(f"few-shot needs pooled features (N, D); feature {params.feature!r} gives shape "
                        f"{train_features.features.shape}")
    device = ctx.device
    train_x = preprocess(train_features.tensor(device))
    val_x = preprocess(val_features.tensor(device))
    val_y = torch.from_numpy(np.asarray(val_features.labels)).to(device)
    C = penalty_to_C(params.lambd)
    base = {
        "lambd": params.lambd, "C": C, "feature": params.feature, "transform": params.transform,
        "precision": precision, "feature_dtype": str(train_features.features.dtype),
        "preprocess": "row-centre+l2", "split_source": source, "std_ddof": 0,
        "solver": (f"ssl_bench.logreg lbfgs float64 multinomial no-intercept tol={params.tol:g} "
                   f"max_iter={params.max_iter}"),
    }
    rows: list[ResultRow] = []
    for setting in settings:
        accuracies, reports, sizes = [], [], []
        for split in setting.splits:
            positions = np.searchsorted(union, split.indices)
            top1, report = fewshot_top1(
                train_x[torch.from_numpy(positions).to(device)],
                torch.from_numpy(train.labels[split.indices]).to(device), val_x, val_y, num_classes,
                lambd=params.lambd, tol=params.tol, max_iter=params.max_iter, device=device)
            accuracies.append(top1)
            reports.append(report)
            sizes.append(len(split.indices))
            log.info("few-shot %s %s: top-1 %.2f %% (%d train images, %d iterations)", setting.name, split.source,
                     top1, len(split.indices), report["n_iter"])
        mean = float(np.mean(accuracies))
        std = float(np.std(accuracies)) if len(accuracies) > 1 else None
        rows.append(ctx.row(
            task="fewshot", protocol=FEWSHOT_VERSION, split="val", metric=setting.metric, value=mean, std=std,
            n=len(val_y), params={
                **base, "setting": setting.name, "shots": setting.shots, "splits": [s.source for s in setting.splits],
                "per_split_top1": accuracies, "n_train": sizes,
                "solver_iterations": [r["n_iter"] for r in reports],
                "converged": all(r["converged"] for r in reports),
            }))
        log.info("few-shot %s: top-1 %.2f %%%s", setting.name, mean,
                 f" +- {std:.2f} over {len(accuracies)} splits" if std is not None else "")
    return rows

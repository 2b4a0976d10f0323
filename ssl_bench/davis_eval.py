"""DAVIS-2017 on disk and its semi-supervised evaluation (``davis2017-evaluation``, protocols.md §7.1 and §7.5).

Region similarity J is the IoU of an object's predicted and true masks; boundary accuracy F is the F-measure of
their one-pixel boundaries matched within a disk of radius ceil(0.008 x image diagonal). Per object, over frames
1 .. n-2 (the first frame is given, the last is excluded as in the official evaluator): mean, recall (fraction
of frames above 0.5) and decay (first quarter minus last quarter). Global scores average over all objects of all
sequences. Unlike the reference, a missing frame or an object id above the sequence's object count raises
``UserError`` instead of exiting with status 0, and existing CSVs are always recomputed, never reused.
``DavisLayout.check_sequence`` lines frames and annotations up (from image headers only) before any model work.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from PIL import Image

from .errors import UserError
from .io import atomic_write_text
from .palette import read_label_png
from .runtime import hide_progress

VOID = 255
BOUNDARY_FRACTION = 0.008  # of the image diagonal: the F tolerance radius


# --------------------------------------------------------------------------------------------- layout (§7.1)

@dataclass(frozen=True)
class DavisLayout:
    """``ROOT/JPEGImages/<res>/<seq>/*.jpg``, ``ROOT/Annotations/<res>/<seq>/*.png`` and
    ``ROOT/ImageSets/2017/<split>.txt``."""

    root: Path
    resolution: str = "480p"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def frames_dir(self) -> Path:
        return self.root / "JPEGImages" / self.resolution

    @property
    def annotations_dir(self) -> Path:
        return self.root / "Annotations" / self.resolution

    def split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "2017" / f"{split}.txt"

    def sequences(self, split: str) -> list[str]:
        """Sequence names of a split file, in file order (one per line, blank lines ignored)."""
        if not self.root.is_dir():
            raise UserError(f"DAVIS root {self.root} does not exist; expected a folder holding JPEGImages/, "
                            f"Annotations/ and ImageSets/2017/")
        path = self.split_file(split)
        if not path.is_file():
            raise UserError(f"DAVIS split file {path} does not exist "
                            f"(expected ImageSets/2017/{split}.txt under {self.root})")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise UserError(f"DAVIS split file {path} lists no sequences")
        return names

    def frames(self, sequence: str) -> list[Path]:
        folder = self.frames_dir / sequence
        if not folder.is_dir():
            raise UserError(f"DAVIS frames folder {folder} does not exist")
        paths = sorted(folder.glob("*.jpg"))
        if not paths:
            raise UserError(f"DAVIS frames folder {folder} holds no .jpg frames")
        return paths

    def annotations(self, sequence: str) -> list[Path]:
        folder = self.annotations_dir / sequence
        if not folder.is_dir():
            raise UserError(f"DAVIS annotations folder {folder} does not exist")
        paths = sorted(folder.glob("*.png"))
        if not paths:
            raise UserError(f"DAVIS annotations folder {folder} holds no .png masks")
        return paths

    def first_annotation(self, sequence: str) -> Path:
        """The mask of the first frame: the annotation named like frame 0 (as the reference derives it)."""
        path = self.annotations_dir / sequence / f"{self.frames(sequence)[0].stem}.png"
        if not path.is_file():
            raise UserError(f"DAVIS first-frame annotation {path} does not exist")
        return path

    def check_sequence(self, sequence: str) -> tuple[list[Path], Path]:
        """The frames and the given mask of ``sequence``, once they are known to line up.

        Numbered frames have no gap; every annotation has its frame; the first annotation is the first frame's (the
        given mask, which the evaluator then leaves out); every frame has the first frame's size and every
        annotation its frame's. Otherwise one ``UserError`` naming the sequence and the file. Reads image headers
        only, so a whole split is checked in moments, before any model work."""
        frames, annotations = self.frames(sequence), self.annotations(sequence)
        where = f"DAVIS sequence {sequence}"
        _check_numbering(where, frames)
        by_stem = {path.stem: path for path in frames}
        for path in annotations:
            if path.stem not in by_stem:
                raise UserError(f"{where}: annotation {path} has no frame ({self.frames_dir / sequence / path.stem}"
                                f".jpg is missing); every annotated frame needs its image")
        if annotations[0].stem != frames[0].stem:
            raise UserError(f"{where}: the first frame {frames[0]} has no annotation (the first one is "
                            f"{annotations[0].name}); the given mask must be the first frame's")
        size = _image_size(frames[0])
        for path in frames[1:]:
            if _image_size(path) != size:
                raise UserError(f"{where}: frame {path} is {_wxh(_image_size(path))}, the first frame "
                                f"{frames[0].name} is {_wxh(size)}; every frame must have one size")
        for path in annotations:
            if _image_size(path) != size:
                raise UserError(f"{where}: annotation {path} is {_wxh(_image_size(path))}, its frame "
                                f"{by_stem[path.stem].name} is {_wxh(size)}; they must match")
        return frames, annotations[0]


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ...
        raise UserError(f"cannot read DAVIS image {path} ({type(error).__name__}: {error})") from None


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_numbering(where: str, frames: list[Path]) -> None:
    """Frames named by their number (DAVIS: 00000.jpg ...) must run without a gap: a hole is a missing image."""
    if not all(path.stem.isdigit() for path in frames):
        return
    numbers = sorted(int(path.stem) for path in frames)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        width = len(frames[0].stem)
        first = frames[0].parent / f"{missing[0]:0{width}d}.jpg"
        raise UserError(f"{where}: frame {first} is missing ({len(missing)} of the numbers {frames[0].stem} to "
                        f"{frames[-1].stem} have no image)")


# --------------------------------------------------------------------------------------------- per-frame measures

def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU over the last two axes of boolean masks [..., H, W]; an empty union counts as a perfect 1."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    inter = (gt & pred).sum(axis=(-2, -1))
    union = (gt | pred).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union == 0, 1.0, inter / np.maximum(union, 1)).astype(np.float64)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a mask [H, W]: a pixel differs from its right, lower or lower-right neighbour.

    Neighbours beyond the image count as background, except that the last row looks only to its right, the
    last column only down, and the bottom-right corner is never a boundary (the reference's ``_seg2bmap``).
    """
    seg = np.asarray(seg).astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def boundary_radius(height: int, width: int, fraction: float = BOUNDARY_FRACTION) -> int:
    """ceil(fraction x diagonal): 8 px at 854x480, 9 at 910x480, 10 at 1152x480."""
    return int(math.ceil(fraction * math.hypot(height, width)))


def disk(radius: int) -> np.ndarray:
    """uint8 disk structuring element: x^2 + y^2 <= r^2 on a (2r+1)^2 grid (scikit-image's ``disk``)."""
    offsets = np.arange(-radius, radius + 1)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius ** 2).astype(np.uint8)


def boundary_f(gt: np.ndarray, pred: np.ndarray, fraction: float = BOUNDARY_FRACTION) -> float:
    """Boundary F-measure of one frame's masks [H, W] (the reference's ``f_measure``).

    No predicted boundary but a true one: P=1, R=0; a predicted but no true one: P=0, R=1; neither: P=R=1.
    """
    gt_b = seg2bmap(gt)
    pred_b = seg2bmap(pred)
    n_gt, n_pred = int(gt_b.sum()), int(pred_b.sum())
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        kernel = disk(boundary_radius(*gt_b.shape, fraction=fraction))
        gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel).astype(bool)
        pred_dil = cv2.dilate(pred_b.astype(np.uint8), kernel).astype(bool)
        precision = float((pred_b & gt_dil).sum()) / n_pred
        recall = float((gt_b & pred_dil).sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores (the reference's ``db_statistics``).

    mean = nanmean; recall = fraction of frames strictly above 0.5 (NaN counts as a miss); decay = nanmean of the
    first minus the last of four bins, ``ids = round(linspace(1, n, 5) + 1e-10) - 1`` and bin i =
    ``v[ids[i] : ids[i+1] + 1]`` (neighbouring bins share their edge frame). The reference casts ``ids`` to uint8,
    which wraps above 256 frames; here they are int64 (identical below that).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"statistics need a non-empty 1-D sequence; got shape {v.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(v))
        with np.errstate(invalid="ignore"):
            recall = float(np.mean(v > 0.5))
        ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def score_frames(gt: np.ndarray, pred: np.ndarray, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """J and F [num_objects, n] of label maps gt, pred [n, H, W] (ids 1..num_objects; void already removed)."""
    if gt.shape != pred.shape:
        raise UserError(f"result masks {pred.shape[1:]} and annotations {gt.shape[1:]} differ in size")
    n = gt.shape[0]
    j = np.zeros((num_objects, n))
    f = np.zeros((num_objects, n))
    for o in range(num_objects):
        gt_o, pred_o = gt == o + 1, pred == o + 1
        j[o] = jaccard(gt_o, pred_o)
        for t in range(n):
            f[o, t] = boundary_f(gt_o[t], pred_o[t])
    return j, f


# --------------------------------------------------------------------------------------------- sequences and totals

@dataclass(frozen=True)
class ObjectScores:
    sequence: str
    object_id: int
    j: tuple[float, float, float]  # mean, recall, decay
    f: tuple[float, float, float]

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"


GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


@dataclass
class DavisScores:
    objects: list[ObjectScores] = field(default_factory=list)
    frames: int = 0  # evaluated frames (first and last of each sequence excluded)
    sequences: int = 0

    def global_scores(self) -> dict[str, float]:
        """Object-weighted averages (fractions): every object of every sequence counts once."""
        if not self.objects:
            raise UserError("DAVIS evaluation: no objects in the annotations' first frames")
        j = np.array([o.j for o in self.objects])
        f = np.array([o.f for o in self.objects])
        jm, jr, jd = j.mean(axis=0)
        fm, fr, fd = f.mean(axis=0)
        return dict(zip(GLOBAL_COLUMNS, (float((jm + fm) / 2), jm, jr, jd, fm, fr, fd)))


def evaluate_sequence(layout: DavisLayout, results_dir: str | os.PathLike, sequence: str
                      ) -> tuple[list[ObjectScores], int]:
    """Scores of each object of one sequence, and the number of frames evaluated."""
    annotations = layout.annotations(sequence)
    if len(annotations) < 3:
        raise UserError(f"DAVIS sequence {sequence} has {len(annotations)} annotated frames; the evaluation "
                        f"excludes the first and the last, so it needs at least 3")
    first = read_label_png(annotations[0])
    first = np.where(first == VOID, 0, first)
    num_objects = int(first.max())
    evaluated = annotations[1:-1]
    masks = [read_label_png(p) for p in evaluated]
    for path, mask in zip(evaluated, masks):
        if mask.shape != first.shape:
            raise UserError(f"DAVIS sequence {sequence}: annotation {path} is {mask.shape[1]}x{mask.shape[0]}, the "
                            f"first one {annotations[0].name} is {first.shape[1]}x{first.shape[0]}; they must match")
    gt = np.stack(masks)
    gt[gt == VOID] = 0
    result_folder = Path(results_dir) / sequence
    paths = [result_folder / p.name for p in evaluated]
    for path in paths:
        if not path.is_file():
            raise UserError(f"DAVIS result {path} does not exist (one indexed PNG per annotated frame is expected)")
    pred = np.stack([read_label_png(p) for p in paths])
    if pred.shape != gt.shape:
        raise UserError(f"DAVIS results of {sequence} are {pred.shape[1:]} (H, W); the annotations are {gt.shape[1:]}")
    if int(pred.max()) > num_objects:
        raise UserError(f"DAVIS results of {sequence} hold object id {int(pred.max())}, but its first annotation has "
                        f"only {num_objects} object(s)")
    j, f = score_frames(gt, pred, num_objects)
    objects = [ObjectScores(sequence, o + 1, statistics(j[o]), statistics(f[o])) for o in range(num_objects)]
    return objects, len(evaluated)


def evaluate(layout: DavisLayout, results_dir: str | os.PathLike, sequences: Sequence[str]) -> DavisScores:
    """Semi-supervised J and F of the result PNGs ``results_dir/<seq>/<frame>.png`` against the annotations."""
    scores = DavisScores()
    for sequence in tqdm(sequences, desc="DAVIS evaluation", disable=hide_progress(), leave=False):
        objects, frames = evaluate_sequence(layout, results_dir, sequence)
        scores.objects += objects
        scores.frames += frames
        scores.sequences += 1
    return scores


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3f}"


def write_csvs(scores: DavisScores, out_dir: str | os.PathLike, split: str = "val") -> tuple[Path, Path]:
    """``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` in the official evaluator's format
    (fractions with 3 decimals; the per-sequence file has one row per object, named ``<seq>_<id>``)."""
    out_dir = Path(out_dir)
    global_path = out_dir / f"global_results-{split}.csv"
    per_seq_path = out_dir / f"per-sequence_results-{split}.csv"
    totals = scores.global_scores()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(GLOBAL_COLUMNS)
    writer.writerow([_fmt(totals[c]) for c in GLOBAL_COLUMNS])
    atomic_write_text(global_path, text.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("Sequence", "J-Mean", "F-Mean"))
    for o in scores.objects:
        writer.writerow((o.name, _fmt(o.j[0]), _fmt(o.f[0])))
    atomic_write_text(per_seq_path, text.getvalue())
    return global_path, per_seq_path

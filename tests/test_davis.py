"""DAVIS-2017: J and F by hand, the statistics, the neighbourhood window, label propagation, and the task end to
end through the CLI on a tiny replica (two sequences of a shape moving over a real photograph)."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.data import astronaut

from ssl_bench.cli import cli
from ssl_bench.davis_eval import (
    DavisLayout, boundary_f, boundary_radius, disk, evaluate, jaccard, seg2bmap, statistics, write_csvs,
)
from ssl_bench.errors import UserError
from ssl_bench.palette import pascal_palette, read_label_png, save_label_png
from ssl_bench.results import read_rows
from ssl_bench.tasks.davis import (
    first_frame_labels, neighbourhood_mask, propagate, soft_to_labels, target_size,
)

TINY = "vit_nano_patch4_32"


# --------------------------------------------------------------------------------------------- replica

def make_davis(root, frames: int = 5, height: int = 64, width: int = 128):
    """ROOT/{JPEGImages,Annotations}/480p/<seq>/0000k.{jpg,png} and ROOT/ImageSets/2017/val.txt.

    "square": one red square moving right; "pair": a red square moving right and a blue one moving down.
    """
    photo = np.array(Image.fromarray(astronaut()).resize((width, height), Image.BILINEAR))
    movers = {
        "square": [((10, 12), (0, 6), (230, 30, 30))],
        "pair": [((8, 10), (0, 7), (230, 30, 30)), ((6, 80), (5, 0), (30, 30, 230))],
    }
    for seq, objects in movers.items():
        for folder in ("JPEGImages", "Annotations"):
            (root / folder / "480p" / seq).mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            image, mask = photo.copy(), np.zeros((height, width), np.uint8)
            for obj, ((r, c), (dr, dc), colour) in enumerate(objects, start=1):
                r0, c0 = r + dr * t, c + dc * t
                image[r0:r0 + 16, c0:c0 + 16] = colour
                mask[r0:r0 + 16, c0:c0 + 16] = obj
            Image.fromarray(image).save(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", quality=95)
            save_label_png(root / "Annotations" / "480p" / seq / f"{t:05d}.png", mask)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("square\npair\n")
    return root


# --------------------------------------------------------------------------------------------- J and F

def square(shape=(40, 40), top=10, left=10, side=10):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_jaccard_by_hand():
    gt, empty = square(), np.zeros((40, 40), bool)
    assert jaccard(gt, empty) == 0.0  # empty prediction
    assert jaccard(empty, gt) == 0.0  # empty ground truth
    assert jaccard(empty, empty) == 1.0  # both empty: union 0 counts as perfect
    assert jaccard(gt, square(left=15)) == pytest.approx(50 / 150)  # 10 x 5 overlap, 10 x 15 union
    stacked = jaccard(np.stack([gt, gt]), np.stack([gt, empty]))
    np.testing.assert_allclose(stacked, [1.0, 0.0])


def test_seg2bmap_of_a_square_is_the_ring_around_its_top_left():
    bmap = seg2bmap(square())
    ring = np.zeros((40, 40), bool)
    ring[9:20, 9:20] = True
    ring[10:19, 10:19] = False  # 11 x 11 ring, rows and columns 9..19: 40 pixels
    np.testing.assert_array_equal(bmap, ring)
    # Last row and column look only right and only down; the bottom-right corner is never a boundary.
    row, col = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    row[3, 1:3], col[1:3, 3] = True, True
    np.testing.assert_array_equal(seg2bmap(row)[3], [True, False, True, False])
    np.testing.assert_array_equal(seg2bmap(col)[:, 3], [True, False, True, False])
    assert not seg2bmap(np.ones((4, 4), bool)).any()


def test_boundary_f_special_cases_and_a_shift_worked_by_hand():
    gt, empty = square(), np.zeros((40, 40), bool)
    assert boundary_f(gt, empty) == 0.0  # no predicted boundary: P = 1, R = 0
    assert boundary_f(empty, gt) == 0.0  # no true boundary: P = 0, R = 1
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(gt, gt) == 1.0
    assert boundary_radius(40, 40) == 1  # ceil(0.008 * 56.6): the disk is the 5-pixel cross
    np.testing.assert_array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    # Shift by 5 columns: rings at columns 9..19 (true) and 14..24 (predicted), rows 9..19, 40 pixels each.
    # Predicted pixels within one step (cross) of the true ring: top and bottom rows, columns 14..20 (7 + 7),
    # and the left column's ends next to the true top and bottom rows, rows 10 and 18 (2): P = 16 / 40.
    # By symmetry R = 16 / 40, so F = 0.4.
    assert boundary_f(gt, square(left=15)) == pytest.approx(0.4)
    assert boundary_f(gt, square(left=11)) == 1.0  # a 1-pixel shift lies within the tolerance everywhere
    assert [boundary_radius(480, w) for w in (854, 910, 1152)] == [8, 9, 10]


def test_statistics_on_known_sequences():
    mean, recall, decay = statistics([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    # ids = round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7]: first bin v[0:3], last bin v[5:8]
    assert mean == pytest.approx(0.65)
    assert recall == pytest.approx(5 / 8)  # strictly above 0.5
    assert decay == pytest.approx(0.9 - 0.4)
    mean, recall, decay = statistics([1.0, math.nan, 0.2, 0.8])
    # ids = [0, 1, 2, 2, 3]: first bin [1, nan] -> 1, last bin [0.2, 0.8] -> 0.5; NaN is a miss for recall
    assert (mean, recall, decay) == pytest.approx((2 / 3, 0.5, 0.5))
    assert statistics([0.7, 0.7, 0.7]) == pytest.approx((0.7, 1.0, 0.0))


def test_palette_is_the_pascal_colour_map():
    palette = pascal_palette()
    assert palette.shape == (256, 3)
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette}) == 256


# --------------------------------------------------------------------------------------------- propagation

def test_neighbourhood_mask_matches_a_loop():
    rows, cols, size = 7, 9, 2
    expected = torch.zeros(rows, cols, rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(cols):
            for p in range(i - size, i + size + 1):
                for q in range(j - size, j + size + 1):
                    if 0 <= p < rows and 0 <= q < cols:
                        expected[i, j, p, q] = True
    torch.testing.assert_close(neighbourhood_mask(rows, cols, size), expected.reshape(rows * cols, rows * cols))


def reference_propagate(target, context, labels, grid, topk, temperature, size):
    """§7.4 with whole matrices: (n_ctx * N) x N affinities, a dense 0/1 window, joint top-k per target column."""
    rows, cols = grid
    n_ctx, n, _ = context.shape
    aff = torch.exp(torch.bmm(target.expand(n_ctx, -1, -1), context.transpose(1, 2)) / temperature)  # ctx, tgt, src
    if size > 0:
        aff = aff * neighbourhood_mask(rows, cols, size).float()
    aff = aff.transpose(2, 1).reshape(-1, n)  # (ctx, src) x tgt
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    return (labels.reshape(-1, labels.shape[-1]).T @ aff).T


@pytest.mark.parametrize("size, chunk, tile", [(3, 1 << 24, None), (3, 1 << 24, 0), (3, 500, 0), (3, 3000, 2),
                                              (0, 700, None), (0, 1 << 24, 4), (20, 1, None), (20, 1 << 24, 5)])
def test_propagation_matches_whole_matrix_reference_in_any_tiling(size, chunk, tile):
    gen = torch.Generator().manual_seed(0)
    rows, cols, dim, n_ctx, channels = 9, 11, 16, 4, 3
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)
    target, context = unit(rows * cols, dim), unit(n_ctx, rows * cols, dim)
    labels = torch.rand(n_ctx, rows * cols, channels, generator=gen)
    expected = reference_propagate(target, context, labels, (rows, cols), 5, 0.1, size)
    got = propagate(target, context, labels, (rows, cols), topk=5, temperature=0.1, size=size, chunk_elements=chunk,
                    tile=tile)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_identical_frames_copy_the_labels():
    gen = torch.Generator().manual_seed(1)
    rows, cols = 12, 20
    feats = torch.nn.functional.normalize(torch.randn(rows * cols, 64, generator=gen), dim=-1)
    ids = torch.randint(0, 4, (rows * cols,), generator=gen)
    onehot = torch.nn.functional.one_hot(ids, 4).float()
    for n_ctx in (1, 3):
        soft = propagate(feats, feats.expand(n_ctx, -1, -1), onehot.expand(n_ctx, -1, -1), (rows, cols), size=12)
        torch.testing.assert_close(soft.argmax(dim=1), ids)
        labels = soft_to_labels(soft, (rows, cols), patch=4)
        assert labels.shape == (48, 80)
        torch.testing.assert_close(labels[1::4, 1::4], ids.reshape(rows, cols))  # cell centres keep their label


def test_min_max_per_channel_changes_the_argmax():
    soft = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.7, 0.1]])  # 1 x 3 grid, channels (background, object)
    # Raw argmax: background everywhere. Rescaled: background [0, .5, 1], object [1, .75, 0].
    assert soft_to_labels(soft, (1, 3), patch=1).tolist() == [[1, 1, 0]]
    # A constant positive channel is 0/0 in the reference (NaN, which wins torch.max): it wins here too.
    flat = torch.tensor([[1.0, 0.0], [1.0, 0.3], [1.0, 0.9]])
    assert soft_to_labels(flat, (1, 3), patch=1).tolist() == [[0, 0, 0]]
    assert torch.tensor([1.0, math.nan]).max(dim=0).indices == 1  # what the reference relies on
    assert torch.tensor([math.nan, 1.0]).max(dim=0).indices == 0


def test_frame_size_rule_and_first_mask():
    assert [target_size(480, w) for w in (854, 910, 1152)] == [(480, 832), (480, 896), (480, 1152)]
    assert target_size(854, 480) == (832, 480) and target_size(500, 500) == (480, 448)
    mask = np.zeros((8, 16), np.uint8)
    mask[:4, :8], mask[4:, 8:], mask[0, 15] = 2, 1, 255
    onehot, channels = first_frame_labels(mask, (2, 4))
    assert channels == 3
    assert onehot.argmax(dim=1).tolist() == [2, 2, 0, 0, 0, 0, 1, 1]  # void resized away; ids kept


# --------------------------------------------------------------------------------------------- evaluator on disk

def test_evaluator_scores_perfect_results_and_writes_csvs(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    layout = DavisLayout(root)
    results = tmp_path / "perfect"
    shutil.copytree(layout.annotations_dir, results)
    scores = evaluate(layout, results, layout.sequences("val"))
    assert [o.name for o in scores.objects] == ["square_1", "pair_1", "pair_2"] and scores.frames == 6
    assert scores.global_scores() == pytest.approx(
        {"J&F-Mean": 1, "J-Mean": 1, "J-Recall": 1, "J-Decay": 0, "F-Mean": 1, "F-Recall": 1, "F-Decay": 0})
    global_csv, per_seq_csv = write_csvs(scores, tmp_path / "out", "val")
    assert global_csv.read_text() == ("J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
                                      "1.000,1.000,1.000,0.000,1.000,1.000,0.000\n")
    assert per_seq_csv.read_text().splitlines() == ["Sequence,J-Mean,F-Mean", "square_1,1.000,1.000",
                                                    "pair_1,1.000,1.000", "pair_2,1.000,1.000"]
    # An empty prediction for object 2 in one frame; the global mean is over objects, not sequences.
    broken = read_label_png(results / "pair" / "00002.png")
    save_label_png(results / "pair" / "00002.png", np.where(broken == 2, 0, broken).astype(np.uint8))
    scores = evaluate(layout, results, layout.sequences("val"))
    # frames 1..3: J = 1, 0, 1; ids = [0, 1, 1, 2, 2], first bin [1, 0], last bin [1]: decay -0.5
    assert scores.objects[2].j == pytest.approx((2 / 3, 2 / 3, -0.5))
    assert scores.global_scores()["J-Mean"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    # An object id above the first frame's count is refused (the reference exits silently).
    save_label_png(results / "square" / "00001.png", np.full((64, 128), 2, np.uint8))
    with pytest.raises(UserError, match="object id 2"):
        evaluate(layout, results, ["square"])
    (results / "square" / "00002.png").unlink()
    with pytest.raises(UserError, match="00002.png does not exist"):
        evaluate(layout, results, ["square"])


def test_missing_layout_pieces_are_named(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    layout = DavisLayout(root)
    with pytest.raises(UserError, match="ImageSets/2017/train.txt"):
        layout.sequences("train")
    with pytest.raises(UserError, match="JPEGImages/480p/nope does not exist"):
        layout.frames("nope")
    (root / "Annotations" / "480p" / "pair" / "00000.png").unlink()
    with pytest.raises(UserError, match="pair/00000.png does not exist"):
        layout.first_annotation("pair")


# --------------------------------------------------------------------------------------------- end to end

def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", *args])


def test_davis_task_end_to_end_through_the_cli(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    out_dir, results = tmp_path / "runs" / "davis-tiny", tmp_path / "results" / "runs.csv"
    out = invoke("run", "--task", "davis", "--model", TINY, "--data-root", str(root), "--workers", "0",
                 "--results", str(results), "-p", f"out_dir={out_dir}", "-p", "scale_size=64",
                 "-p", "frame_batch=3")
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert [r.metric for r in rows] == ["JF_mean", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"]
    assert all(r.task == "davis" and r.dataset == "davis2017" and r.split == "val" and r.n == 3 for r in rows)
    values = {r.metric: r.value for r in rows}
    assert all(0 <= values[m] <= 100 for m in ("JF_mean", "J_mean", "F_mean", "J_recall", "F_recall"))
    assert values["JF_mean"] == pytest.approx((values["J_mean"] + values["F_mean"]) / 2)
    params = rows[0].params
    assert (params["topk"], params["n_last_frames"], params["size_mask_neighborhood"]) == (5, 7, 12)
    assert params["temperature"] == 0.1 and params["scale_size"] == 64 and params["out_dir"] == str(out_dir)
    assert params["opencv_version"] and params["pillow_version"] and params["precision"] == "fp32"
    for seq in ("square", "pair"):
        written = sorted(p.name for p in (out_dir / seq).glob("*.png"))
        assert written == [f"{t:05d}.png" for t in range(5)]
        with Image.open(out_dir / seq / "00003.png") as image:
            assert image.mode == "P" and image.size == (128, 64)
        # Frame 0 is the annotation itself.
        np.testing.assert_array_equal(read_label_png(out_dir / seq / "00000.png"),
                                      read_label_png(root / "Annotations" / "480p" / seq / "00000.png"))
    assert read_label_png(out_dir / "pair" / "00004.png").max() <= 2
    with open(out_dir / "global_results-val.csv") as handle:
        (table,) = list(csv.DictReader(handle))
    assert float(table["J&F-Mean"]) == pytest.approx(values["JF_mean"] / 100, abs=6e-4)
    with open(out_dir / "per-sequence_results-val.csv") as handle:
        assert [r["Sequence"] for r in csv.DictReader(handle)] == ["square_1", "pair_1", "pair_2"]


def test_davis_task_without_root_or_with_a_bad_one_gives_one_line(tmp_path):
    out = invoke("run", "--task", "davis", "--model", TINY, "--results", str(tmp_path / "r.csv"))
    assert out.exit_code != 0 and "give --data-root DIR" in out.output and "Traceback" not in out.output
    out = invoke("run", "--task", "davis", "--model", TINY, "--data-root", str(tmp_path),
                 "--results", str(tmp_path / "r.csv"))
    assert out.exit_code != 0 and "ImageSets/2017/val.txt" in out.output
    assert not (tmp_path / "r.csv").exists()

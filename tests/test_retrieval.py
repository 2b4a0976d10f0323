"""Revisited Oxford / Paris retrieval: the metric on a ranking worked out by hand, ground-truth protocols, DINO's
image preprocessing and multi-scale feature, the revisitop layout, and the task end to end through the CLI."""

from __future__ import annotations

import csv
import math
import pickle
from fractions import Fraction as Fr
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from ssl_bench.backbones import create_backbone
from ssl_bench.cli import cli, run_evaluation
from ssl_bench.context import TaskContext
from ssl_bench.data import resolve_dataset
from ssl_bench.dense import vit_tokens
from ssl_bench.errors import UserError
from ssl_bench.registry import get_task, parse_params
from ssl_bench.results import read_rows
from ssl_bench.retrieval_metrics import (
    compute_ap, compute_map, evaluate_protocols, protocol_ground_truth, rank_database,
)
from ssl_bench.tasks.retrieval import (
    MULTI_SCALES, RETRIEVAL_VERSION, RetrievalParams, dataset_settings, extract_features, image_feature, image_tensor,
    load_image, load_retrieval_set, run,
)

TINY = "vit_nano_patch4_32"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny ViT on one small image is a chain of tiny ops: with two OpenMP threads on a busy 2-core machine each
    op waits for both threads and the same forward took 100x longer (0.62 s against 6.6 ms) than on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

# --- the metric on a hand-built ranking ---------------------------------------------------------------------------
# 10 DB images (0..9), 3 queries; each column lists DB indices best first.
#   A: 3 7 1 0 5 9 2 4 6 8   easy {3, 5}, hard {2}, junk {7}
#   B: 0 1 2 3 4 5 6 7 8 9   easy {0, 1, 4}, no hard, no junk       (empty under Hard)
#   C: 9 8 7 6 5 4 3 2 1 0   no easy, hard {0, 6}, junk {9, 8}      (empty under Easy; junk ranked first)
RANKS = np.array([[3, 7, 1, 0, 5, 9, 2, 4, 6, 8], list(range(10)), list(range(9, -1, -1))]).T  # DB x Q
GND = [
    {"bbx": [0, 0, 5, 5], "easy": [3, 5], "hard": [2], "junk": [7]},
    {"bbx": [0, 0, 5, 5], "easy": np.array([0, 1, 4]), "hard": np.array([], dtype=int), "junk": []},
    {"bbx": [0, 0, 5, 5], "easy": [], "hard": [0, 6], "junk": [9, 8]},
]
# AP term of the j-th positive (0-based) at junk-free 0-based rank r: ((j / r, or 1 if r = 0) + (j + 1) / (r + 1)) / 2.
# P@k: p = 1-based junk-free ranks, kq = min(max(p), k), P@k = |{p <= kq}| / kq.
#
# Medium (ok = easy + hard, junk = junk)
#   A: ok 3, 5, 2 at positions 0, 4, 6; junk 7 at position 1 sits before 5 and 2 -> junk-free ranks 0, 3, 5.
#      AP = [1 + (1/3 + 2/4)/2 + (2/5 + 3/6)/2] / 3 = [1 + 5/12 + 9/20] / 3 = 28/45
#      p = 1, 4, 6: P@1 = 1/1; P@5 = 2/5; P@10: kq = 6 -> 3/6
#   B: ranks 0, 1, 4: AP = [1 + (1/1 + 2/2)/2 + (2/4 + 3/5)/2] / 3 = [1 + 1 + 11/20] / 3 = 17/20
#      p = 1, 2, 5: P@1 = 1; P@5 = 3/5; P@10: kq = 5 -> 3/5 (protocols.md's example)
#   C: ok 6, 0 at positions 3, 9; both junk images (positions 0, 1) come first -> ranks 1, 7.
#      AP = [(0/1 + 1/2)/2 + (1/7 + 2/8)/2] / 2 = [1/4 + 11/56] / 2 = 25/112
#      p = 2, 8: P@1 = 0/1; P@5 = 1/5; P@10: kq = 8 -> 2/8
# Hard (ok = hard, junk = junk + easy)
#   A: ok 2 at position 6; junk 7, 3, 5 at positions 1, 0, 4 all before it -> rank 3. AP = (0/3 + 1/4)/2 = 1/8
#      p = 4: P@1 = 0; P@5: kq = 4 -> 1/4; P@10 -> 1/4
#   B: no ok image -> NaN, left out of the means
#   C: as under Medium (there is no easy image to add to the junk): 25/112; P@k 0, 1/5, 1/4
# Easy (ok = easy, junk = junk + hard)
#   A: ok 3, 5 at positions 0, 4; junk 7, 2 at positions 1, 6 -> ranks 0, 3. AP = [1 + (1/3 + 2/4)/2] / 2 = 17/24
#      p = 1, 4: P@1 = 1; P@5: kq = 4 -> 2/4; P@10 -> 2/4
#   B: as under Medium: 17/20; P@k 1, 3/5, 3/5
#   C: no ok image -> NaN
EXPECTED = {
    "medium": {"aps": [Fr(28, 45), Fr(17, 20), Fr(25, 112)],
               "prs": [[1, Fr(2, 5), Fr(1, 2)], [1, Fr(3, 5), Fr(3, 5)], [0, Fr(1, 5), Fr(1, 4)]]},
    "hard": {"aps": [Fr(1, 8), None, Fr(25, 112)],
             "prs": [[0, Fr(1, 4), Fr(1, 4)], None, [0, Fr(1, 5), Fr(1, 4)]]},
    "easy": {"aps": [Fr(17, 24), Fr(17, 20), None],
             "prs": [[1, Fr(1, 2), Fr(1, 2)], [1, Fr(3, 5), Fr(3, 5)], None]},
}
# Means over the non-empty queries:
#   Medium mAP = (28/45 + 17/20 + 25/112) / 3; mP@1 = 2/3, mP@5 = (2/5 + 3/5 + 1/5)/3 = 2/5, mP@10 = (1/2 + 3/5 + 1/4)/3 = 9/20
#   Hard   mAP = (1/8 + 25/112) / 2 = 39/224;   mP@1 = 0,   mP@5 = (1/4 + 1/5)/2 = 9/40,  mP@10 = 1/4
#   Easy   mAP = (17/24 + 17/20) / 2 = 187/240; mP@1 = 1,   mP@5 = (1/2 + 3/5)/2 = 11/20, mP@10 = 11/20
EXPECTED_MEANS = {
    "medium": ((Fr(28, 45) + Fr(17, 20) + Fr(25, 112)) / 3, [Fr(2, 3), Fr(2, 5), Fr(9, 20)]),
    "hard": (Fr(39, 224), [0, Fr(9, 40), Fr(1, 4)]),
    "easy": (Fr(187, 240), [1, Fr(11, 20), Fr(11, 20)]),
}


def test_compute_ap_trapezoid_by_hand():
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert compute_ap([0, 1, 4], 3) == pytest.approx(17 / 20)
    assert compute_ap([4, 0, 1], 3) == pytest.approx(17 / 20)  # sorted inside
    assert compute_ap([1, 7], 2) == pytest.approx(25 / 112)
    assert compute_ap([3], 1) == pytest.approx(1 / 8)
    # a positive never retrieved adds nothing: one of two found at rank 0 -> (1 + 1)/2 / 2
    assert compute_ap([0], 2) == pytest.approx(0.5)
    assert compute_ap([], 2) == 0.0


@pytest.mark.parametrize("protocol", ["easy", "medium", "hard"])
def test_compute_map_on_the_hand_built_ranking(protocol):
    mean_ap, aps, mean_pk, prs = compute_map(RANKS, protocol_ground_truth(GND, protocol), kappas=(1, 5, 10))
    expected = EXPECTED[protocol]
    for q in range(3):
        if expected["aps"][q] is None:
            assert math.isnan(aps[q]) and np.isnan(prs[q]).all()
        else:
            assert aps[q] == pytest.approx(float(expected["aps"][q]), abs=1e-12)
            np.testing.assert_allclose(prs[q], [float(v) for v in expected["prs"][q]], atol=1e-12)
    want_map, want_pk = EXPECTED_MEANS[protocol]
    assert mean_ap == pytest.approx(float(want_map), abs=1e-12)
    np.testing.assert_allclose(mean_pk, [float(v) for v in want_pk], atol=1e-12)


def test_protocols_example_positives_at_1_2_5_give_p_at_10_of_three_fifths():
    ranks = np.arange(10)[:, None]
    _, _, mean_pk, prs = compute_map(ranks, [{"ok": [0, 1, 4], "junk": []}], kappas=(1, 5, 10))
    np.testing.assert_allclose(prs[0], [1.0, 3 / 5, 3 / 5])
    np.testing.assert_allclose(mean_pk, [1.0, 3 / 5, 3 / 5])


def test_junk_shifts_positions_but_is_never_removed_from_ok():
    # ok {1} also listed as junk: it still counts (revisitop's rule: a junk image shifts only the positives after it)
    ranks = np.array([[0, 1, 2]]).T
    mean_ap, _, _, _ = compute_map(ranks, [{"ok": [1], "junk": [0, 1]}])
    assert mean_ap == pytest.approx(1.0)  # junk 0 removed -> positive at rank 0


def test_every_query_empty_gives_nan_means():
    mean_ap, aps, mean_pk, _ = compute_map(np.arange(4)[:, None], [{"ok": [], "junk": [1]}])
    assert math.isnan(mean_ap) and math.isnan(aps[0]) and np.isnan(mean_pk).all()


def _reference_map(ranks, gnd, kappas):
    """Straight loops over the §6.3 text (independent of the vectorised code)."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok, junk = set(int(i) for i in g["ok"]), set(int(i) for i in g["junk"])
        if not ok:
            continue
        column = list(ranks[:, q])
        pos = [i for i, d in enumerate(column) if d in ok]
        junk_pos = [i for i, d in enumerate(column) if d in junk]
        shifted = [p - sum(1 for j in junk_pos if j < p) for p in pos]
        ap = 0.0
        for j, r in enumerate(shifted):
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok)
        aps.append(ap)
        one = [r + 1 for r in shifted]
        prs.append([sum(1 for r in one if r <= min(max(one), k)) / min(max(one), k) for k in kappas])
    return np.mean(aps), np.mean(prs, axis=0)


def test_random_rankings_match_a_loop_implementation():
    rng = np.random.default_rng(0)
    n_db, n_q = 40, 12
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for q in range(n_q):
        ids = rng.permutation(n_db)
        n_easy, n_hard, n_junk = rng.integers(0, 5, size=3)
        gnd.append({"bbx": [0, 0, 1, 1], "easy": ids[:n_easy], "hard": ids[n_easy:n_easy + n_hard],
                    "junk": ids[n_easy + n_hard:n_easy + n_hard + n_junk]})
    for protocol in ("easy", "medium", "hard"):
        truth = protocol_ground_truth(gnd, protocol)
        mean_ap, _, mean_pk, _ = compute_map(ranks, truth, kappas=(1, 3, 10))
        want_ap, want_pk = _reference_map(ranks, truth, (1, 3, 10))
        assert mean_ap == pytest.approx(want_ap, abs=1e-12)
        np.testing.assert_allclose(mean_pk, want_pk, atol=1e-12)


def test_protocol_ground_truth_construction():
    gnd = [{"bbx": [0, 0, 1, 1], "easy": [1, 2], "hard": [3], "junk": [4]}]
    easy, medium, hard = (protocol_ground_truth(gnd, p)[0] for p in ("easy", "medium", "hard"))
    assert sorted(easy["ok"]) == [1, 2] and sorted(easy["junk"]) == [3, 4]
    assert sorted(medium["ok"]) == [1, 2, 3] and sorted(medium["junk"]) == [4]
    assert sorted(hard["ok"]) == [3] and sorted(hard["junk"]) == [1, 2, 4]
    with pytest.raises(UserError, match="protocol"):
        protocol_ground_truth(gnd, "medium-hard")
    with pytest.raises(UserError, match="junk"):
        protocol_ground_truth([{"easy": [], "hard": []}], "medium")


def test_rank_database_is_argsort_of_minus_similarity_in_chunks():
    rng = np.random.default_rng(1)
    db = rng.normal(size=(30, 8)).astype(np.float32)
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    full = np.argsort(-(db @ queries.T), axis=0)
    np.testing.assert_array_equal(rank_database(db, queries, query_chunk=3), full)
    # equal similarities keep the lower DB index first
    tied = rank_database(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert tied[:, 0].tolist() == [0, 2, 1]


def test_evaluate_protocols_counts_empty_queries():
    results = evaluate_protocols(RANKS, GND)
    assert results["hard"]["n_empty"] == 1 and results["hard"]["n_queries"] == 2
    assert results["medium"]["n_empty"] == 0
    assert results["medium"]["mAP"] == pytest.approx(float(EXPECTED_MEANS["medium"][0]))


# --- images and features ------------------------------------------------------------------------------------------

def _save(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return path


def test_thumbnail_never_upscales_and_keeps_the_aspect(tmp_path):
    small = _save(tmp_path / "small.jpg", (30, 20))
    assert load_image(small, 64).size == (30, 20)
    large = _save(tmp_path / "large.jpg", (200, 100))
    assert load_image(large, 50).size == (50, 25)
    tall = _save(tmp_path / "tall.jpg", (90, 300))
    assert load_image(tall, 120).size == (36, 120)
    # the box crops the original pixels before the thumbnail: 100 x 50 crop of a 200 x 100 image, then 50 px
    assert load_image(large, 50, bbx=[10.2, 20, 110, 69.6]).size == (50, 25)
    assert load_image(large, 512, bbx=[10, 20, 110, 70]).size == (100, 50)
    with pytest.raises(UserError, match="empty"):
        load_image(large, 50, bbx=[150, 20, 140, 70])


def test_image_tensor_is_totensor_and_imagenet_normalize(tmp_path):
    import torchvision.transforms as T

    image = load_image(_save(tmp_path / "a.jpg", (21, 13)), 224)
    want = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    torch.testing.assert_close(image_tensor(image), want)


@pytest.fixture(scope="module")
def tiny():
    return create_backbone(TINY, seed=0)


def test_multiscale_feature_is_the_normalised_mean_of_three_scales(tiny):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        got = image_feature(tiny, x, MULTI_SCALES)
        parts = [vit_tokens(tiny, x)[0]]
        for s in (1 / math.sqrt(2), 0.5):
            scaled = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            parts.append(vit_tokens(tiny, scaled)[0])
        assert [p.shape for p in parts] == [(1, 96)] * 3
        mean = (parts[0] + parts[1] + parts[2]) / 3
        torch.testing.assert_close(got, mean / mean.norm())
        single = image_feature(tiny, x)
        torch.testing.assert_close(single, parts[0] / parts[0].norm())
    assert not torch.allclose(got, single)
    assert got.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_extract_features_unit_rows_and_query_boxes(tiny, tmp_path):
    paths = [_save(tmp_path / f"{i}.jpg", (33 + 7 * i, 36), seed=i) for i in range(3)]
    features = extract_features(tiny, paths, imsize=48, scales=MULTI_SCALES)
    assert features.shape == (3, 96) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    boxes = [(0, 0, 24, 28)] * 3
    cropped = extract_features(tiny, paths, imsize=48, boxes=boxes)
    with torch.no_grad():
        want = image_feature(tiny, image_tensor(load_image(paths[1], 48, boxes[1]))[None])[0].numpy()
    np.testing.assert_allclose(cropped[1], want, atol=1e-5)
    with torch.no_grad():  # a CNN takes any size too: its pooled output
        pooled = image_feature(create_backbone("resnet18"), torch.randn(1, 3, 40, 52), MULTI_SCALES)
    assert pooled.shape == (1, 512) and pooled.norm().item() == pytest.approx(1.0, abs=1e-5)
    tiny_image = _save(tmp_path / "tiny.jpg", (6, 6))
    with pytest.raises(UserError, match="smaller than one 4-pixel patch"):
        extract_features(tiny, [tiny_image], imsize=48, scales=MULTI_SCALES)


# --- layout, settings and the task ----------------------------------------------------------------------------------

def _photos() -> list[Image.Image]:
    """Five real photographs: scikit-image's samples when it is installed, else scikit-learn's digits."""
    try:
        from skimage import data

        arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
        photos = [Image.fromarray(a).convert("RGB") for a in arrays]
    except ImportError:
        from replicas import digit_images

        images, labels = digit_images(size=64)
        photos = [images[int(np.flatnonzero(labels == d)[0])] for d in (0, 3, 7, 1, 8)]
    return [p.resize((48, max(32, round(48 * p.height / p.width))), Image.BICUBIC) for p in photos]


def make_revisitop(root: Path, name: str, under_datasets: bool = False) -> Path:
    """ROOT/[datasets/]<name>/gnd_<name>.pkl + jpg/: 3 queries (one per landmark photo) and 11 DB images (a flip
    = easy, a zoomed crop = hard, a corner = junk of each landmark, and two distractor photos), shuffled."""
    folder = root / ("datasets" if under_datasets else "") / name
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    photos = _photos()
    items: list[tuple[str, Image.Image, int, str]] = []  # (file name, image, landmark or -1, role)
    queries, boxes = [], []
    for i, photo in enumerate(photos[:3]):
        w, h = photo.size
        queries.append((f"{name}_q{i}", photo))
        boxes.append([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
        items.append((f"{name}_easy{i}", photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), i, "easy"))
        items.append((f"{name}_hard{i}", photo.crop((w // 4, h // 4, w, h)).resize((w, h), Image.BICUBIC), i, "hard"))
        items.append((f"{name}_junk{i}", photo.crop((0, 0, w // 2, h // 2)), i, "junk"))
    items += [(f"{name}_other{j}", photo, -1, "") for j, photo in enumerate(photos[3:])]
    order = np.random.default_rng(0).permutation(len(items))
    items = [items[i] for i in order]
    for file_name, image, _, _ in items:
        image.save(folder / "jpg" / f"{file_name}.jpg", quality=90)
    for file_name, image in queries:
        image.save(folder / "jpg" / f"{file_name}.jpg", quality=90)
    gnd = []
    for i in range(3):
        ids = {role: [k for k, item in enumerate(items) if item[2] == i and item[3] == role] for role in ("easy", "hard", "junk")}
        gnd.append({"bbx": boxes[i], "easy": ids["easy"], "hard": np.array(ids["hard"]), "junk": ids["junk"]})
    cfg = {"imlist": [item[0] for item in items], "qimlist": [q[0] for q in queries], "gnd": gnd}
    with open(folder / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump(cfg, handle)
    return folder


def test_layout_both_roots_and_clear_errors(tmp_path):
    make_revisitop(tmp_path / "a", "roxford5k")
    make_revisitop(tmp_path / "b", "rparis6k", under_datasets=True)
    data = load_retrieval_set(tmp_path / "a", "roxford5k")
    assert len(data.db_names) == 11 and len(data.query_names) == 3 and len(data.gnd) == 3
    assert load_retrieval_set(tmp_path / "b", "rparis6k").folder == tmp_path / "b" / "datasets" / "rparis6k"
    with pytest.raises(UserError, match=r"gnd_rparis6k\.pkl"):
        load_retrieval_set(tmp_path / "a", "rparis6k")
    missing = tmp_path / "a" / "roxford5k" / "jpg" / f"{data.db_names[4]}.jpg"
    missing.unlink()
    with pytest.raises(UserError, match=str(missing)):
        load_retrieval_set(tmp_path / "a", "roxford5k")
    with pytest.raises(UserError, match="not a folder"):
        load_retrieval_set(tmp_path / "nowhere", "roxford5k")


def test_settings_defaults_and_overrides():
    assert (dataset_settings("rparis6k", RetrievalParams()).imsize, dataset_settings("rparis6k", RetrievalParams()).multiscale) == (512, True)
    oxford = dataset_settings("roxford5k", RetrievalParams())
    assert (oxford.imsize, oxford.multiscale, oxford.scales) == (224, False, (1.0,))
    forced = dataset_settings("roxford5k", RetrievalParams(imsize=512, multiscale=True))
    assert (forced.imsize, forced.multiscale, forced.source) == (512, True, {"imsize": "option", "multiscale": "option"})
    parsed = parse_params(get_task("retrieval"), {"datasets": "rparis6k", "imsize": "none", "multiscale": "0",
                                                 "crop_query": "yes"})
    assert parsed.datasets == ("rparis6k",) and parsed.imsize is None and parsed.multiscale is False and parsed.crop_query
    with pytest.raises(UserError, match="retrieval dataset"):
        dataset_settings("holidays", RetrievalParams())
    assert get_task("retrieval").needs == ("data_root",)


def test_task_reads_the_root_from_ctx_extra_and_crops_queries(tiny, tmp_path):
    make_revisitop(tmp_path, "roxford5k")
    ctx = TaskContext(backbone=tiny, dataset=resolve_dataset("builtin:digits"), device=torch.device("cpu"), workers=0,
                      cache_dir=tmp_path / "cache", extra={"data_root": str(tmp_path)})
    plain = run(ctx, RetrievalParams(datasets=("roxford5k",)))
    cropped = run(ctx, RetrievalParams(datasets=("roxford5k",), crop_query=True))
    assert len(plain) == len(cropped) == 12  # 3 protocols x (mAP + 3 mP@k)
    assert {r.params["crop_query"] for r in cropped} == {True}
    assert cropped[0].params["features_cached"] is False  # the cropped queries were new
    again = run(ctx, RetrievalParams(datasets=("roxford5k",)))
    assert all(r.params["features_cached"] for r in again)
    assert [r.value for r in again] == pytest.approx([r.value for r in plain])
    ctx.extra = {}
    with pytest.raises(UserError, match="--data-root PATH"):
        run(ctx, RetrievalParams())


def test_end_to_end_through_the_cli(tmp_path):
    root = tmp_path / "revisitop"
    make_revisitop(root, "roxford5k")
    make_revisitop(root, "rparis6k", under_datasets=True)
    results = tmp_path / "results" / "runs.csv"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "retrieval", "--model", TINY, "--data-root", str(root),
                                   "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                                   "--results", str(results)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = read_rows(results)
    assert len(rows) == 2 * 3 * 4
    assert {(r.task, r.split, r.protocol) for r in rows} == {("retrieval", "test", RETRIEVAL_VERSION)}
    metrics = {(r.dataset, r.metric): r for r in rows}
    for dataset in ("roxford5k", "rparis6k"):
        for protocol in ("easy", "medium", "hard"):
            for metric in ("mAP", "mP@1", "mP@5", "mP@10"):
                row = metrics[(dataset, f"{metric}_{protocol}")]
                assert math.isfinite(row.value) and 0.0 <= row.value <= 100.0
                assert row.n == 3
    oxford, paris = metrics[("roxford5k", "mAP_medium")].params, metrics[("rparis6k", "mAP_medium")].params
    assert (oxford["imsize"], oxford["multiscale"], paris["imsize"], paris["multiscale"]) == (224, False, 512, True)
    assert oxford["crop_query"] is False and "assumption" in oxford["settings_note"] and oxford["pillow_version"]
    assert paris["layout"] == "datasets/rparis6k"
    with open(results, newline="") as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 24
    # a second run through the library call reads every feature from the cache and gives the same numbers
    again = run_evaluation("retrieval", TINY, None, options=("datasets=rparis6k",), data_root=str(root),
                           workers=0, cache_dir=str(tmp_path / "cache"), results=str(results))
    assert all(r.params["features_cached"] for r in again)
    assert {r.metric: r.value for r in again} == pytest.approx(
        {m: r.value for (d, m), r in metrics.items() if d == "rparis6k"})


def test_cli_missing_root_is_a_one_line_error(tmp_path):
    out = CliRunner().invoke(cli, ["run", "--task", "retrieval", "--model", TINY, "--data-root", str(tmp_path),
                                   "--workers", "0", "--results", str(tmp_path / "r.csv")])
    assert out.exit_code != 0 and "gnd_roxford5k.pkl" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "r.csv").exists()

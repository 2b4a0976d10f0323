"""Weighted kNN (tasks/knn.py): numbers worked out by hand, a brute-force reference, blocking, backends, the task."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_bench.context import TaskContext
from ssl_bench.errors import UserError
from ssl_bench.features import Features
from ssl_bench.registry import _TASKS, parse_params
from ssl_bench.tasks.knn import KNN_VERSION, KnnParams, best_k, knn_class_hits, knn_classify, knn_search, run


def _close(result: dict, expected: dict) -> bool:
    """{k: (top1, top5)} equal key for key to float tolerance (pytest.approx takes no nested mappings)."""
    return result.keys() == expected.keys() and all(result[k] == pytest.approx(v) for k, v in expected.items())


def _deg(angle: float, radius: float = 1.0) -> list[float]:
    return [radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))]


# --- hand-computed example 1: weighting beats the majority -------------------------------------------------------
# train (2-D, deliberately not unit length: kNN normalises rows itself)
#   a = (2, 0)       label 0   -> unit (1, 0)
#   b = (0.8, 0.6)   label 1   -> unit (0.8, 0.6)
#   c = (1.8, 2.4)   label 1   -> unit (0.6, 0.8)
#   d = (0, 1)       label 2
# test
#   q1 = (3, 0)      target 0: cosines a 1.0, b 0.8, c 0.6, d 0.0    -> neighbour order a, b, c, d
#   q2 = (0, 0.5)    target 2: cosines d 1.0, c 0.8, b 0.6, a 0.0    -> neighbour order d, c, b, a
# q2 mirrors q1, so both rows always get the same verdict.
TRAIN_A = torch.tensor([[2.0, 0.0], [0.8, 0.6], [1.8, 2.4], [0.0, 1.0]])
LABELS_A = torch.tensor([0, 1, 1, 2])
TEST_A = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
TARGETS_A = torch.tensor([0, 2])


def test_weighted_vote_beats_majority_at_low_temperature():
    # T = 0.1, weights exp(s / T): s=1.0 -> e^10 = 22026.5, 0.8 -> e^8 = 2981.0, 0.6 -> e^6 = 403.4, 0.0 -> e^0 = 1.
    # k=1: q1 votes {0: 22026.5} -> 0 (hit); q2 votes {2: 22026.5} -> 2 (hit).               top-1 100, top-5 100
    # k=3: q1 votes {0: 22026.5, 1: 2981.0 + 403.4 = 3384.4}: class 1 holds 2 of the 3 neighbours (a majority vote
    #      would say 1), but the closer single neighbour weighs more -> 0 (hit). q2 likewise -> 2. top-1 100, top-5 100
    # k=4: adds the orthogonal point, weight 1, to a third class: {0: 22026.5, 1: 3384.4, 2: 1} -> still a hit.
    result = knn_classify(TRAIN_A, LABELS_A, TEST_A, TARGETS_A, ks=(1, 3, 4), temperature=0.1)
    assert result == {1: (100.0, 100.0), 3: (100.0, 100.0), 4: (100.0, 100.0)}


def test_majority_wins_at_high_temperature_and_top5_uses_min_5_k():
    # T = 1: weights e^1 = 2.718, e^0.8 = 2.226, e^0.6 = 1.822, e^0 = 1.
    # k=1: the nearest neighbour alone decides -> both hits.                                   top-1 100, top-5 100
    # k=3: q1 {0: 2.718, 1: 2.226 + 1.822 = 4.048} -> predicts 1 (miss); the target is 2nd of the
    #      min(5, 3) = 3 ranked classes -> top-5 hit. q2 the same.                            top-1 0,   top-5 100
    # k=4: q1 {0: 2.718, 1: 4.048, 2: 1.0} -> still 1; target 2nd -> top-5 hit.                  top-1 0,   top-5 100
    result = knn_classify(TRAIN_A, LABELS_A, TEST_A, TARGETS_A, ks=(4, 1, 3), temperature=1.0)
    assert list(result) == [1, 3, 4]  # sorted by k
    assert result == {1: (100.0, 100.0), 3: (0.0, 100.0), 4: (0.0, 100.0)}


# --- hand-computed example 2: top-5 with 7 classes ----------------------------------------------------------------
# train: unit vectors at 0, 10, 20, 30, 40, 50, 60, 70 degrees with labels 0, 1, 2, 3, 3, 4, 5, 6
# test: three copies of the 0-degree direction with targets 0, 4 and 5.
# cosines to the test direction: 1.0, 0.9848, 0.9397, 0.8660, 0.7660, 0.6428, 0.5, 0.3420
# T = 0.1, weights exp(10 s): 22026.5, 18921.9, 12051.3, 5769.0, 2122.7, 618.9, 148.4, 30.6
TRAIN_B = torch.tensor([_deg(a) for a in (0, 10, 20, 30, 40, 50, 60, 70)])
LABELS_B = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
TEST_B = torch.tensor([_deg(0)] * 3)
TARGETS_B = torch.tensor([0, 4, 5])


def test_top5_ranking_with_seven_classes():
    # Equal scores rank the smaller class first, zero scores included (what torch.sort does in the reference).
    # k=1: votes {0: 22026.5}. Target 0 hits. Only min(5, 1) = 1 class counts for top-5: targets 4, 5 miss.
    #                                                                                  top-1 1/3, top-5 1/3
    # k=5: votes {0: 22026.5, 1: 18921.9, 2: 12051.3, 3: 5769.0 + 2122.7 = 7891.7}; classes 4, 5, 6 score 0 and
    #      rank 5th, 6th, 7th by index: target 4 is a top-5 hit without a vote, target 5 is 6th -> miss.
    #                                                                                  top-1 1/3, top-5 2/3
    # k=6: + {4: 618.9}: ranking 0 > 1 > 2 > 3 > 4 > 5 (0) > 6 (0): target 4 5th (hit), target 5 6th (miss).
    #                                                                                  top-1 1/3, top-5 2/3
    # k=8: + {5: 148.4, 6: 30.6}: same ranking, now every class has a vote.             top-1 1/3, top-5 2/3
    result = knn_classify(TRAIN_B, LABELS_B, TEST_B, TARGETS_B, ks=(1, 5, 6, 8), temperature=0.1)
    third, two_thirds = 100.0 / 3, 200.0 / 3
    assert _close(result, {1: (third, third), 5: (third, two_thirds), 6: (third, two_thirds), 8: (third, two_thirds)})
    # Swap the names of classes 4 and 5 (the 50-degree point is now label 5) and ask for targets 0 and 5: at k=5
    # the target scores 0 and ranks 6th, behind the zero-score class 4 -> miss; at k=6 it has its vote (618.9)
    # and ranks 5th -> hit.                                              k=5: top-1 1/2, top-5 1/2; k=6: 1/2, 2/2
    swapped = torch.tensor([0, 1, 2, 3, 3, 5, 4, 6])
    result = knn_classify(TRAIN_B, swapped, TEST_B[:2], torch.tensor([0, 5]), ks=(5, 6), temperature=0.1)
    assert result == {5: (50.0, 50.0), 6: (50.0, 100.0)}


def test_hits_per_class_by_hand():
    # Example 2 at T = 0.1, k = 5, targets 0, 4, 5: the class-0 row is a top-1 and top-5 hit, the class-4 row a
    # top-5 hit only (5th, without a vote), the class-5 row neither (6th); the other classes have no test rows.
    hits = knn_class_hits(TRAIN_B, LABELS_B, TEST_B, TARGETS_B, ks=(5,), temperature=0.1)
    top1, top5 = hits[5]
    assert top1.tolist() == [1, 0, 0, 0, 0, 0, 0] and top5.tolist() == [1, 0, 0, 0, 1, 0, 0]
    # a target outside the classes is never a hit and adds no count
    top1, top5 = knn_class_hits(TRAIN_B, LABELS_B, TEST_B, torch.tensor([0, 9, 4]), ks=(6,), temperature=0.1,
                                num_classes=7)[6]
    assert top1.tolist() == [1, 0, 0, 0, 0, 0, 0] and top5.tolist() == [1, 0, 0, 0, 1, 0, 0]


def test_two_neighbours_outvote_a_closer_one_when_their_weights_add_up():
    # Same train points, T = 0.1.
    # A direction at 35 degrees, target 3: cosines 30deg (label 3) and 40deg (label 3) both cos 5deg = 0.99619;
    # 20deg (label 2) and 50deg (label 4) both cos 15deg = 0.96593. k=4 -> {3: 2 * 21204, 2: 15666, 4: 15666}: hit.
    # A direction at 22 degrees, target 2: cosines 20deg 0.99939 (label 2), 30deg 0.99027 (label 3),
    # 10deg 0.97815 (label 1), 40deg 0.95106 (label 3). k=4: {2: e^9.9939 = 21893, 3: e^9.9027 + e^9.5106 =
    # 19984 + 13502 = 33486, 1: e^9.7815 = 17703}: two farther neighbours outvote the nearest one -> predicts 3
    # (miss); the target is 2nd -> top-5 hit.
    test = torch.tensor([_deg(35), _deg(22)])
    result = knn_classify(TRAIN_B, LABELS_B, test, torch.tensor([3, 2]), ks=(1, 4), temperature=0.1)
    # k=1: 35deg -> nearest is 30deg or 40deg (tie at cos 5deg), both label 3: hit; 22deg -> 20deg, label 2: hit.
    assert result == {1: (100.0, 100.0), 4: (50.0, 100.0)}


def test_num_classes_explicit_or_inferred_and_out_of_range_targets():
    inferred = knn_classify(TRAIN_B, LABELS_B, TEST_B, TARGETS_B, ks=(6,), temperature=0.1)
    explicit = knn_classify(TRAIN_B, LABELS_B, TEST_B, TARGETS_B, ks=(6,), temperature=0.1, num_classes=1000)
    assert inferred == explicit
    # A target no training sample has (label 9) can never be hit; it still counts in the denominator.
    result = knn_classify(TRAIN_B, LABELS_B, TEST_B, torch.tensor([0, 9, 4]), ks=(6,), temperature=0.1, num_classes=7)
    assert _close(result, {6: (100.0 / 3, 200.0 / 3)})


# --- brute-force reference ---------------------------------------------------------------------------------------
def reference_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """Full similarity matrix, one top-k per k, dense one-hot votes (the reference's algorithm, no blocking)."""
    sims = F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T
    out = {}
    for k in ks:
        top_sims, top_idx = sims.topk(k, dim=1)
        one_hot = F.one_hot(train_labels[top_idx], num_classes).double()  # (M, k, C)
        scores = (one_hot * (top_sims / temperature).exp()[..., None]).sum(1)
        order = scores.argsort(dim=1, descending=True, stable=True)
        hit = order == test_labels[:, None]  # stable: equal scores (zeros too) keep the smaller class first
        out[k] = (100.0 * hit[:, :1].sum().item() / len(test), 100.0 * hit[:, :min(5, k)].sum().item() / len(test))
    return out


def clustered(n_train=600, n_test=150, dim=16, classes=12, noise=1.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    x_train = centres[y_train] + noise * torch.randn(n_train, dim, generator=g)
    x_test = centres[y_test] + noise * torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


KS = (1, 3, 10, 20, 50)


def test_matches_brute_force_reference_on_random_data():
    x_train, y_train, x_test, y_test = clustered()
    expected = reference_knn(x_train, y_train, x_test, y_test, KS, 0.07, 12)
    got = knn_classify(x_train, y_train, x_test, y_test, ks=KS, temperature=0.07, backend="torch")
    assert _close(got, expected)
    assert 0 < got[10][0] < 100  # neither trivial nor hopeless, so the comparison means something


def test_search_matches_full_matrix_topk():
    x_train, _, x_test, _ = clustered(seed=1)
    sims = F.normalize(x_test, dim=1) @ F.normalize(x_train, dim=1).T
    ref_values, ref_indices = sims.topk(50, dim=1)
    values, indices = knn_search(x_train, x_test, 50, backend="torch", test_chunk_size=64, train_chunk_size=100)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-6)
    assert torch.equal(indices, ref_indices)
    assert bool((values[:, :-1] >= values[:, 1:]).all())


@pytest.mark.parametrize("test_chunk, train_chunk", [(1, 64), (7, 3), (16, 13), (1000, 51), (1000, 10_000)])
def test_blocking_does_not_change_results(test_chunk, train_chunk):
    # train chunks below, at and above k, ragged last blocks, and group-filter blocks whose width is not a
    # multiple of the filter's group size all meet in the same neighbours.
    x_train, y_train, x_test, y_test = clustered(n_train=500, n_test=150, seed=2)
    ks = (1, 5, 20)
    whole = knn_classify(x_train, y_train, x_test, y_test, ks=ks, backend="torch", test_chunk_size=10_000,
                         train_chunk_size=10_000)
    blocked = knn_classify(x_train, y_train, x_test, y_test, ks=ks, backend="torch", test_chunk_size=test_chunk,
                           train_chunk_size=train_chunk)
    assert blocked == whole
    _, ref_indices = knn_search(x_train, x_test, 20, backend="torch", test_chunk_size=10_000, train_chunk_size=10_000)
    _, indices = knn_search(x_train, x_test, 20, backend="torch", test_chunk_size=test_chunk, train_chunk_size=train_chunk)
    assert torch.equal(indices, ref_indices)


def test_wide_blocks_take_their_topk_through_group_maxima():
    # A block at least 8 * k groups of 8 wide (k=3: 192 columns) and without a threshold (the first block, or any
    # block on CUDA) takes its top-k from the top-k group maxima; a single 1000-column block here.
    x_train, y_train, x_test, y_test = clustered(n_train=1000, n_test=120, seed=7)
    expected = reference_knn(x_train, y_train, x_test, y_test, (1, 3), 0.07, 12)
    got = knn_classify(x_train, y_train, x_test, y_test, ks=(1, 3), backend="torch", train_chunk_size=1000)
    assert _close(got, expected)
    ref_values, ref_indices = (F.normalize(x_test, dim=1) @ F.normalize(x_train, dim=1).T).topk(3, dim=1)
    values, indices = knn_search(x_train, x_test, 3, backend="torch", train_chunk_size=1000)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-6)
    assert torch.equal(indices, ref_indices)


def test_filter_survives_adversarial_train_order():
    # Train rows sorted by increasing similarity to the first test row: the running threshold is always
    # beaten, so every block takes the dense path for that row; the result must not change.
    x_train, y_train, x_test, y_test = clustered(n_train=800, n_test=120, seed=3)
    order = (F.normalize(x_train, dim=1) @ F.normalize(x_test[0], dim=0)).argsort()
    x_train, y_train = x_train[order], y_train[order]
    expected = reference_knn(x_train, y_train, x_test, y_test, KS, 0.07, 12)
    got = knn_classify(x_train, y_train, x_test, y_test, ks=KS, backend="torch", test_chunk_size=32, train_chunk_size=96)
    assert _close(got, expected)


def test_faiss_and_torch_backends_agree():
    pytest.importorskip("faiss")
    x_train, y_train, x_test, y_test = clustered(n_train=2000, n_test=300, dim=32, seed=4)
    ks = (1, 10, 20, 100, 200)
    by_torch = knn_classify(x_train, y_train, x_test, y_test, ks=ks, backend="torch")
    by_faiss = knn_classify(x_train, y_train, x_test, y_test, ks=ks, backend="faiss", test_chunk_size=128)
    assert by_faiss == by_torch
    v_torch, i_torch = knn_search(x_train, x_test, 200, backend="torch")
    v_faiss, i_faiss = knn_search(x_train, x_test, 200, backend="faiss")
    torch.testing.assert_close(v_faiss, v_torch, rtol=0, atol=1e-5)
    assert (i_faiss == i_torch).float().mean() > 0.999  # a swap needs two similarities within float rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_give_the_cpu_answers():
    # One 4000-wide block (top-k through group maxima) and 1000-wide blocks (plain top-k and merges).
    x_train, y_train, x_test, y_test = clustered(n_train=4000, n_test=200, dim=32, seed=5)
    cpu = knn_classify(x_train, y_train, x_test, y_test, ks=KS, backend="torch")
    on_gpu = [t.cuda() for t in (x_train, y_train, x_test, y_test)]
    assert knn_classify(*on_gpu, ks=KS) == cpu
    assert knn_classify(*on_gpu, ks=KS, train_chunk_size=1000) == cpu


# --- errors ------------------------------------------------------------------------------------------------------
def test_k_larger_than_train_set_is_a_user_error():
    with pytest.raises(UserError, match=r"k=5 is larger than the 4 training samples"):
        knn_classify(TRAIN_A, LABELS_A, TEST_A, TARGETS_A, ks=(1, 5))
    with pytest.raises(UserError, match="larger than the 4 training samples"):
        knn_search(TRAIN_A, TEST_A, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ks=()), "ks is empty"),
        (dict(ks=(0, 2)), "k must be >= 1"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(backend="annoy"), "backend 'annoy'"),
        (dict(num_classes=2), "does not fit num_classes=2"),
        (dict(train_chunk_size=0), "train_chunk_size must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        knn_classify(TRAIN_A, LABELS_A, TEST_A, TARGETS_A, **{"ks": (1,), **kwargs})


def test_bad_features():
    with pytest.raises(UserError, match="NaN or inf"):
        knn_classify(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]), TEST_A, TARGETS_A, ks=(1,))
    with pytest.raises(UserError, match="dim"):
        knn_classify(TRAIN_A, LABELS_A, torch.ones(2, 3), TARGETS_A, ks=(1,))
    with pytest.raises(UserError, match="one entry per feature row"):
        knn_classify(TRAIN_A, LABELS_A[:3], TEST_A, TARGETS_A, ks=(1,))


# --- the registered task ------------------------------------------------------------------------------------------
def test_best_k_prefers_the_smaller_k_on_ties():
    assert best_k({10: (70.0, 90.0), 20: (71.0, 90.0), 100: (71.0, 92.0)}) == 20


def test_task_is_registered_and_its_options_parse():
    task = _TASKS["knn"]
    assert task.version == KNN_VERSION and task.params is KnnParams and task.run is run
    params = parse_params(task, {"ks": "10,20", "temperature": "0.1", "backend": "torch"})
    assert params == KnnParams(ks=(10, 20), temperature=0.1, backend="torch")


def test_task_rows():
    x_train, y_train, x_test, y_test = clustered(n_train=300, n_test=100, seed=6)
    splits = {"train": (x_train, y_train), "val": (x_test, y_test)}
    requests = []

    def features(split, spec="cls", transform="eval_dino"):
        requests.append((split, spec, transform))
        x, y = splits[split]
        return Features(x.numpy().astype(np.float16), y.numpy(), {}, cached=True)

    ctx = TaskContext(
        backbone=SimpleNamespace(label="net", arch="vit_nano_patch4_32", ckpt_sha256=""),
        dataset=SimpleNamespace(name="toy", num_classes=12, skipped_images=dict), device=torch.device("cpu"),
    )
    ctx.features = features
    params = KnnParams(ks=(1, 5, 20), feature="cls", backend="torch")
    rows = run(ctx, params)

    assert requests == [("train", "cls", "eval_dino"), ("val", "cls", "eval_dino")]
    values = {r.metric: r.value for r in rows}
    assert set(values) == {"top1", "top5", "top1_k1", "top5_k1", "top1_k5", "top5_k5", "top1_k20", "top5_k20",
                           "mean_per_class", "acc_many", "acc_medium", "acc_few"}
    expected = knn_classify(torch.from_numpy(x_train.numpy().astype(np.float16)).float(), y_train,
                            torch.from_numpy(x_test.numpy().astype(np.float16)).float(), y_test, ks=(1, 5, 20))
    chosen = best_k(expected)
    assert values["top1"] == expected[chosen][0] and values["top5"] == expected[chosen][1]
    assert all(values[f"top1_k{k}"] == expected[k][0] for k in (1, 5, 20))
    assert all(r.task == "knn" and r.protocol == KNN_VERSION and r.split == "val" for r in rows)
    assert all(r.n == 100 for r in rows if not r.metric.startswith("acc_"))  # group rows count their own images
    assert sum(r.n for r in rows if r.metric.startswith("acc_")) == 100
    best_row = next(r for r in rows if r.metric == "top1")
    assert best_row.params["best_k"] == chosen and best_row.params["ks"] == [1, 5, 20]
    assert best_row.params["temperature"] == 0.07 and best_row.params["backend"] == "torch"
    assert best_row.params["feature"] == "cls" and best_row.params["transform"] == "eval_dino"
    assert best_row.params["feature_dtype"] == "float16" and best_row.params["backend_used"] == "torch"
    assert next(r for r in rows if r.metric == "top5_k5").params["k"] == 5

"""DINO loss, centering, head and monitor (pretrain/dino_loss.py, centering.py, head.py, monitor.py).

Numbers in comments are worked out by hand; ln is the natural log.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as tmp_mp

from ssl_bench.pretrain.centering import LogitCentering, ProbabilityCentering, make_centering
from ssl_bench.pretrain.dino_loss import dino_cross_entropy
from ssl_bench.dino_head import DINOHead, HeadOutput
from ssl_bench.pretrain.monitor import collapse_warning, kl_to_uniform, norm_stats, teacher_entropy

LN3 = math.log(3.0)

# --- dino_cross_entropy, K = 2, batch of 1 ---------------------------------------------------------------------------
# student crop 0: logits (0, 0)     -> log-probs (-ln 2, -ln 2)
# student crop 1: logits (ln 3, 0)  -> probs (3/4, 1/4), log-probs (ln 3/4, ln 1/4)
# student crop 2: logits (0, ln 3)  -> log-probs (ln 1/4, ln 3/4)          (a local crop: no teacher view)
# teacher crop 0: (1, 0); teacher crop 1: (1/2, 1/2)
# pairs i != j:
#   (s0, t1) = -(1/2 (-ln 2) + 1/2 (-ln 2))   = ln 2        = 0.693147
#   (s1, t0) = -(1 * ln 3/4)                  = ln 4/3      = 0.287682
#   (s2, t0) = -(1 * ln 1/4)                  = ln 4        = 1.386294
#   (s2, t1) = -(1/2 ln 1/4 + 1/2 ln 3/4)     = 1/2 ln 16/3 = 0.836988
# 2 crops: (ln 2 + ln 4/3) / 2 = 1/2 ln 8/3 = 0.490415;  3 crops: sum of all four / 4 = 0.801028
S0 = torch.tensor([[0.0, 0.0]])
S1 = torch.tensor([[LN3, 0.0]])
S2 = torch.tensor([[0.0, LN3]])
T0 = torch.tensor([[1.0, 0.0]])
T1 = torch.tensor([[0.5, 0.5]])


def test_cross_entropy_two_crops_by_hand():
    loss = dino_cross_entropy([S0, S1], [T0, T1])
    assert loss.item() == pytest.approx(0.5 * math.log(8 / 3), abs=1e-6)
    assert loss.item() == pytest.approx(0.490415, abs=1e-6)


def test_cross_entropy_three_crops_by_hand():
    loss = dino_cross_entropy([S0, S1, S2], [T0, T1])
    expected = (math.log(2) + math.log(4 / 3) + math.log(4) + 0.5 * math.log(16 / 3)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.801028, abs=1e-6)


def test_cross_entropy_skips_same_view_and_means_over_batch():
    # student crop 0 is compared with teacher crop 1 only: when softmax(s0) == t1 its gradient is zero,
    # whatever teacher crop 0 (its own view) says
    s0 = torch.zeros(1, 2, requires_grad=True)  # softmax (1/2, 1/2) == T1
    dino_cross_entropy([s0, S1], [T0, T1]).backward()
    assert torch.allclose(s0.grad, torch.zeros(1, 2), atol=1e-7)
    # s0 = (20, -20) against t1 = (1/2, 1/2): log-probs ~ (0, -40), cost 1/2 * 40 = 20; with (s1, t0) = ln 4/3
    loss = dino_cross_entropy([torch.tensor([[20.0, -20.0]]), S1], [T0, T1])
    assert loss.item() == pytest.approx((20.0 + math.log(4 / 3)) / 2, abs=1e-4)
    # batch rows are averaged: the batch (row a, row b) costs the mean of the two single-row losses
    batch = dino_cross_entropy([torch.cat([S0, S1]), torch.cat([S1, S2])], [torch.cat([T0, T1]), torch.cat([T1, T0])])
    a = dino_cross_entropy([S0, S1], [T0, T1])
    b = dino_cross_entropy([S1, S2], [T1, T0])
    assert batch.item() == pytest.approx((a.item() + b.item()) / 2, abs=1e-6)


def test_cross_entropy_matches_pairwise_loop():
    torch.manual_seed(0)
    students = [torch.randn(4, 7, requires_grad=True) for _ in range(6)]
    teachers = [torch.randn(4, 7).softmax(-1) for _ in range(2)]
    loss = dino_cross_entropy(students, teachers)
    terms = [
        -(t * torch.log_softmax(s, -1)).sum(-1).mean()
        for j, t in enumerate(teachers) for i, s in enumerate(students) if i != j
    ]
    assert len(terms) == 2 * 6 - 2
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    loss.backward()
    assert all(s.grad is not None for s in students)


def test_cross_entropy_refuses_no_pairs_and_mismatched_shapes():
    with pytest.raises(ValueError, match="no student/teacher crop pair"):
        dino_cross_entropy([S0], [T0])
    with pytest.raises(ValueError, match="same"):
        dino_cross_entropy([S0, torch.zeros(2, 2)], [T0, T1])


# --- logit centering (DINO), m = 0.9, T = 0.1 ---------------------------------------------------------------------
# tempered logits [[10, 0, 0], [0, 0, 20]] -> raw scores s = logits * T = [[1, 0, 0], [0, 0, 2]], batch mean (0.5, 0, 1)
# center after one update from 0: 0.1 * (0.5, 0, 1) = (0.05, 0, 0.1)
# teacher probs of logits (0, 0, 0): softmax((0 - c) / T) = softmax(-0.5, 0, -1)
#   = (e^-0.5, 1, e^-1) / (0.606531 + 1 + 0.367879) = (0.307196, 0.506480, 0.186324)
# second update with s = (1, 1, 1): 0.9 * (0.05, 0, 0.1) + 0.1 = (0.145, 0.1, 0.19)
def test_logit_centering_by_hand():
    centering = LogitCentering(3, momentum=0.9)
    assert torch.equal(centering.center, torch.zeros(3))
    centering.update(torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 20.0]]), 0.1)
    probs = centering.teacher_probs(torch.zeros(1, 3), 0.1)
    assert torch.allclose(centering.center, torch.tensor([0.05, 0.0, 0.1]), atol=1e-7)
    assert torch.allclose(probs, torch.tensor([[0.307196, 0.506480, 0.186324]]), atol=1e-6)
    centering.update(torch.tensor([[10.0, 10.0, 10.0]]), 0.1)
    centering.synchronize()
    assert torch.allclose(centering.center, torch.tensor([0.145, 0.1, 0.19]), atol=1e-7)


def test_logit_centering_is_dinos_formula_on_raw_scores():
    torch.manual_seed(1)
    dots = torch.randn(5, 8)  # DINO's raw teacher output
    center = torch.randn(8) * 0.1
    temperature = 0.04
    centering = LogitCentering(8)
    centering.center.copy_(center)
    ours = centering.teacher_probs(dots / temperature, temperature)
    dino = torch.softmax((dots - center) / temperature, dim=-1)
    assert torch.allclose(ours, dino, atol=1e-5)


# --- probability centering (DINO-vMF eq. 9), m = 0.9 -------------------------------------------------------------
# batch of one, tempered logits (ln 3, 0): softmax (3/4, 1/4); center = 0.1 * (ln 3/4, ln 1/4) = (-0.0287682, -0.1386294)
# teacher probs of logits (0, 0): softmax(-c) = ((3/4)^-0.1, (1/4)^-0.1) / sum = (1.029186, 1.148698) / 2.177884
#   = (0.472562, 0.527438)
# second update with rows (ln 3, 0), (0, ln 3): batch mean of softmax (1/2, 1/2) -> c = 0.9 c + 0.1 * (-ln 2, -ln 2)
def test_probability_centering_by_hand():
    centering = ProbabilityCentering(2, momentum=0.9)
    centering.update(torch.tensor([[LN3, 0.0]]), 0.04)
    probs = centering.teacher_probs(torch.zeros(1, 2), 0.04)
    first = torch.tensor([0.1 * math.log(0.75), 0.1 * math.log(0.25)])
    assert torch.allclose(centering.center, first, atol=1e-7)
    assert torch.allclose(probs, torch.tensor([[0.472562, 0.527438]]), atol=1e-6)
    centering.update(torch.tensor([[LN3, 0.0], [0.0, LN3]]), 0.04)
    centering.synchronize()
    assert torch.allclose(centering.center, 0.9 * first - 0.1 * math.log(2), atol=1e-7)


def test_probability_centering_survives_probabilities_below_float32():
    # prototype 1 gets probability e^-200 from every sample: float32 softmax underflows to 0,
    # but the log of its batch mean is still finite (= -200), and the center stays finite
    centering = ProbabilityCentering(2, momentum=0.0)
    centering.update(torch.tensor([[200.0, 0.0], [200.0, 0.0]]), 0.04)
    centering.synchronize()
    assert torch.allclose(centering.center, torch.tensor([0.0, -200.0]), atol=1e-4)
    assert torch.isfinite(centering.teacher_probs(torch.tensor([[200.0, 0.0]]), 0.04)).all()


@pytest.mark.parametrize("kind", ["logit", "probability"])
def test_centering_state_dict_round_trip(kind):
    torch.manual_seed(2)
    batches = [torch.randn(4, 16) * 5 for _ in range(4)]
    original = make_centering(kind, 16)
    for batch in batches[:2]:
        original.teacher_probs(batch, 0.05)
        original.update(batch, 0.05)
    state = original.state_dict()  # taken with an update still pending: it must be included
    assert set(state) == {"center"} and state["center"].abs().sum() > 0
    resumed = make_centering(kind, 16)
    resumed.load_state_dict(state)
    for batch in batches[2:]:
        for centering in (original, resumed):
            centering.update(batch, 0.05)
        assert torch.equal(original.teacher_probs(batch, 0.05), resumed.teacher_probs(batch, 0.05))


def test_centering_factory_refuses_unknown_kind():
    assert isinstance(make_centering("logit", 4), LogitCentering)
    assert isinstance(make_centering("probability", 4, momentum=0.5), ProbabilityCentering)
    with pytest.raises(ValueError, match="logit, probability"):
        make_centering("softmax", 4)


# --- two processes (gloo): the all-reduced center equals one process on the concatenated batch -------------------
def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(8, 16, generator=generator) * 4 for _ in range(3)]


def _centering_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        rows = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal local batches: 3 and 5 rows
        for kind in ("logit", "probability"):
            centering = make_centering(kind, 16)
            probs = []
            for batch in _batches():
                probs.append(centering.teacher_probs(batch[rows], 0.05))
                centering.update(batch[rows], 0.05)
            torch.save({"center": centering.state_dict()["center"], "probs": probs}, f"{out_dir}/{kind}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centering_all_reduce_matches_one_process(tmp_path):
    tmp_mp.spawn(_centering_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for kind in ("logit", "probability"):
        single = make_centering(kind, 16)
        expected_probs = []
        for batch in _batches():
            expected_probs.append(single.teacher_probs(batch, 0.05))
            single.update(batch, 0.05)
        single.synchronize()
        for rank, rows in ((0, slice(0, 3)), (1, slice(3, 8))):
            result = torch.load(tmp_path / f"{kind}{rank}.pt")
            assert torch.allclose(result["center"], single.center, atol=1e-6), kind
            for got, want in zip(result["probs"], expected_probs):
                assert torch.allclose(got, want[rows], atol=1e-6), kind


# --- head ----------------------------------------------------------------------------------------------------------
def test_head_shapes_and_outputs():
    torch.manual_seed(4)
    head = DINOHead(12, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=3, norm_last_layer=False)
    out = head(torch.randn(5, 12))
    assert isinstance(out, HeadOutput)
    assert out.dots.shape == (5, 40) and out.norms.shape == (40,) and out.y.shape == (5, 8)
    assert torch.allclose(out.y.norm(dim=-1), torch.ones(5), atol=1e-6)
    weights = head.prototype_weights()
    assert weights.shape == (40, 8)
    assert torch.allclose(out.dots, out.y @ weights.T, atol=1e-6)
    assert torch.allclose(weights.norm(dim=-1), out.norms, atol=1e-6)
    # MLP: Linear-GELU-Linear-GELU-Linear, zero biases
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 24), (24, 24), (24, 8)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    # patch tokens: any leading dims
    assert head(torch.randn(2, 3, 12)).dots.shape == (2, 3, 40)


def test_head_norm_last_layer_fixes_norms_at_one():
    fixed = DINOHead(12, out_dim=40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    free = DINOHead(12, out_dim=40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert list(fixed.state_dict()) == list(free.state_dict())  # one state dict layout for every option
    assert "prototype_norm" not in dict(fixed.named_parameters())
    assert fixed.last_layer_parameter_names() == ["prototype_direction"]
    assert free.last_layer_parameter_names() == ["prototype_direction", "prototype_norm"]
    assert free.prototype_norm.requires_grad
    assert torch.equal(free.prototype_norm, torch.ones(40))  # initialised to 1 either way
    x = torch.randn(5, 12)
    for head in (fixed, free):
        out = head(x)
        assert torch.allclose(out.norms, torch.ones(40))
        (out.dots.square().sum() + out.norms.sum()).backward()
    assert free.prototype_norm.grad is not None and free.prototype_norm.grad.abs().sum() > 0
    assert torch.equal(fixed.prototype_norm, torch.ones(40))
    # the fixed head's norms stay 1 after an optimiser step; the free head's move
    for head in (fixed, free):
        torch.optim.SGD(head.parameters(), lr=0.1).step()
    assert torch.allclose(fixed(x).norms, torch.ones(40)) and not torch.allclose(free(x).norms, torch.ones(40))
    assert torch.allclose(fixed.prototype_weights().norm(dim=-1), torch.ones(40), atol=1e-6)


# --- monitor -------------------------------------------------------------------------------------------------------
def test_monitor_statistics_by_hand():
    uniform = torch.full((3, 4), 0.25)
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    assert teacher_entropy(uniform).item() == pytest.approx(math.log(4))
    assert teacher_entropy(one_hot).item() == pytest.approx(0.0)
    assert kl_to_uniform(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_to_uniform(one_hot).item() == pytest.approx(math.log(4))  # collapse onto one prototype
    spread = torch.eye(4)  # sharp rows, evenly used prototypes: entropy 0, KL 0
    assert teacher_entropy(spread).item() == pytest.approx(0.0) and kl_to_uniform(spread).item() == pytest.approx(0.0, abs=1e-7)
    # the collapse warning: uniform rows and one prototype for all are named, sharp evenly used rows are healthy
    assert "uniform" in collapse_warning(teacher_entropy(uniform).item(), kl_to_uniform(uniform).item(), 4)
    assert "one prototype" in collapse_warning(teacher_entropy(one_hot).item(), kl_to_uniform(one_hot).item(), 4)
    assert collapse_warning(teacher_entropy(spread).item(), kl_to_uniform(spread).item(), 4) is None
    # the six tiny digits-lt runs of the long-tail study ended at entropy 6.930-6.931, KL 1e-4-3e-4 with K = 1024
    assert "collapsed" in collapse_warning(6.9305, 0.0003, 1024)
    assert collapse_warning(5.66, 1.27, 1024) is None  # the same runs at epoch 5
    stats = norm_stats(torch.arange(101, dtype=torch.float32))  # 0, 1, ..., 100
    assert stats == {"min": 0.0, "mean": 50.0, "max": 100.0, "p5": 5.0, "p50": 50.0, "p95": 95.0}


def test_mean_pairwise_cosine_and_its_warning():
    from ssl_bench.pretrain.monitor import mean_pairwise_cosine, representation_warning

    # pairs: (e1, e2) cos 0, (e1, e1+e2) and (e2, e1+e2) cos 1/sqrt(2): mean (0 + 2 / sqrt 2) / 3
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(rows) == pytest.approx(2 / math.sqrt(2) / 3)
    assert mean_pairwise_cosine(rows * torch.tensor([[2.0], [5.0], [0.1]])) == pytest.approx(2 / math.sqrt(2) / 3)
    same = torch.tensor([[1.0, 2.0]] * 5)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert "nearly identical" in representation_warning(mean_pairwise_cosine(same))
    assert representation_warning(0.964) is None  # a random-init nano ViT on digits

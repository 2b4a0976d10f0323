"""KoLeo-Proto on points whose nearest-neighbour distances are known."""

from __future__ import annotations

import math

import torch

from ssl_bench.pretrain.koleo import koleo_loss, nearest_neighbours


def test_known_nearest_neighbour_distances():
    # Four unit vectors in the plane at angles 0, 10, 90 and 180 degrees. Nearest neighbours by angle:
    # 0 <-> 10 (10 deg), 10 -> 0 (10 deg), 90 -> 10 (80 deg), 180 -> 90 (90 deg).
    # Chord length 2 sin(angle / 2): 10 deg -> 0.174311, 80 deg -> 1.285575, 90 deg -> 1.414214.
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])  # norms ignored
    assert nearest_neighbours(torch.nn.functional.normalize(points, dim=-1)).tolist() == [1, 0, 1, 2]
    chords = [2 * math.sin(math.radians(a) / 2) for a in (10, 10, 80, 90)]
    expected = -sum(math.log(c) for c in chords) / 4  # = -(2 * -1.746911 + 0.251206 + 0.346574) / 4 = 0.724011
    assert abs(koleo_loss(points).item() - expected) < 1e-5


def test_blocks_do_not_change_neighbours_and_gradient_spreads_close_points():
    torch.manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    assert torch.equal(nearest_neighbours(points, block_size=7), nearest_neighbours(points, block_size=4096))
    pair = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(pair).backward()
    # descending the loss pushes the two nearly equal prototypes apart along the second axis
    assert pair.grad[0, 1] > 0 and pair.grad[1, 1] < 0

"""Any-size ViT forward: equal to timm's at the native size, DINO's interpolation rule elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_bench.backbones import create_backbone
from ssl_bench.dense import dino_pos_embed, vit_tokens
from ssl_bench.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("vit_nano_patch4_32", seed=0)


def test_native_size_matches_the_timm_forward(tiny):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls, patches = vit_tokens(tiny, images)
        torch.testing.assert_close(cls, tiny.model(images))
        full = tiny.model.forward_features(images)
    torch.testing.assert_close(patches.reshape(2, 64, -1), full[:, 1:])


def test_other_sizes_use_floor_divided_grid_and_scale_factor(tiny):
    images = torch.randn(1, 3, 50, 37)  # 12 x 9 patches of 4 px; trailing 2 and 1 pixels dropped
    with torch.no_grad():
        cls, patches = vit_tokens(tiny, images)
    assert cls.shape == (1, 96) and patches.shape == (1, 12, 9, 96)
    pos = tiny.model.pos_embed
    expected = F.interpolate(pos[:, 1:].reshape(1, 8, 8, 96).permute(0, 3, 1, 2), scale_factor=(12.1 / 8, 9.1 / 8),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 108, 96)
    out = dino_pos_embed(pos, 12, 9)
    torch.testing.assert_close(out[:, 1:], expected)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    assert dino_pos_embed(pos, 8, 8) is pos


def test_cnn_is_refused():
    with pytest.raises(UserError, match="not a ViT"):
        vit_tokens(create_backbone("resnet18"), torch.randn(1, 3, 32, 32))

"""A checkpoint load that leaves backbone-like tensors of the file unused says so at WARNING; heads stay INFO."""

from __future__ import annotations

import logging

import timm
import torch

from ssl_bench.backbones import TINY_VIT
from ssl_bench.checkpoint import load_backbone_weights


def _state(**kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **kwargs).state_dict()


def _load(tmp_path, checkpoint: dict, caplog) -> list[logging.LogRecord]:
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    model = timm.create_model(TINY_VIT, pretrained=False, num_classes=0)  # depth 4
    with caplog.at_level(logging.INFO, logger="ssl_bench.checkpoint"):
        load_backbone_weights(model, path)
    return [r for r in caplog.records if r.name == "ssl_bench.checkpoint"]


def test_deeper_vit_into_shallower_warns_with_the_unused_count(tmp_path, caplog):
    deeper = _state(depth=6)
    records = _load(tmp_path, deeper, caplog)
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert "unexpected 24" in message and "24 tensors of the file are unused" in message
    assert "blocks.4.norm1.weight" in message


def test_unused_head_only_is_info(tmp_path, caplog):
    head = {"head.mlp.0.weight": torch.zeros(8, 96), "head.last_layer.weight_g": torch.ones(16, 1)}
    records = _load(tmp_path, {"teacher": {**_state(), **head, "masked_embed": torch.zeros(96)}}, caplog)
    assert [r.levelno for r in records] == [logging.INFO]
    assert "unexpected 3" in records[0].getMessage()

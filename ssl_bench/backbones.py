"""Backbones: any timm model by name, random init or weights from a checkpoint, never downloaded."""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoint import LoadReport, checkpoint_arch, load_backbone_weights, read_checkpoint
from .errors import UserError
from .io import sha256_file

log = logging.getLogger(__name__)

# Architectures the protocols name, listed by `ssl-bench list`; any other timm name works as well.
FAMILIES: dict[str, list[str]] = {
    "vit": ["vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch8_224", "vit_base_patch8_224",
            "vit_large_patch16_224", "vit_tiny_patch16_224", "vit_nano_patch4_32"],
    "resnet": ["resnet50"],
}
TINY_VIT = "vit_nano_patch4_32"


if not timm.is_model(TINY_VIT):

    @register_model
    def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
        """A 0.5M-parameter ViT on 32x32 inputs: CPU tests, the demo and the tiny pretraining preset."""
        if pretrained:
            raise UserError(f"{TINY_VIT} has no published weights")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        defaults = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
        return VisionTransformer(**{**defaults, **kwargs})


@dataclass
class Backbone:
    """A frozen-or-trainable trunk with what the features, the cache and the result rows need to know."""

    model: nn.Module
    arch: str
    embed_dim: int
    input_size: int
    patch_size: int | None
    ckpt_path: str | None = None
    ckpt_key: str | None = None
    ckpt_sha256: str = ""
    load_report: LoadReport | None = None
    init_seed: int | None = None  # the seed of a random init: different seeds are different models

    @property
    def is_vit(self) -> bool:
        return isinstance(self.model, VisionTransformer)

    @property
    def label(self) -> str:
        """How the model is named in result rows: the checkpoint file (+ key), or the arch and seed at random init
        (so the leaderboard keeps one row per initialisation)."""
        if self.ckpt_path is None:
            return f"{self.arch} (random init)" if self.init_seed is None else f"{self.arch} (random init, seed {self.init_seed})"
        suffix = f":{self.ckpt_key}" if self.ckpt_key in ("student",) else ""
        return f"{Path(self.ckpt_path).name}{suffix} [{self.ckpt_sha256[:8]}]"

    def weights_id(self) -> str:
        """Identifies the weights for the feature cache: checkpoint hash + key, or a hash of the random init."""
        if self.ckpt_path is not None:
            return f"{self.arch}:ckpt:{self.ckpt_sha256}:{self.ckpt_key}"
        if not hasattr(self, "_init_hash"):
            digest = hashlib.sha256()
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._init_hash = digest.hexdigest()
        return f"{self.arch}:init:{self._init_hash}"


def known_models() -> list[str]:
    return timm.list_models()


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, known_models(), n=5, cutoff=0.6)
        named = sorted({m for family in FAMILIES.values() for m in family})
        raise UserError(
            f"unknown model {name!r}; valid: any timm model name ({len(known_models())} registered), e.g. "
            f"{', '.join(named)}" + (f"; close matches: {', '.join(close)}" if close else "")
        )


def _input_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(model, VisionTransformer):
        return int(model.patch_embed.img_size[0])
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def create_backbone(
    arch: str | None = None,
    ckpt: str | Path | None = None,
    ckpt_key: str = "teacher",
    seed: int = 0,
    **model_kwargs,
) -> Backbone:
    """Build ``arch`` with pretrained=False (no download) and load ``ckpt`` if given.

    ``arch`` may be left out when the checkpoint is an ssl-bench pretrain checkpoint, which records it."""
    # mapped: only the backbone's tensors are read, and they are copied into the model before this returns
    checkpoint = read_checkpoint(ckpt, mmap=True) if ckpt is not None else None
    recorded = checkpoint_arch(checkpoint)
    arch = arch or recorded
    if arch is None:
        raise UserError("--model is required (the checkpoint does not record its architecture)")
    if recorded and recorded != arch:
        log.warning("checkpoint was pretrained as %s but --model is %s", recorded, arch)
    check_model_name(arch)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    model.eval()
    patch = model.patch_embed.patch_size[0] if isinstance(model, VisionTransformer) else None
    backbone = Backbone(model=model, arch=arch, embed_dim=int(model.num_features), input_size=_input_size(model), patch_size=patch)
    if ckpt is not None:
        backbone.load_report = load_backbone_weights(model, ckpt, ckpt_key, checkpoint=checkpoint)
        backbone.ckpt_path, backbone.ckpt_key = str(ckpt), ckpt_key
        backbone.ckpt_sha256 = sha256_file(ckpt)
    else:
        backbone.init_seed = seed
    return backbone

"""Backbones: any timm model by name, random init or weights from a checkpoint, never downloaded; and ``pixels``,
the raw image itself, as the floor a learned representation must beat."""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
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
    "pixels": ["pixels (= pixels_32)", "pixels_<side>: the eval-transformed image resized to side x side, flattened"],
}
TINY_VIT = "vit_nano_patch4_32"
PIXELS_DEFAULT_SIDE = 32  # the tiny ViT's input: `pixels` and the demo's ViT see the same 32x32 crops
PIXELS_MAX_SIDE = 1024
PIXELS_VERSION = 1  # in the feature-cache key: bump if what Pixels computes changes
_PIXELS_NAME = re.compile(r"^pixels(?:_(\d+))?$")


if not timm.is_model(TINY_VIT):

    @register_model
    def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
        """A 0.5M-parameter ViT on 32x32 inputs: CPU tests, the demo and the tiny pretraining preset."""
        if pretrained:
            raise UserError(f"{TINY_VIT} has no published weights")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        defaults = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
        return VisionTransformer(**{**defaults, **kwargs})


def pixels_side(name: str | None) -> int | None:
    """The side of a raw-pixel backbone name (``pixels`` -> 32, ``pixels_64`` -> 64); None for any other name."""
    match = _PIXELS_NAME.match(name or "")
    if match is None:
        return None
    side = int(match.group(1)) if match.group(1) else PIXELS_DEFAULT_SIDE
    if not 1 <= side <= PIXELS_MAX_SIDE:
        raise UserError(f"model {name!r}: the pixels side must be 1 to {PIXELS_MAX_SIDE}; expected pixels or pixels_<side>")
    return side


class Pixels(nn.Module):
    """The image as its own representation: the normalised image at side x side, flattened to 3 x side^2 values.

    It takes the CNN path of ``features.compute_features`` (``forward_features`` then ``forward_head``), so ``cls`` and
    ``avgpool`` are the flattened image, ``cls_prenorm`` too (there is no norm), and ``patch`` gives one 3-value
    token per pixel. The eval transforms already crop to side x side; other sizes (retrieval's whole images) are
    resized bilinearly with antialiasing, a "tiny image" descriptor. No parameters: nothing to load or fine-tune."""

    no_final_norm = True  # read by features._cnn_features: cls_prenorm is the output itself

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side
        self.num_features = 3 * side * side

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"pixels takes RGB image batches [B, 3, H, W]; got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.side, self.side):
            images = F.interpolate(images.float(), size=(self.side, self.side), mode="bilinear", align_corners=False,
                                   antialias=True)
        return images

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features.flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


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
    def is_pixels(self) -> bool:
        return isinstance(self.model, Pixels)

    @property
    def label(self) -> str:
        """How the model is named in result rows: the checkpoint file (+ key), or the arch and seed at random init
        (so the leaderboard keeps one row per initialisation), or ``pixels (32x32)``."""
        if self.is_pixels:
            return f"pixels ({self.input_size}x{self.input_size})"
        if self.ckpt_path is None:
            return f"{self.arch} (random init)" if self.init_seed is None else f"{self.arch} (random init, seed {self.init_seed})"
        suffix = f":{self.ckpt_key}" if self.ckpt_key in ("student",) else ""
        return f"{Path(self.ckpt_path).name}{suffix} [{self.ckpt_sha256[:8]}]"

    def weights_id(self) -> str:
        """Identifies the weights for the feature cache: checkpoint hash + key, or a hash of the random init."""
        if self.is_pixels:  # no weights: the side (in arch) and what Pixels computes identify the features
            return f"{self.arch}:pixels-v{PIXELS_VERSION}"
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
    """A timm model name (what pretraining and fine-tuning build); ``pixels`` is refused with the reason."""
    if pixels_side(name) is not None:
        raise UserError(f"{name} is the raw-pixel baseline for `ssl-bench run` (knn, linear, fewshot, transfer, "
                        "retrieval): it has no parameters to pretrain or fine-tune")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, known_models(), n=5, cutoff=0.6)
        named = sorted({m for family, names in FAMILIES.items() if family != "pixels" for m in names})
        raise UserError(
            f"unknown model {name!r}; valid: any timm model name ({len(known_models())} registered), e.g. "
            f"{', '.join(named)}" + (f"; close matches: {', '.join(close)}" if close else "")
        )


def _input_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(model, VisionTransformer):
        return int(model.patch_embed.img_size[0])
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def pixels_backbone(side: int = PIXELS_DEFAULT_SIDE) -> Backbone:
    """The raw-pixel floor at side x side: embed_dim 3 x side^2, fed the protocols' eval transforms at that side."""
    return Backbone(model=Pixels(side).eval(), arch=f"pixels_{side}", embed_dim=3 * side * side, input_size=side,
                    patch_size=None)


def create_backbone(
    arch: str | None = None,
    ckpt: str | Path | None = None,
    ckpt_key: str = "teacher",
    seed: int = 0,
    **model_kwargs,
) -> Backbone:
    """Build ``arch`` with pretrained=False (no download) and load ``ckpt`` if given.

    ``arch`` may be left out when the checkpoint is an ssl-bench pretrain checkpoint, which records it.
    ``pixels`` / ``pixels_<side>`` give the raw-pixel backbone (``pixels_backbone``), which takes no checkpoint."""
    side = pixels_side(arch)
    if side is not None:
        if ckpt is not None:
            raise UserError(f"--model {arch} is the raw image and has no weights; leave out --ckpt {ckpt}")
        return pixels_backbone(side)
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

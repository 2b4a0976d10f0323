"""ViT forward at any input size with DINO's position-embedding interpolation (protocols.md §1.2), for the
protocols that feed whole images or video frames (retrieval, DAVIS) instead of 224 crops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .backbones import Backbone
from .errors import UserError


def dino_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """pos_embed [1, 1 + N, D] for a rows x cols patch grid, as DINO computes it: bicubic with a *scale factor*
    of (rows + 0.1) / sqrt(N) and (cols + 0.1) / sqrt(N) (the +0.1 avoids a floor off-by-one)."""
    side = int(math.isqrt(pos_embed.shape[1] - 1))
    if side * side != pos_embed.shape[1] - 1:
        raise UserError(f"pos_embed with {pos_embed.shape[1] - 1} patch positions is not a square grid")
    if rows == side and cols == side:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                         align_corners=False)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != ({rows}, {cols})")
    return torch.cat([cls_pos, grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


def vit_tokens(backbone: Backbone, images: torch.Tensor, normed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS [B, D], patch tokens [B, rows, cols, D]) of the last block for images of any size; pixels beyond a
    multiple of the patch size are dropped by the stride-p patch convolution, as in DINO."""
    model = backbone.model
    if not isinstance(model, VisionTransformer):
        raise UserError(f"{backbone.arch} is not a ViT; dense features need patch tokens")
    if model.num_prefix_tokens != 1 or getattr(model, "no_embed_class", False):
        raise UserError(f"{backbone.arch}: only ViTs with one class token inside pos_embed are supported here")
    patches = model.patch_embed.proj(images)  # [B, D, rows, cols]
    batch, dim, rows, cols = patches.shape
    x = model.patch_embed.norm(patches.flatten(2).transpose(1, 2))
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)
    x = model.pos_drop(x + dino_pos_embed(model.pos_embed, rows, cols))
    x = model.norm_pre(x)
    for block in model.blocks:
        x = block(x)
    if normed:
        x = model.norm(x)
    return x[:, 0], x[:, 1:].reshape(batch, rows, cols, dim)

"""Student / teacher network: a timm backbone and a DINO head, run once per crop resolution; for iBOT also the
global crops' patch tokens, with a learnable mask token in place of the masked patches."""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_bench.backbones import check_model_name
from ssl_bench.errors import UserError

from .config import PretrainConfig
from ssl_bench.dino_head import DINOHead, HeadOutput


class NetOutput(NamedTuple):
    """cls: every crop's [CLS] token through the head, crop-major ([n_crops * B, K]).
    patch: the global crops' patch tokens through the (patch) head, [M, K]: at the masked positions when masks
    were given (the student), at every position otherwise (the teacher: [n_global * B * N, K]); None for DINO."""

    cls: HeadOutput
    patch: HeadOutput | None


class MultiCropNet(nn.Module):
    """backbone.* + head.* (+ patch_head.*, mask_token for iBOT): the key layout ssl-bench checkpoints store and
    the checkpoint adapter reads."""

    def __init__(self, backbone: nn.Module, head: DINOHead, masked_modeling: bool = False,
                 patch_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.patch_head = patch_head
        self.mask_token: nn.Parameter | None = None
        if masked_modeling:
            if not isinstance(backbone, VisionTransformer):
                raise UserError(f"masked image modelling (iBOT) needs a ViT backbone; got {type(backbone).__name__}")
            # [1, D] as iBOT's masked_embed: the references' parameter grouping then weight-decays it (2-D).
            self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Checkpoints written before the mask token was [1, D] store it 1-D: reshape it (``state_dict`` is
        the loader's own copy)."""
        key = prefix + "mask_token"
        if self.mask_token is not None and key in state_dict and state_dict[key].ndim == 1:
            state_dict[key] = state_dict[key].reshape(self.mask_token.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, crops: list[Tensor]) -> Tensor:
        """CLS embeddings of all crops, crop-major ([n_crops * B, D]); equal-size neighbours share one pass."""
        outputs, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            outputs.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(outputs)

    def tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """All output tokens [B, 1 + N, D] (after the final norm); patches where ``masks`` [B, rows, cols] is True
        enter the blocks as the mask token (plus their position embedding)."""
        vit = self.backbone
        x = vit.patch_embed(images)  # [B, rows, cols, D] for dynamic-size ViTs, [B, N, D] otherwise
        if masks is not None:
            x = torch.where(masks.reshape(x.shape[:-1]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def forward(self, crops: list[Tensor], masks: Tensor | None = None, n_global: int = 2) -> NetOutput:
        """DINO: the head on every crop's CLS. iBOT: the first ``n_global`` crops (same size) in one pass that also
        returns their patch tokens; ``masks`` [n_global * B, rows, cols] (student) selects and masks patches."""
        if self.mask_token is None:
            return NetOutput(self.head(self.embed(crops)), None)
        tokens = self.tokens(torch.cat(crops[:n_global]), masks)
        cls = tokens[:, 0]
        if len(crops) > n_global:
            cls = torch.cat([cls, self.embed(crops[n_global:])])
        patches = tokens[:, 1:]
        patches = patches[masks.flatten(1)] if masks is not None else patches.flatten(0, 1)
        return NetOutput(self.head(cls), (self.patch_head or self.head)(patches))


def build_backbone(config: PretrainConfig, drop_path: float) -> nn.Module:
    """A timm model without classifier; ViTs interpolate pos_embed for the local crops' smaller grid."""
    check_model_name(config.arch)
    kwargs: dict = {"pretrained": False, "num_classes": 0, "drop_path_rate": drop_path}
    probe = timm.create_model(config.arch, pretrained=False, num_classes=0)
    if isinstance(probe, VisionTransformer):
        kwargs["dynamic_img_size"] = True
    return timm.create_model(config.arch, **kwargs)


def build_student_teacher(config: PretrainConfig) -> tuple[MultiCropNet, MultiCropNet]:
    """Student with drop path; teacher without, starting from the student's weights and never trained."""
    student_backbone = build_backbone(config, config.drop_path)
    embed_dim = int(student_backbone.num_features)

    def head(out_dim: int) -> DINOHead:
        return DINOHead(embed_dim, out_dim, config.hidden_dim, config.bottleneck_dim,
                        norm_last_layer=config.normalization == "l2")

    def net(backbone: nn.Module) -> MultiCropNet:
        separate = config.masked_modeling and not config.shared_head
        return MultiCropNet(backbone, head(config.out_dim), config.masked_modeling,
                            head(config.patch_out_dim) if separate else None)

    student = net(student_backbone)
    teacher = net(build_backbone(config, 0.0))
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad_(False)
    return student, teacher

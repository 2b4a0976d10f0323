"""Student / teacher network: a timm backbone and a DINO head, run once per crop resolution."""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_bench.backbones import check_model_name

from .config import PretrainConfig
from .head import DINOHead, HeadOutput


class MultiCropNet(nn.Module):
    """backbone.* + head.*: the key layout ssl-bench checkpoints store and the checkpoint adapter reads."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

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

    def forward(self, crops: list[Tensor]) -> HeadOutput:
        return self.head(self.embed(crops))


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

    def head() -> DINOHead:
        return DINOHead(embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                        norm_last_layer=config.normalization == "l2")

    student = MultiCropNet(student_backbone, head())
    teacher = MultiCropNet(build_backbone(config, 0.0), head())
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad_(False)
    return student, teacher

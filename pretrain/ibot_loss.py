"""iBOT's masked-patch loss (Zhou et al. 2022, eq. 2): teacher patch distributions of the unmasked view as
targets for the student's patch distributions at the masked positions of the same view."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_patch_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, image_index: Tensor,
                               n_images: int) -> Tensor:
    """Mean over images of the per-image mean, over its masked patches, of -sum_k t[k] log_softmax(s)[k].

    student_logits, teacher_probs: [M, K] at the M masked patches of all masked views (already divided by the
        temperatures; the teacher's centered and sharpened), in any order;
    image_index: [M] long, which of the ``n_images`` view-images (views x batch) each patch belongs to.
    An image without masked patches adds 0 to the mean but still counts in it, as in iBOT.
    Computed in float32.
    """
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 2:
        raise ValueError(f"masked_patch_cross_entropy: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_probs.shape)} must be the same [M, K]")
    if image_index.shape != student_logits.shape[:1]:
        raise ValueError(f"masked_patch_cross_entropy: image_index {tuple(image_index.shape)} must be [M]")
    if n_images < 1:
        raise ValueError("masked_patch_cross_entropy: n_images must be >= 1")
    per_patch = -(teacher_probs.float() * torch.log_softmax(student_logits.float(), dim=-1)).sum(dim=-1)
    per_image = per_patch.new_zeros(n_images).index_add_(0, image_index, per_patch)
    counts = torch.bincount(image_index, minlength=n_images).clamp_min(1).to(per_image.dtype)
    return (per_image / counts).mean()

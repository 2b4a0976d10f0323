"""DINO's multi-crop cross-entropy between teacher and student distributions (Caron et al. 2021, eq. 3)."""

from __future__ import annotations

import torch
from torch import Tensor


def dino_cross_entropy(student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
    """Mean over crop pairs (i, j), i != j, of mean_b  -sum_k t_j[b, k] log_softmax(s_i[b])_k.

    student_logits: one [B, K] tensor per student crop, already divided by the student temperature
        (0.1 in the paper); the first ``len(teacher_probs)`` are the same views as the teacher's.
    teacher_probs: one [B, K] tensor per teacher global crop (centered, sharpened, no gradient needed).
    A crop is never compared with its own view: with 2 globals and 10 locals that is 2 * 12 - 2 = 22 pairs.
    Computed in float32, one log-softmax per student crop.
    """
    n_teacher, n_student = len(teacher_probs), len(student_logits)
    n_pairs = n_teacher * n_student - min(n_teacher, n_student)
    if n_pairs == 0:
        raise ValueError(
            f"dino_cross_entropy: no student/teacher crop pair with i != j "
            f"({n_student} student crops, {n_teacher} teacher crops); expected at least 2 crops"
        )
    shape = teacher_probs[0].shape
    if any(t.shape != shape for t in teacher_probs) or any(s.shape != shape for s in student_logits):
        raise ValueError(
            "dino_cross_entropy: every crop must have the same [B, K] shape; got student "
            f"{[tuple(s.shape) for s in student_logits]}, teacher {[tuple(t.shape) for t in teacher_probs]}"
        )
    teachers = [t.float() for t in teacher_probs]
    teacher_sum = torch.stack(teachers).sum(dim=0)
    total = teacher_sum.new_zeros(())
    for i, logits in enumerate(student_logits):
        # sum over j != i of t_j, then one dot product with this crop's log-probabilities
        targets = teacher_sum - teachers[i] if i < n_teacher else teacher_sum
        total = total - (targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
    return total / n_pairs

"""iBOT: the masked patch loss on hand-checked tensors, iBOT-vMF with L2 prototypes equal to iBOT, the mask token
in the student's forward pass, and the patch term inside a training step."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_bench.dino_head import DINOHead
from ssl_bench.pretrain.config import make_config
from ssl_bench.pretrain.ibot_loss import masked_patch_cross_entropy
from ssl_bench.pretrain.network import build_student_teacher
from ssl_bench.vmf import prototype_logits

from replicas import make_imagefolder


def test_patch_loss_on_hand_checked_tensors():
    # Image 0 has two masked patches, image 1 none (it adds 0 but counts), image 2 one.
    student = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]))  # log-probabilities as logits
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    image = torch.tensor([0, 0, 2])
    per_image = [(-math.log(0.5) - math.log(0.75)) / 2, 0.0, -(0.5 * math.log(0.9) + 0.5 * math.log(0.1))]
    loss = masked_patch_cross_entropy(student, teacher, image, n_images=3)
    assert loss.item() == pytest.approx(sum(per_image) / 3, rel=1e-6)
    # Patch order does not matter; a fourth image without masked patches dilutes the mean.
    order = torch.tensor([2, 0, 1])
    assert masked_patch_cross_entropy(student[order], teacher[order], image[order], 3).item() == pytest.approx(loss.item())
    assert masked_patch_cross_entropy(student, teacher, image, 4).item() == pytest.approx(sum(per_image) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="image_index"):
        masked_patch_cross_entropy(student, teacher, image[:2], 3)


def test_ibot_vmf_with_l2_prototypes_equals_ibot():
    # With every ||w_k|| = 1 the vMF normaliser log C_p(1 / tau) is the same for all k: the softmax, hence the
    # patch loss, is iBOT's.
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    student_out, teacher_out = head(torch.randn(10, 16)), head(torch.randn(10, 16))
    image = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    losses = {}
    for normalization in ("l2", "vmf"):
        s = prototype_logits(student_out.dots, student_out.norms, 0.1, normalization, 8)
        t = torch.softmax(prototype_logits(teacher_out.dots, teacher_out.norms, 0.04, normalization, 8), dim=-1)
        losses[normalization] = masked_patch_cross_entropy(s, t, image, 4)
    torch.testing.assert_close(losses["vmf"], losses["l2"])


def _tiny_ibot(**overrides: str):
    values = {"out_dim": "32", "hidden_dim": "32", "bottleneck_dim": "16", **overrides}
    return make_config("ibot_tiny_cpu", values)


def test_mask_token_replaces_the_masked_patches():
    torch.manual_seed(0)
    student, _ = build_student_teacher(_tiny_ibot())
    student.eval()
    with torch.no_grad():
        student.mask_token.normal_()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:4, 3:6] = True  # pixels rows 8-15, cols 12-23
    changed = images.clone()
    changed[:, :, 8:16, 12:24] = torch.randn(2, 3, 8, 12)  # only inside the masked patches
    with torch.no_grad():
        a, b = student.tokens(images, masks), student.tokens(changed, masks)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(student.tokens(images), student.tokens(changed))
        out = student([images, images.flip(-1), torch.randn(2, 3, 16, 16)], torch.cat([masks, masks]))
    assert out.cls.dots.shape == (3 * 2, 32)
    assert out.patch.dots.shape == (2 * int(masks.sum()), 32)  # masked positions only, both global views


def test_teacher_returns_every_patch_and_a_separate_patch_head_when_asked():
    _, teacher = build_student_teacher(_tiny_ibot(shared_head="false", patch_out_dim="24"))
    with torch.no_grad():
        out = teacher([torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    assert out.cls.dots.shape == (6, 32) and out.patch.dots.shape == (6 * 64, 24)
    assert {k.split(".")[0] for k in teacher.state_dict()} == {"backbone", "head", "patch_head", "mask_token"}


def test_training_step_adds_the_patch_loss(tmp_path):
    from ssl_bench.pretrain.trainer import Trainer

    data = make_imagefolder(tmp_path / "d", classes=(0, 1), train_per_class=8)
    config = _tiny_ibot(batch_size="8", mask_probability="1.0", patch_loss_weight="0.5")
    trainer = Trainer(config, str(data), tmp_path / "run", device="cpu")
    crops, masks, _ = next(iter(trainer.loader))
    metrics = {k: float(v) for k, v in trainer.train_step(crops, epoch=0, step=0, masks=masks).items()}
    assert 0.1 <= metrics["masked_fraction"] <= 0.5
    assert metrics["loss"] == pytest.approx(metrics["cls_loss"] + 0.5 * metrics["patch_loss"], rel=1e-5)
    trainer.patch_centering.synchronize()
    assert trainer.patch_centering.center.abs().sum() > 0  # updated from the teacher's patch distributions
    with pytest.raises(ValueError, match="masks"):
        trainer.train_step(crops, epoch=0, step=1)

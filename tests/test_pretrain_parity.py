"""Step parity with DINO's published algorithm (main_dino.py / utils.py): the cosine schedules, the weight-decay
groups of get_params_groups (on the references' tensor shapes), and three trainer steps across the last-layer
unfreeze against the update written out here, independently of the project's loss, centering and clipping."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ssl_bench.pretrain.config import make_config
from ssl_bench.pretrain.network import build_student_teacher
from ssl_bench.pretrain.schedules import cosine_schedule
from ssl_bench.pretrain.trainer import Trainer, make_optimizer, make_schedules

from replicas import make_imagefolder

TINY = {"out_dim": "64", "hidden_dim": "32", "bottleneck_dim": "16", "n_local": "2", "drop_path": "0.0",
        "num_workers": "0", "precision": "fp32"}
DEPTH = 4  # vit_nano_patch4_32
BLOCK_DECAYED = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
BLOCK_NOT_DECAYED = ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
                     "mlp.fc1.bias", "mlp.fc2.bias")


# --- schedules ----------------------------------------------------------------------------------------------------
def _dino_cosine_scheduler(base: float, final: float, epochs: int, per_epoch: int, warmup_epochs: int,
                           start: float = 0.0) -> np.ndarray:
    """DINO's utils.cosine_scheduler, written out: linspace(start, base, W) (end point included), then a cosine
    over iters = arange(n) with n the remaining iterations."""
    warmup = np.linspace(start, base, warmup_epochs * per_epoch)
    iters = np.arange(epochs * per_epoch - warmup_epochs * per_epoch)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def test_warmup_includes_its_end_point_and_the_cosine_follows_dino():
    got = cosine_schedule(1.0, 0.1, epochs=3, steps_per_epoch=4, warmup_epochs=1)
    # warmup linspace(0, 1, 4) = 0, 1/3, 2/3, 1 (endpoint=False gave 0, 1/4, 1/2, 3/4), then 8 cosine steps
    expected = [0.0, 1 / 3, 2 / 3, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[4] == 1.0 and got[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    np.testing.assert_allclose(got, _dino_cosine_scheduler(1.0, 0.1, 3, 4, 1), rtol=0, atol=1e-15)
    np.testing.assert_allclose(cosine_schedule(2e-3, 1e-6, 5, 7, 2, warmup_start=1e-4),
                               _dino_cosine_scheduler(2e-3, 1e-6, 5, 7, 2, start=1e-4), rtol=0, atol=1e-15)
    no_warmup = cosine_schedule(0.04, 0.4, epochs=2, steps_per_epoch=3)  # weight decay and momentum: no warmup
    np.testing.assert_allclose(no_warmup, _dino_cosine_scheduler(0.04, 0.4, 2, 3, 0), rtol=0, atol=1e-15)


def test_trainer_schedules_reach_the_peak_lr_at_the_last_warmup_step():
    config = make_config("tiny_cpu", {"epochs": "4", "warmup_epochs": "2", "lr": "0.004", "batch_size": "32",
                                      "min_lr": "1e-5", "weight_decay": "0.04", "weight_decay_end": "0.4",
                                      "momentum_teacher": "0.99"})
    schedules = make_schedules(config, steps_per_epoch=3, world_size=2)
    peak = 0.004 * 32 * 2 / 256  # DINO's linear scaling rule with the global batch
    np.testing.assert_allclose(schedules.lr, _dino_cosine_scheduler(peak, 1e-5, 4, 3, 2), rtol=0, atol=1e-15)
    assert schedules.lr[5] == peak  # the sixth (last warmup) step; it was 5/6 of the peak with endpoint=False
    np.testing.assert_allclose(schedules.weight_decay, _dino_cosine_scheduler(0.04, 0.4, 4, 3, 0), atol=1e-15)
    np.testing.assert_allclose(schedules.momentum, _dino_cosine_scheduler(0.99, 1.0, 4, 3, 0), atol=1e-15)


# --- weight-decay groups ------------------------------------------------------------------------------------------
def _decay_split(overrides: dict[str, str]) -> tuple[set[str], set[str]]:
    student, _ = build_student_teacher(make_config("tiny_cpu", {**TINY, **overrides}))
    optimizer = make_optimizer(student, torch.device("cpu"))
    names = {id(p): name for name, p in student.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    return decay, no_decay


def _backbone_split() -> tuple[set[str], set[str]]:
    # DINO's rule: ndim 1 or "*.bias" -> no decay; cls_token [1, 1, D] and pos_embed [1, N, D] are decayed.
    decay = {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"}
    decay |= {f"backbone.blocks.{i}.{name}" for i in range(DEPTH) for name in BLOCK_DECAYED}
    no_decay = {"backbone.patch_embed.proj.bias", "backbone.norm.weight", "backbone.norm.bias"}
    no_decay |= {f"backbone.blocks.{i}.{name}" for i in range(DEPTH) for name in BLOCK_NOT_DECAYED}
    return decay, no_decay


def _head_split(prefix: str, trainable_norm: bool) -> tuple[set[str], set[str]]:
    # The prototype norm g is DINO's weight_g [K, 1] (ndim 2): decayed whenever it is trainable.
    decay = {f"{prefix}.mlp.{i}.weight" for i in (0, 2, 4)} | {f"{prefix}.prototype_direction"}
    decay |= {f"{prefix}.prototype_norm"} if trainable_norm else set()
    return decay, {f"{prefix}.mlp.{i}.bias" for i in (0, 2, 4)}


def test_dino_decays_the_trainable_prototype_norm_as_dino_decays_weight_g():
    backbone, head = _backbone_split(), _head_split("head", trainable_norm=True)
    assert _decay_split({"method": "dino", "normalization": "none"}) == (backbone[0] | head[0], backbone[1] | head[1])
    # l2 prototypes: g is a fixed buffer (DINO's weight_g with requires_grad False), in no group
    head = _head_split("head", trainable_norm=False)
    assert _decay_split({"method": "dino", "normalization": "l2"}) == (backbone[0] | head[0], backbone[1] | head[1])


def test_ibot_decays_the_mask_token_as_ibot_decays_its_masked_embed():
    backbone, head = _backbone_split(), _head_split("head", trainable_norm=True)
    patch_head = _head_split("patch_head", trainable_norm=True)
    decay, no_decay = _decay_split({"method": "ibot-vmf", "shared_head": "false", "patch_out_dim": "48"})
    assert decay == backbone[0] | head[0] | patch_head[0] | {"mask_token"}
    assert no_decay == backbone[1] | head[1] | patch_head[1]


def test_a_one_dimensional_mask_token_of_an_older_checkpoint_still_loads():
    student, _ = build_student_teacher(make_config("ibot_tiny_cpu", TINY))
    assert student.mask_token.shape == (1, 96)  # iBOT's masked_embed shape
    state = student.state_dict()
    state["mask_token"] = torch.arange(96.0)  # as checkpoints stored it before
    student.load_state_dict(state)
    torch.testing.assert_close(student.mask_token.detach(), torch.arange(96.0)[None], rtol=0, atol=0)


# --- three trainer steps against DINO's update, written out ------------------------------------------------------
PARITY = {**TINY, "method": "dino", "normalization": "none", "centering": "logit", "batch_size": "4",
          "epochs": "3", "warmup_epochs": "1", "lr": "0.016", "min_lr": "1e-4", "weight_decay": "0.04",
          "weight_decay_end": "0.4", "momentum_teacher": "0.9", "warmup_teacher_temp": "0.04", "teacher_temp": "0.07",
          "warmup_teacher_temp_epochs": "2", "student_temp": "0.1", "center_momentum": "0.9", "clip_grad": "3.0",
          "freeze_last_layer": "1"}
STEPS_PER_EPOCH = 2  # 8 training images in batches of 4: steps 0, 1 in the frozen epoch 0, step 2 in epoch 1


def _cosine(base: float, final: float, n: int) -> np.ndarray:
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(n) / n))


class DinoReference:
    """main_dino.py's train_one_epoch on copies of the initial student and teacher: DINOLoss, update_center, AdamW
    on get_params_groups' groups, clip_gradients, cancel_gradients_last_layer, the EMA; nothing from the trainer."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, decayed: set[str]) -> None:
        self.student, self.teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        self.decayed = decayed
        self.center = torch.zeros(64, dtype=torch.float64)
        self.adam: dict[str, dict] = {}
        per_ep, total, peak = STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH, 0.016 * 4 / 256  # lr x batch / 256 = 2.5e-4
        self.lr = np.concatenate([np.linspace(0.0, peak, per_ep), _cosine(peak, 1e-4, total - per_ep)])
        self.wd = _cosine(0.04, 0.4, total)
        self.momentum = _cosine(0.9, 1.0, total)
        self.teacher_temp = np.linspace(0.04, 0.07, 2)  # then 0.07 constant

    def loss(self, crops: list[torch.Tensor], epoch: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2]).cls.dots.double()  # raw scores g_k <v_k / ||v_k||, y>
        student_out = (self.student(crops).cls.dots.double() / 0.1).chunk(len(crops))
        temp = float(self.teacher_temp[min(epoch, 1)])
        targets = torch.softmax((teacher_out - self.center) / temp, dim=-1).chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(targets):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue
                total = total + torch.sum(-q * torch.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.center = self.center * 0.9 + teacher_out.mean(dim=0) * 0.1
        return total / terms

    @torch.no_grad()
    def adamw(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float, wd: float) -> None:
        state = self.adam.setdefault(name, {"t": 0, "m": torch.zeros_like(param), "v": torch.zeros_like(param)})
        state["t"] += 1
        param.mul_(1 - lr * wd)
        state["m"] = 0.9 * state["m"] + 0.1 * grad
        state["v"] = 0.999 * state["v"] + 0.001 * grad * grad
        m_hat, v_hat = state["m"] / (1 - 0.9 ** state["t"]), state["v"] / (1 - 0.999 ** state["t"])
        param.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))

    def step(self, crops: list[torch.Tensor], epoch: int, it: int) -> float:
        loss = self.loss(crops, epoch)
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        grads = dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))
        for name, grad in grads.items():
            coef = 3.0 / (grad.norm(2) + 1e-6)  # clips about half of the tensors here
            if coef < 1:
                grads[name] = grad * coef
        if epoch < 1:  # the prototype layer (DINO's last_layer: weight_g, weight_v) gets no update at all
            grads = {n: g for n, g in grads.items() if not n.startswith("head.prototype_")}
        for name, param in named:
            if name in grads:
                wd = float(self.wd[it]) if name in self.decayed else 0.0
                self.adamw(name, param, grads[name], float(self.lr[it]), wd)
        m = float(self.momentum[it])
        with torch.no_grad():
            student = dict(self.student.named_parameters())
            for name, param in self.teacher.named_parameters():
                param.mul_(m).add_((1 - m) * student[name].detach())
        return float(loss.detach())


def _comparable(name: str, value: torch.Tensor) -> torch.Tensor:
    """The tensor without the attention key biases: their gradient is zero in exact arithmetic (softmax ignores a
    shift shared by all keys), so it is float32 rounding that Adam scales up to a good part of lr in any
    implementation, DINO's included. They do not change any output."""
    if name.endswith("attn.qkv.bias"):
        dim = value.shape[0] // 3
        return torch.cat([value[:dim], value[2 * dim:]])
    return value


def test_three_steps_across_the_last_layer_unfreeze_equal_dinos_update(tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=(0, 1), train_per_class=4)
    torch.manual_seed(0)
    trainer = Trainer(make_config("tiny_cpu", PARITY), str(data), tmp_path / "run", device="cpu")
    assert trainer.steps_per_epoch == STEPS_PER_EPOCH
    decayed = _backbone_split()[0] | _head_split("head", trainable_norm=True)[0]
    reference = DinoReference(trainer.student_module, trainer.teacher, decayed)
    initial_norm = trainer.student_module.head.prototype_norm.detach().clone()
    generator = torch.Generator().manual_seed(1)
    for it in range(3):
        epoch = it // STEPS_PER_EPOCH
        crops = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
        crops += [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
        ours = float(trainer.train_step(crops, epoch, it)["loss"])
        # The reference loss is float64, ours float32: teacher logits near 1 / 0.04 = 25 carry an ulp of 2e-6 and the
        # log-probabilities reach -10, so ours is off by up to 7e-7 on equal weights and 1.2e-6 after the weights
        # agree to 1e-7 (gradient norms up to 40), over 6 seeds. The parameters and the centre are held to 1e-6.
        assert ours == pytest.approx(reference.step(crops, epoch, it), rel=0, abs=2e-6)
        for ours_net, ref_net in ((trainer.student_module, reference.student), (trainer.teacher, reference.teacher)):
            ref = dict(ref_net.named_parameters())
            for name, param in ours_net.named_parameters():
                torch.testing.assert_close(_comparable(name, param.detach()), _comparable(name, ref[name].detach()),
                                           rtol=0, atol=1e-6, msg=f"step {it}: {name}")
        trainer.centering.synchronize()
        torch.testing.assert_close(trainer.centering.center, reference.center.float(), rtol=0, atol=1e-6)
        norm = trainer.student_module.head.prototype_norm.detach()
        if epoch == 0:  # no gradient, so no weight decay either (AdamW skips a parameter without grad)
            assert torch.equal(norm, initial_norm)
        else:
            assert not torch.allclose(norm, initial_norm, rtol=0, atol=1e-5)

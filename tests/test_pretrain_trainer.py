"""The training loop: exact resume after a mid-epoch kill, DDP equals one process, NaN stops cleanly, configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from ssl_bench.checkpoint import read_checkpoint
from ssl_bench.errors import UserError
from ssl_bench.pretrain import trainer as trainer_module
from ssl_bench.pretrain.config import PretrainConfig, make_config, preset_names
from ssl_bench.pretrain.trainer import SimulatedKill, pretrain

from conftest import free_port
from replicas import make_imagefolder

SMALL = {"epochs": "2", "batch_size": "8", "out_dim": "64", "hidden_dim": "64", "bottleneck_dim": "32",
         "n_local": "2", "warmup_epochs": "1", "warmup_teacher_temp_epochs": "1", "num_workers": "0",
         "freeze_last_layer": "0"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(make_imagefolder(tmp_path_factory.mktemp("pt") / "d", classes=(0, 1, 7), train_per_class=12))


def _weights(path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    return {**{f"s.{k}": v for k, v in state["student"].items()}, **{f"t.{k}": v for k, v in state["teacher"].items()},
            **{f"c.{k}": v for k, v in state["centering"].items()},
            **{f"pc.{k}": v for k, v in state.get("patch_centering", {}).items()}}


# DINO's logit centering with L2 prototypes and drop path, under iBOT with a patch head of its own
IBOT_SEPARATE_HEAD = {"method": "ibot", "normalization": "l2", "centering": "logit", "drop_path": "0.1",
                      "shared_head": "false", "patch_out_dim": "48", "mask_probability": "1.0"}


@pytest.mark.parametrize("overrides", [{}, {"method": "ibot-vmf"}, IBOT_SEPARATE_HEAD, {"augment": "device"}])
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, data, overrides):
    config = make_config("tiny_cpu", {**SMALL, **overrides})
    full = pretrain(config, data, tmp_path / "full", device="cpu")  # 2 epochs x 4 steps
    with pytest.raises(SimulatedKill):
        pretrain(config, data, tmp_path / "killed", device="cpu", stop_at_step=6)  # mid-epoch 2
    assert read_checkpoint(tmp_path / "killed" / "checkpoint.pth")["epoch"] == 1
    resumed = pretrain(config, data, tmp_path / "killed", resume=True, device="cpu")
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log_lines = (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    assert len(log_lines) == 2 and (tmp_path / "killed" / "teacher_backbone.pth").is_file()


def test_existing_run_is_not_overwritten(tmp_path, data):
    config = make_config("tiny_cpu", {**SMALL, "epochs": "1"})
    pretrain(config, data, tmp_path / "run", device="cpu")
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(config, data, tmp_path / "run", device="cpu")
    # A checkpoint written before a setting existed resumes when that setting is left at its default.
    path = tmp_path / "run" / "checkpoint.pth"
    state = read_checkpoint(path)
    del state["ssl_bench"]["config"]["log_every"], state["ssl_bench"]["config"]["mask_aspect"]
    torch.save(state, path)
    pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "2"}), data, tmp_path / "run", resume=True, device="cpu")
    with pytest.raises(UserError, match=r"trained with other settings \(lr\)"):
        pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "1", "lr": "0.1"}), data, tmp_path / "run",
                 resume=True, device="cpu")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, data, monkeypatch):
    config = make_config("tiny_cpu", {**SMALL, "epochs": "3"})
    real = trainer_module.dino_cross_entropy
    calls = {"n": 0}

    def poisoned(student, teacher):
        calls["n"] += 1
        loss = real(student, teacher)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 5, in epoch 1

    monkeypatch.setattr(trainer_module, "dino_cross_entropy", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at epoch 1, step 5"):
        pretrain(config, data, tmp_path / "run", device="cpu")
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["student"].values())


def _ddp_worker(rank: int, port: int, data: str, out: str, overrides: dict[str, str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = make_config("tiny_cpu", {**SMALL, **overrides, "epochs": "1", "batch_size": "4"})
    try:
        pretrain(config, data, out, device="cpu")
    finally:
        torch.distributed.destroy_process_group()


# Drop path draws per-rank masks for each rank's half batch: off, so that two processes can equal one.
@pytest.mark.parametrize("overrides", [{}, {**IBOT_SEPARATE_HEAD, "drop_path": "0.0"}])
def test_two_process_gloo_ddp_matches_one_process_on_the_same_global_batch(tmp_path, data, overrides):
    mp.spawn(_ddp_worker, args=(free_port(), data, str(tmp_path / "ddp"), overrides), nprocs=2)
    single = pretrain(make_config("tiny_cpu", {**SMALL, **overrides, "epochs": "1", "batch_size": "8"}), data,
                      tmp_path / "single", device="cpu")
    a, b = _weights(single), _weights(tmp_path / "ddp" / "checkpoint.pth")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_presets_load_and_overrides_are_typed():
    assert {"dino_vits16", "dino_vmf_vits16", "dino_vitb16", "dino_vmf_vitb16", "tiny_cpu", "ibot_vitb16",
            "ibot_vmf_vitb16", "ibot_tiny_cpu"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(make_config(name), PretrainConfig)
    vitb = make_config("dino_vitb16")
    assert (vitb.normalization, vitb.centering, vitb.arch) == ("l2", "logit", "vit_base_patch16_224")
    vmf = make_config("dino_vmf_vits16", {"epochs": "7", "global_scale": "0.3,1.0"})
    assert (vmf.normalization, vmf.centering, vmf.epochs, vmf.global_scale) == ("vmf", "probability", 7, (0.3, 1.0))
    ibot, ibot_vmf = make_config("ibot_vitb16"), make_config("ibot_vmf_vitb16")
    assert (ibot.masked_modeling, ibot.out_dim, ibot.patch_prototypes, ibot.normalization) == (True, 8192, 8192, "l2")
    assert (ibot_vmf.normalization, ibot_vmf.centering, ibot_vmf.mask_ratio) == ("vmf", "probability", (0.1, 0.5))
    assert not make_config("dino_vmf_vitb16").masked_modeling
    with pytest.raises(UserError, match="method='mae'; expected one of dino, dino-vmf, ibot, ibot-vmf"):
        make_config("tiny_cpu", {"method": "mae"})
    with pytest.raises(UserError, match="mask ratio"):
        make_config("ibot_tiny_cpu", {"mask_ratio": "0.5,0.2"})
    with pytest.raises(UserError, match="no option lrr"):
        make_config("tiny_cpu", {"lrr": "1"})
    with pytest.raises(UserError, match="normalization='cosine'; expected one of none, l2, vmf"):
        make_config("tiny_cpu", {"normalization": "cosine"})
    with pytest.raises(UserError, match="unknown preset 'dino_vit_huge'"):
        make_config("dino_vit_huge")


def test_compiled_step_equals_the_eager_step(tmp_path, data, monkeypatch):
    # aot_eager traces forward and backward as inductor does, without generating C++ (the GPU session runs inductor).
    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "aot_eager")
    losses = {}
    for compiled in ("false", "true"):
        config = make_config("ibot_tiny_cpu", {**SMALL, "compile": compiled, "mask_probability": "1.0"})
        trainer = trainer_module.Trainer(config, data, tmp_path / compiled, device="cpu")
        crops, masks, _ = next(iter(trainer.loader))
        losses[compiled] = [float(trainer.train_step(crops, 0, step, masks)["loss"]) for step in range(2)]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=1e-6)


def test_gradients_are_clipped_per_tensor_as_dino_does():
    from ssl_bench.pretrain.trainer import clip_gradients

    big, small, untouched = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])  # norms 5 and 1
    clip_gradients([big, small, untouched], clip=2.0)
    # 5 -> 2 on its own (a global-norm clip would have scaled both by 2 / sqrt(26)); 1 stays; no grad stays None
    torch.testing.assert_close(big.grad, torch.tensor([1.2, 1.6]), rtol=0, atol=1e-6)
    assert torch.equal(small.grad, torch.tensor([0.6, 0.8])) and untouched.grad is None


def test_epoch_records_hold_the_probe_cosine_and_the_hook_metrics_and_the_teacher_keeps_its_mode(tmp_path, data):
    seen = []

    def hook(backbone) -> dict[str, float]:
        seen.append(backbone.training)
        return {"probe_metric": 42.0}

    trainer = trainer_module.Trainer(make_config("tiny_cpu", {**SMALL, "epochs": "1"}), data, tmp_path / "run",
                                     device="cpu", epoch_hook=hook)
    trainer.teacher.backbone.train()  # as built (BatchNorm backbones use batch statistics in the teacher's forward)
    stats = trainer.representation_stats()
    assert seen == [False] and trainer.teacher.backbone.training
    assert stats["probe_metric"] == 42.0 and -1.0 <= stats["cls_cosine"] <= 1.0
    assert trainer.probe_images().shape == (36, 3, 32, 32)  # the 36 train images (fewer than PROBE_IMAGES)
    (tmp_path / "run").mkdir()
    trainer.fit()
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["probe_metric"] == 42.0 and "cls_cosine" in record and "collapse" in record

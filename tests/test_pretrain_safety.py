"""Pretraining never replaces a good checkpoint with a non-finite one, cleans the temporaries of killed writes, and
refuses to resume on other data."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import torch

from ssl_bench.checkpoint import read_checkpoint
from ssl_bench.errors import UserError
from ssl_bench.pretrain import trainer as trainer_module
from ssl_bench.pretrain.checkpointing import remove_stale_temporaries
from ssl_bench.pretrain.config import make_config
from ssl_bench.pretrain.trainer import pretrain

from replicas import make_imagefolder

# 36 images, batch 12: 3 steps an epoch
SMALL = {"epochs": "1", "batch_size": "12", "n_local": "0", "out_dim": "64", "hidden_dim": "32",
         "bottleneck_dim": "16", "warmup_epochs": "1", "warmup_teacher_temp_epochs": "1", "num_workers": "0",
         "freeze_last_layer": "0"}
POISONED = "backbone.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(make_imagefolder(tmp_path_factory.mktemp("safe") / "d", classes=(0, 1, 7), train_per_class=12))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data):
    """One epoch trained into a folder that held a stale temporary of a killed checkpoint write."""
    out = tmp_path_factory.mktemp("good") / "run"
    out.mkdir()
    stale = out / ".checkpoint.pth.k1ll3d_9.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    handler, logger = _Capture(), logging.getLogger("ssl_bench")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        pretrain(make_config("tiny_cpu", SMALL), data, out, device="cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, stale, handler.messages


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _poison_last_step_of_epoch(monkeypatch, epoch: int) -> None:
    """Weights go NaN on the epoch's last step while that step's loss stays finite (what lr=300 did)."""
    real = trainer_module.Trainer.train_step

    def step(self, crops, ep, st, masks=None):
        metrics = real(self, crops, ep, st, masks)
        if st == (epoch + 1) * self.steps_per_epoch - 1:
            with torch.no_grad():
                self.student_module.get_parameter(POISONED).view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)


def test_stale_checkpoint_temporary_is_removed_when_the_run_folder_is_used(good_run):
    out, stale, messages = good_run
    assert not stale.exists() and not list(out.glob(".*.tmp"))
    assert any("removed" in m and stale.name in m and "17 bytes" in m for m in messages), messages


def test_non_finite_weights_are_not_saved_and_the_good_checkpoint_is_kept(tmp_path, data, good_run, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(good_run[0], out)
    path = out / "checkpoint.pth"
    good_bytes = path.read_bytes()
    _poison_last_step_of_epoch(monkeypatch, epoch=1)
    with pytest.raises(UserError) as error:
        pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "2"}), data, out, resume=True, device="cpu")
    message = str(error.value)
    assert "weights went non-finite (NaN or inf) in epoch 1, by step 5" in message
    assert f"student.{POISONED}" in message and "1 of " in message
    assert f"stopped without saving, the last good checkpoint is {path} (after epoch 0)" in message
    assert path.read_bytes() == good_bytes and not list(out.glob(".*.tmp"))


def test_non_finite_weights_in_the_first_epoch_write_no_checkpoint(tmp_path, data, monkeypatch):
    _poison_last_step_of_epoch(monkeypatch, epoch=0)
    with pytest.raises(UserError, match=r"in epoch 0, by step 2: .*stopped without saving, no checkpoint was "
                                        r"written yet"):
        pretrain(make_config("tiny_cpu", SMALL), data, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_resume_refuses_a_non_finite_checkpoint_written_before_the_check(tmp_path, data, good_run):
    out = tmp_path / "run"
    shutil.copytree(good_run[0], out)
    state = read_checkpoint(out / "checkpoint.pth")
    state["teacher"]["backbone.norm.weight"][0] = float("nan")
    torch.save(state, out / "checkpoint.pth")
    with pytest.raises(UserError, match=r"holds non-finite weights \(1 tensor\(s\): teacher\.backbone\.norm\.weight\); "
                                        r"it cannot be resumed"):
        pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "2"}), data, out, resume=True, device="cpu")


def test_resume_of_optimizer_state_with_other_groups_is_refused_in_one_line(tmp_path, data, good_run):
    """A checkpoint saved before the decay groups followed DINO's rule has groups of other sizes."""
    out = tmp_path / "run"
    shutil.copytree(good_run[0], out)
    state = read_checkpoint(out / "checkpoint.pth")
    groups = state["optimizer"]["param_groups"]
    groups[1]["params"].append(groups[0]["params"].pop())  # one tensor moved from the decayed group
    torch.save(state, out / "checkpoint.pth")
    with pytest.raises(UserError, match=r"optimizer state does not fit this version's parameter groups .*cannot be "
                                        r"resumed"):
        pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "2"}), data, out, resume=True, device="cpu")


def test_resume_on_other_data_is_refused_naming_both(tmp_path, data, good_run):
    other = str(make_imagefolder(tmp_path / "other", classes=(2, 3, 4, 5), train_per_class=12))
    out = tmp_path / "run"
    shutil.copytree(good_run[0], out)
    assert read_checkpoint(out / "checkpoint.pth")["ssl_bench"]["data"]["spec"] == data
    with pytest.raises(UserError, match=rf"was trained on --data {data} \(train manifest [0-9a-f]{{12}}\), "
                                        rf"not on --data {other} \(train manifest [0-9a-f]{{12}}\)"):
        pretrain(make_config("tiny_cpu", {**SMALL, "epochs": "2"}), other, out, resume=True, device="cpu")
    # The same files under another spec resume (epochs=1: nothing left to train).
    pretrain(make_config("tiny_cpu", SMALL), f"imagefolder:{data}", out, resume=True, device="cpu")


def test_a_checkpoint_without_the_data_record_resumes_with_a_warning(tmp_path, data, good_run, caplog):
    out = tmp_path / "run"
    shutil.copytree(good_run[0], out)
    state = read_checkpoint(out / "checkpoint.pth")
    del state["ssl_bench"]["data"]
    torch.save(state, out / "checkpoint.pth")
    with caplog.at_level(logging.WARNING, logger="ssl_bench"):
        pretrain(make_config("tiny_cpu", SMALL), data, out, resume=True, device="cpu")
    assert any("predates the dataset record: cannot check that --data" in r.getMessage() for r in caplog.records)


def test_only_stale_temporaries_of_the_run_are_removed(tmp_path):
    started = time.time()
    old = started - 3600

    def tmp(name: str, mtime: float):
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
        return path

    killed = tmp(".checkpoint.pth.ab12cd34.tmp", old)
    log_tmp = tmp(".log.jsonl.zz9.tmp", old)
    fresh = tmp(".checkpoint.pth.new00001.tmp", started + 5)  # written after the run began: someone's live write
    held = tmp(".checkpoint.pth.held0001.tmp", old)
    foreign = tmp(".results.csv.q1.tmp", old)  # not a file the run writes
    with open(held, "ab"):  # a live process (this one) still writes it
        removed = remove_stale_temporaries(tmp_path, ("checkpoint.pth", "log.jsonl"), started)
    assert sorted(removed) == sorted([killed, log_tmp])
    assert not killed.exists() and not log_tmp.exists()
    assert fresh.exists() and held.exists() and foreign.exists()

"""The DINO / DINO-vMF / iBOT / iBOT-vMF training loop: multi-crop student/teacher, EMA, centering, masked
patch loss, schedules, exact resume."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ssl_bench.checkpoint import non_finite_names
from ssl_bench.data import resolve_dataset, stack_images
from ssl_bench.decode import decode_batch
from ssl_bench.errors import UserError
from ssl_bench.io import atomic_write_text
from ssl_bench.prototypes import unique_prototypes
from ssl_bench.runtime import autocast, dist_info, hide_progress, init_distributed, resolve_device, resolve_precision
from ssl_bench.transforms import TransformSpec
from ssl_bench.vmf import prototype_logits

from .centering import make_centering
from .checkpointing import (BACKBONE_NAME, CHECKPOINT_NAME, check_finite, export_teacher_backbone,
                            last_good_checkpoint, load_checkpoint, remove_stale_temporaries, save_checkpoint,
                            state_tensors)
from .config import PretrainConfig, save_config
from .device_augment import DeviceMultiCrop
from .dino_loss import dino_cross_entropy
from .ibot_loss import masked_patch_cross_entropy
from .koleo import koleo_loss
from .monitor import (collapse_warning, kl_to_uniform, mean_pairwise_cosine, norm_stats, representation_warning,
                      teacher_entropy)
from .multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from .network import NetOutput, build_student_teacher
from .schedules import cosine_schedule, teacher_temperature

log = logging.getLogger(__name__)
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.yaml"
PROBE_IMAGES = 256  # the first train images, centre-cropped: their teacher [CLS] cosine is logged every epoch
# Called on the main process after each epoch with the teacher backbone (eval mode, no grad); what it returns joins
# that epoch's log record (e.g. the demo's kNN accuracy).
EpochHook = Callable[[nn.Module], dict[str, float]]
RESUMABLE_CHANGES = ("epochs", "num_workers", "precision", "log_every", "compile")
COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU test swaps in "aot_eager" (no C++ toolchain needed)


def resolve_augment(augment: str, device: torch.device) -> str:
    return ("device" if device.type == "cuda" else "cpu") if augment == "auto" else augment


class SimulatedKill(RuntimeError):
    """Raised by ``stop_at_step`` to stop a run the way a kill would: mid-epoch, without saving."""


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray


def make_schedules(config: PretrainConfig, steps_per_epoch: int, world_size: int) -> Schedules:
    peak_lr = config.lr * config.batch_size * world_size / 256.0
    return Schedules(
        lr=cosine_schedule(peak_lr, config.min_lr, config.epochs, steps_per_epoch, config.warmup_epochs),
        weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch),
        momentum=cosine_schedule(config.momentum_teacher, 1.0, config.epochs, steps_per_epoch),
    )


# Tensors that ssl-bench stores in another shape than DINO / iBOT do, by name: their number of dimensions there.
# The prototype norm g is [K] here and weight_norm's weight_g [K, 1] in the references.
REFERENCE_NDIM: dict[str, int] = {"prototype_norm": 2}


def is_weight_decayed(name: str, param: nn.Parameter) -> bool:
    """DINO's and iBOT's ``get_params_groups`` rule: no decay for ``*.bias`` and one-dimensional tensors (norm
    weights), decay for everything else (pos_embed and cls_token included), read on the references' shapes so that
    the trainable prototype norm g is decayed as their weight-norm g is."""
    ndim = REFERENCE_NDIM.get(name.rsplit(".", 1)[-1], param.ndim)
    return not (name.endswith(".bias") or ndim == 1)


def make_optimizer(student: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW on [decayed, not decayed] (``is_weight_decayed``); ``train_step`` schedules the first group's weight
    decay. Fused kernels on CUDA."""
    trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    decay = [p for name, p in trainable if is_weight_decayed(name, p)]
    no_decay = [p for name, p in trainable if not is_weight_decayed(name, p)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], clip: float) -> None:
    """DINO's and iBOT's clipping: each tensor's gradient is scaled to L2 norm <= ``clip`` on its own (not the
    global norm ``clip_grad_norm_`` bounds). Foreach ops on the device: no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    scales = (clip / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    teacher_params = [p for _, p in sorted(teacher.named_parameters())]
    student_params = [p.detach() for _, p in sorted(student.named_parameters())]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)  # m * teacher + (1 - m) * student



def _all_mean(value: torch.Tensor) -> torch.Tensor:
    if dist_info().world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist_info().world_size
    return value


def _mask_grid(config: PretrainConfig, backbone: nn.Module) -> tuple[int, int]:
    rows, cols = (config.global_size // p for p in backbone.patch_embed.patch_size)
    return rows, cols


def _make_loader(config: PretrainConfig, data: str, world_size: int, rank: int, device: torch.device,
                 mask_grid: tuple[int, int] | None):
    split = resolve_dataset(data).split("train")
    augmentation = MultiCropAugmentation(config.global_size, config.local_size, config.n_local,
                                         config.global_scale, config.local_scale)
    masking = config.block_masking() if config.masked_modeling else None
    dataset = MultiCropDataset(split, augmentation, seed=config.seed, masking=masking, mask_grid=mask_grid,
                               encoded=resolve_augment(config.augment, device) == "device")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=config.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                         num_workers=config.num_workers, collate_fn=collate_multicrop,
                                         drop_last=True, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UserError(f"{data}: {len(split)} training images give no full batch of {config.batch_size} "
                        f"on each of {world_size} process(es); lower batch_size")
    return dataset, sampler, loader


class Trainer:
    """Owns the networks, optimizer, centering and schedules of one run in ``out_dir``."""

    def __init__(self, config: PretrainConfig, data: str, out_dir: str | Path, device: str = "auto",
                 epoch_hook: EpochHook | None = None) -> None:
        self.config, self.data, self.out_dir = config, data, Path(out_dir)
        self.device = resolve_device(device)
        self.info = init_distributed(self.device)
        self.precision = resolve_precision(config.precision, self.device)
        torch.manual_seed(config.seed)
        student, teacher = build_student_teacher(config)
        mask_grid = _mask_grid(config, student.backbone) if config.masked_modeling else None
        self.dataset, self.sampler, self.loader = _make_loader(config, data, self.info.world_size, self.info.rank,
                                                               self.device, mask_grid)
        self.steps_per_epoch = len(self.loader)
        self.device_augment = None  # the device pipeline: decode + multi-crop on self.device
        if self.dataset.encoded is not None:
            self.device_augment = DeviceMultiCrop(self.dataset.augmentation, seed=config.seed)
        self.student_module, self.teacher = student.to(self.device), teacher.to(self.device)
        self.student: nn.Module = self.student_module
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student_module, device_ids=ids)
        self.teacher_forward: nn.Module = self.teacher
        if config.compile:  # state dicts, EMA and checkpoints keep using the plain modules
            self.student = torch.compile(self.student, backend=COMPILE_BACKEND)
            self.teacher_forward = torch.compile(self.teacher, backend=COMPILE_BACKEND)
        self.optimizer = make_optimizer(self.student_module, self.device)
        self.centering = make_centering(config.centering, config.out_dim, config.center_momentum).to(self.device)
        self.patch_centering = None  # iBOT: the patch distributions are centered apart from the [CLS] ones
        if config.masked_modeling:
            self.patch_centering = make_centering(config.centering, config.patch_prototypes,
                                                  config.center_momentum).to(self.device)
        self.schedules = make_schedules(config, self.steps_per_epoch, self.info.world_size)
        heads = [self.student_module.head, self.student_module.patch_head]
        self.last_layer = {id(p) for head in heads if head is not None for p in head.last_layer_parameters()}
        self.start_epoch = 0
        self.epoch_hook = epoch_hook
        self._probe: torch.Tensor | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def state(self, next_epoch: int) -> dict:
        return {
            "student": self.student_module.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "centering": self.centering.state_dict(),
            **({"patch_centering": self.patch_centering.state_dict()} if self.patch_centering is not None else {}),
            "epoch": next_epoch, "step": next_epoch * self.steps_per_epoch,
            "torch_rng": torch.get_rng_state(),
        }

    def data_record(self) -> dict[str, str]:
        """What the run trains on, kept in its checkpoint: the spec as given and its train split's manifest hash
        (relative path, size and label of every file), so that a resume on other data is refused."""
        return {"spec": self.data, "train_manifest_sha256": self.dataset.split.manifest_sha256()}

    def _check_resume_data(self, saved: dict | None) -> None:
        """Refuse to resume on data other than the checkpoint's; a checkpoint older than the record only warns."""
        if saved is None:
            log.warning("%s predates the dataset record: cannot check that --data %s is the data it was trained on",
                        self.checkpoint_path, self.data)
            return
        current = self.data_record()
        if saved["train_manifest_sha256"] != current["train_manifest_sha256"]:
            raise UserError(
                f"{self.checkpoint_path} was trained on --data {saved['spec']} (train manifest "
                f"{saved['train_manifest_sha256'][:12]}), not on --data {self.data} (train manifest "
                f"{current['train_manifest_sha256'][:12]}); resume with the same data or choose another --out"
            )
        if saved["spec"] != self.data:
            log.info("resuming with --data %s: the same files as the checkpoint's %s", self.data, saved["spec"])

    def resume(self) -> None:
        """Continue from ``checkpoint.pth``: weights, optimizer, centering, epoch; randomness is per step."""
        if not self.checkpoint_path.is_file():
            log.info("no checkpoint in %s yet: starting from epoch 0", self.out_dir)
            return
        state = load_checkpoint(self.checkpoint_path)
        saved = state["ssl_bench"]["config"]
        # A setting the checkpoint predates (added in a later version) counts as its default.
        defaults = PretrainConfig().to_dict()
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v)
        if changed:
            raise UserError(f"{self.checkpoint_path} was trained with other settings ({', '.join(changed)}); "
                            f"resume changes only {', '.join(RESUMABLE_CHANGES)}")
        self._check_resume_data(state["ssl_bench"].get("data"))
        bad = non_finite_names(state_tensors(state))
        if bad:  # written before saves were checked
            raise UserError(f"{self.checkpoint_path} holds non-finite weights ({len(bad)} tensor(s): "
                            f"{', '.join(bad[:4])}); it cannot be resumed: start again with another --out")
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # e.g. saved before the weight-decay groups followed DINO's rule
            raise UserError(f"{self.checkpoint_path}: its optimizer state does not fit this version's parameter "
                            f"groups ({error}); its weights still load with `ssl-bench run --ckpt`, but the run "
                            "cannot be resumed: start again with another --out") from None
        self.centering.load_state_dict(state["centering"])
        if self.patch_centering is not None:
            self.patch_centering.load_state_dict(state["patch_centering"])
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = int(state["epoch"])
        log.info("resumed %s at epoch %d", self.checkpoint_path, self.start_epoch)

    def _logits(self, output, temperature: float) -> torch.Tensor:
        return prototype_logits(output.dots.float(), output.norms.float(), temperature,
                                self.config.normalization, self.config.bottleneck_dim)

    def _patch_loss(self, teacher: NetOutput, student: NetOutput, masks: torch.Tensor, epoch: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """iBOT's patch term: teacher patch distributions (unmasked views, own centering and temperature) as
        targets at the positions masked in the student's views."""
        config = self.config
        temp = teacher_temperature(epoch, config.warmup_teacher_patch_temp, config.teacher_patch_temp,
                                   config.warmup_teacher_temp_epochs)
        selected = masks.flatten(1)  # [n_global * B, N]
        teacher_logits = self._logits(teacher.patch, temp)  # every patch: the centering sees them all
        targets = self.patch_centering.teacher_probs(teacher_logits.view(*selected.shape, -1)[selected], temp)
        loss = masked_patch_cross_entropy(self._logits(student.patch, config.student_temp), targets,
                                          selected.nonzero()[:, 0], selected.shape[0])
        self.patch_centering.update(teacher_logits, temp)
        return loss, {"patch_loss": loss.detach(), "masked_fraction": selected.float().mean()}

    def device_crops(self, encoded: list[torch.Tensor], indices: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """The device pipeline: a batch of image files' bytes -> the multi-crop batch, on the training device."""
        paths = [self.dataset.encoded.path(int(i)) for i in indices]
        images = decode_batch(encoded, paths, self.device)
        return self.device_augment(images, indices, epoch)

    def train_step(self, crops: list[torch.Tensor], epoch: int, step: int,
                   masks: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor | float]:
        """One optimisation step; ``masks`` (iBOT) holds one [B, rows, cols] bool mask per global crop. Returns
        the step's metrics, losses as device tensors (no host sync)."""
        config = self.config
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.schedules.lr[step])
            if i == 0:
                group["weight_decay"] = float(self.schedules.weight_decay[step])
        temp = teacher_temperature(epoch, config.warmup_teacher_temp, config.teacher_temp,
                                   config.warmup_teacher_temp_epochs)
        torch.manual_seed(config.seed * 1_000_003 + step)  # drop path: same draws whatever the resume point
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        mask = None
        if config.masked_modeling:
            if not masks:
                raise ValueError("iBOT training steps need the global crops' masks")
            mask = torch.cat(masks).to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            with torch.no_grad():
                teacher = self.teacher_forward(crops[:2])
            student = self.student(crops, mask)
        teacher_logits = self._logits(teacher.cls, temp)
        student_logits = self._logits(student.cls, config.student_temp)
        teacher_probs = self.centering.teacher_probs(teacher_logits, temp)
        loss = dino_cross_entropy(list(student_logits.chunk(len(crops))), list(teacher_probs.chunk(2)))
        extra: dict[str, float] = {}
        if mask is not None:
            patch_loss, extra = self._patch_loss(teacher, student, mask, epoch)
            extra["cls_loss"] = loss.detach()
            loss = loss + config.patch_loss_weight * patch_loss
        if config.koleo_weight > 0:
            koleo = koleo_loss(self.student_module.head.prototype_weights())
            loss = loss + config.koleo_weight * koleo
            extra["koleo"] = koleo.detach()
        self.centering.update(teacher_logits, temp)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad > 0:
            clip_gradients(self.student_module.parameters(), config.clip_grad)
        if epoch < config.freeze_last_layer:
            for param in self.student_module.parameters():
                if id(param) in self.last_layer:
                    param.grad = None
        self.optimizer.step()
        ema_update(self.teacher, self.student_module, float(self.schedules.momentum[step]))
        # Device tensors, read by the fit loop every log_every steps: no host sync inside the step.
        return {"loss": _all_mean(loss.detach()), "teacher_entropy": teacher_entropy(teacher_probs),
                "kl_uniform": kl_to_uniform(teacher_probs), "teacher_temp": temp,
                "lr": float(self.schedules.lr[step]), "wd": float(self.schedules.weight_decay[step]), **extra}

    def _drain(self, window: list[tuple[int, dict]], sums: dict[str, float], epoch: int) -> float:
        """Read the metrics of the steps in ``window`` (one host sync), add them to ``sums``, empty the window and
        return the last loss. A non-finite loss stops the run before the epoch's checkpoint is written."""
        losses = torch.stack([metrics["loss"] for _, metrics in window]).cpu()
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()
        if len(bad):
            step = window[int(bad[0])][0]
            raise UserError(
                f"non-finite loss ({float(losses[bad[0]])}) at epoch {epoch}, step {step}; stopped without saving, "
                f"{last_good_checkpoint(self.checkpoint_path)}"
            )
        for key in window[0][1]:
            values = [metrics[key] for _, metrics in window]
            total = torch.stack(values).sum() if isinstance(values[0], torch.Tensor) else sum(values)
            sums[key] = sums.get(key, 0.0) + float(total)
        window.clear()
        return float(losses[-1])

    @torch.no_grad()
    def prototype_stats(self) -> dict[str, float]:
        head = self.teacher.head
        stats = {f"proto_norm_{k}": v for k, v in norm_stats(head.prototype_norms().float()).items()}
        count, _ = unique_prototypes(head.prototype_weights().float(), self.config.unique_threshold)
        stats[f"unique_protos@{self.config.unique_threshold}"] = int(count)
        return stats

    def probe_images(self) -> torch.Tensor:
        """The first ``PROBE_IMAGES`` train images as the evaluation protocol sees them, on the device."""
        if self._probe is None:
            transform = TransformSpec("eval_dino", self.config.global_size).build()
            self._probe = stack_images(self.dataset.split, transform, PROBE_IMAGES).to(self.device)
        return self._probe

    @torch.no_grad()
    def representation_stats(self) -> dict[str, float]:
        """The teacher backbone's health on the probe images (mean pairwise [CLS] cosine) plus the epoch hook's
        metrics."""
        backbone = self.teacher.backbone
        training = backbone.training  # the teacher's forward in training keeps its mode (BatchNorm backbones)
        backbone.eval()
        try:
            with autocast(self.device, self.precision):
                features = backbone(self.probe_images()).float()
            stats = {"cls_cosine": mean_pairwise_cosine(features)}
            if self.epoch_hook is not None:
                stats.update(self.epoch_hook(backbone))
        finally:
            backbone.train(training)
        return stats

    def _rewrite_log(self, upto_epoch: int) -> None:
        """Drop log lines of epochs that a resume will run again."""
        path = self.out_dir / LOG_NAME
        if self.info.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] < upto_epoch]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def fit(self, stop_at_step: int | None = None) -> Path:
        config = self.config
        self._rewrite_log(self.start_epoch)
        for epoch in range(self.start_epoch, config.epochs):
            start = time.time()
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            self.student.train()
            sums: dict[str, float] = {}
            window: list[tuple[int, dict]] = []
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=hide_progress(),
                       leave=False)
            for it, (crops, masks, indices) in enumerate(bar):
                step = epoch * self.steps_per_epoch + it
                if stop_at_step is not None and step == stop_at_step:
                    raise SimulatedKill(f"stopped at step {step}")
                if self.device_augment is not None:
                    crops = self.device_crops(crops, indices, epoch)
                window.append((step, self.train_step(crops, epoch, step, masks)))
                if len(window) >= config.log_every or it == self.steps_per_epoch - 1:
                    bar.set_postfix(loss=f"{self._drain(window, sums, epoch):.4f}")
            if self.info.is_main:
                record = {"epoch": epoch, **{k: v / self.steps_per_epoch for k, v in sums.items()},
                          **self.prototype_stats(), **self.representation_stats(),
                          "epoch_s": round(time.time() - start, 2)}
                record["lr"] = float(self.schedules.lr[(epoch + 1) * self.steps_per_epoch - 1])
                warnings = [w for w in (collapse_warning(record["teacher_entropy"], record["kl_uniform"], config.out_dim),
                                        representation_warning(record["cls_cosine"])) if w]
                record["collapse"] = "; ".join(warnings) or None
                with open(self.out_dir / LOG_NAME, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                save_checkpoint(self.checkpoint_path, config, self.state(epoch + 1), self.data_record())
                log.info("epoch %d: loss %.4f, teacher entropy %.3f, [CLS] cosine %.3f, unique prototypes %d", epoch,
                         record["loss"], record["teacher_entropy"], record["cls_cosine"],
                         record[f"unique_protos@{config.unique_threshold}"])
                for warning in warnings:
                    log.warning("epoch %d: %s", epoch, warning)
            else:  # the same weights on every rank: all stop on a non-finite state, none waits at the barrier
                check_finite(self.state(epoch + 1), self.checkpoint_path)
            if self.info.world_size > 1:
                dist.barrier()
        if self.info.is_main:
            export_teacher_backbone(self.out_dir / BACKBONE_NAME, self.teacher.state_dict())
        return self.checkpoint_path


def pretrain(config: PretrainConfig, data: str, out_dir: str | Path, resume: bool = False, device: str = "auto",
             stop_at_step: int | None = None, epoch_hook: EpochHook | None = None) -> Path:
    """Train into ``out_dir`` (config.yaml, log.jsonl, checkpoint.pth, teacher_backbone.pth); returns the checkpoint."""
    started, out_dir = time.time(), Path(out_dir)
    if not resume and (out_dir / CHECKPOINT_NAME).exists():
        raise UserError(f"{out_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, data, out_dir, device, epoch_hook)
    if trainer.info.is_main:
        remove_stale_temporaries(out_dir, (CHECKPOINT_NAME, BACKBONE_NAME, LOG_NAME, CONFIG_NAME), started)
        save_config(config, out_dir / CONFIG_NAME)
    if resume:
        trainer.resume()
    return trainer.fit(stop_at_step)

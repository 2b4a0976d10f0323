"""Pretraining configuration: one dataclass, YAML presets, and typed ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ssl_bench.errors import UserError
from ssl_bench.options import parse_fields

from .masking import BlockMasking

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("dino", "dino-vmf", "ibot", "ibot-vmf")  # ibot*: masked image modelling on top of the [CLS] loss
NORMALIZATIONS = ("none", "l2", "vmf")
CENTERINGS = ("logit", "probability")


@dataclass
class PretrainConfig:
    """DINO / DINO-vMF / iBOT / iBOT-vMF hyperparameters; defaults are DINO's ViT-S/16 recipe (see the presets).

    The method's name says whether the masked-patch loss runs (ibot, ibot-vmf); the prototype normalisation
    and the centering are settings of their own, so ablations (e.g. vMF logits with logit centering) are one
    override away. The -vmf methods' presets set normalization=vmf and centering=probability.
    """

    method: str = "dino"
    arch: str = "vit_small_patch16_224"
    drop_path: float = 0.1
    # projection head and prototypes
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    normalization: str = "none"  # none: trainable prototype norms | l2: norms fixed to 1 | vmf: + log C_p(kappa)
    centering: str = "logit"  # logit: DINO | probability: DINO-vMF eq. 9
    center_momentum: float = 0.9
    # temperatures and teacher
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 50
    momentum_teacher: float = 0.996
    # optimisation
    epochs: int = 100
    batch_size: int = 64  # per process; lr scales with the global batch
    lr: float = 0.0005  # at a global batch of 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # bound on each gradient tensor's L2 norm (DINO's clip_gradients); 0 = off
    freeze_last_layer: int = 1
    # multi-crop
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    # iBOT (methods ibot, ibot-vmf): masked patch loss on the global crops, weighted against the [CLS] loss
    patch_loss_weight: float = 1.0
    shared_head: bool = True  # one head (MLP and prototypes) for [CLS] and patch tokens, as iBOT's default
    patch_out_dim: int = 8192  # prototypes of the patch head when it is not shared
    warmup_teacher_patch_temp: float = 0.04  # -> teacher_patch_temp over warmup_teacher_temp_epochs
    teacher_patch_temp: float = 0.07
    mask_probability: float = 0.5  # per global crop
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked fraction of a masked crop, drawn uniformly
    mask_aspect: float = 0.3  # block aspect ratios log-uniform in [mask_aspect, 1 / mask_aspect]
    # KoLeo-Proto regulariser on the L2-normalised prototypes (0 = off)
    koleo_weight: float = 0.0
    # runtime
    seed: int = 0
    num_workers: int = 8
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    # where multi-crop augmentation runs: cpu = PIL in the loader workers; device = workers read file bytes, the
    # batch is decoded (nvjpeg) and augmented on the training device; auto = device on CUDA
    augment: str = "auto"
    unique_threshold: float = 0.9
    compile: bool = False  # torch.compile the student's and the teacher's forward (first steps pay the compile)
    log_every: int = 50  # steps between reads of the step metrics (host syncs) and the non-finite loss check

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"normalization={self.normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        if self.centering not in CENTERINGS:
            raise UserError(f"centering={self.centering!r}; expected one of {', '.join(CENTERINGS)}")
        if self.augment not in ("auto", "cpu", "device"):
            raise UserError(f"augment={self.augment!r}; expected auto, cpu or device")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"precision={self.precision!r}; expected auto, fp32 or bf16")
        self.global_scale = tuple(self.global_scale)
        self.local_scale = tuple(self.local_scale)
        self.mask_ratio = tuple(self.mask_ratio)
        if self.masked_modeling:
            try:
                self.block_masking()
            except ValueError as error:
                raise UserError(str(error)) from None
        if self.epochs < 1 or self.batch_size < 1 or self.log_every < 1:
            raise UserError("epochs, batch_size and log_every must be at least 1")

    @property
    def masked_modeling(self) -> bool:
        """Whether the student sees masked global crops and the patch loss is added (iBOT)."""
        return self.method.startswith("ibot")

    def block_masking(self) -> BlockMasking:
        return BlockMasking(self.mask_probability, self.mask_ratio, self.mask_aspect)

    @property
    def patch_prototypes(self) -> int:
        """K of the patch distributions: the shared head's out_dim, or the separate patch head's."""
        return self.out_dim if self.shared_head else self.patch_out_dim

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _check_keys(values: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; valid: {', '.join(preset_names())}")
    values = yaml.safe_load(path.read_text()) or {}
    _check_keys(values, str(path))
    return values


def make_config(preset: str | None = None, overrides: dict[str, str] | None = None,
                from_file: str | Path | None = None) -> PretrainConfig:
    """Preset (or a saved config.yaml), then ``key=value`` overrides on top."""
    values: dict[str, Any] = {}
    if preset:
        values.update(load_preset(preset))
    if from_file:
        loaded = yaml.safe_load(Path(from_file).read_text()) or {}
        _check_keys(loaded, str(from_file))
        values.update(loaded)
    values.update(parse_fields(PretrainConfig, overrides or {}, "pretrain config"))
    return PretrainConfig(**values)


def save_config(config: PretrainConfig, path: str | Path) -> None:
    from ssl_bench.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

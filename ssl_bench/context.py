"""What a task gets to work with: the backbone, the dataset, feature access through the cache, and row building."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones import Backbone
from .data import Dataset
from .features import FeatureSpec, Features, extract
from .results import ResultRow
from .transforms import TransformSpec


@dataclass
class TaskContext:
    backbone: Backbone
    dataset: Dataset
    device: torch.device
    batch_size: int = 64
    workers: int = 2
    precision: str = "auto"
    cache_dir: Path | None = None
    use_cache: bool = True
    decode: str = "auto"  # features.resolve_decode
    method: str = ""
    model_label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def transform(self, name: str = "eval_dino") -> TransformSpec:
        return TransformSpec(name, self.backbone.input_size)

    def features(self, split: str, spec: FeatureSpec | str = "cls", transform: str | TransformSpec = "eval_dino",
                 dataset: Dataset | None = None) -> Features:
        """Features of ``split`` of ``dataset`` (default: the run's dataset), through the cache."""
        dataset = dataset or self.dataset
        transform = self.transform(transform) if isinstance(transform, str) else transform
        return extract(
            self.backbone, dataset.split(split), spec, transform, device=self.device, batch_size=self.batch_size,
            workers=self.workers, precision=self.precision, cache_dir=self.cache_dir, use_cache=self.use_cache,
            decode=self.decode, desc=f"{dataset.name}/{split} {FeatureSpec(spec).text if isinstance(spec, str) else spec.text}",
        )

    def row(self, task: str, protocol: str, split: str, metric: str, value: float, params: Any = None,
            std: float | None = None, n: int | None = None, dataset: str | None = None) -> ResultRow:
        """A row with the model and dataset filled in; the runner adds time, versions and device."""
        if dataclasses.is_dataclass(params) and not isinstance(params, type):
            params = dataclasses.asdict(params)
        skipped = self.dataset.skipped_images()  # unreadable images left out (--skip-bad-images): never silent
        params = {**(params or {}), **({"skipped_images": skipped} if skipped else {})}
        return ResultRow(
            model=self.model_label or self.backbone.label, arch=self.backbone.arch, task=task,
            dataset=dataset or self.dataset.name, split=split, metric=metric, value=float(value), std=std, n=n,
            protocol=protocol, params=dict(params or {}), method=self.method, ckpt_sha256=self.backbone.ckpt_sha256,
        )

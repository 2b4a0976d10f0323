"""Projection-head adapter: read the DINO-style head of a pretraining checkpoint into a ``DINOHead``, or refuse loudly.

Formats (detected as the checkpoint adapter does, ``checkpoint.extract_state_dict``):
  ssl-bench   ``head.mlp.{i}.*``, ``head.prototype_direction`` [K, p], ``head.prototype_norm`` [K]; the meta block's
              config records the normalization and the teacher temperature.
  dino        DINO / DINO-vMF / iBOT: ``head.mlp.{i}.*`` (or ``head.mlp.*`` for a one-layer head) and the
              weight-normalised ``head.last_layer`` (``weight_g`` [K, 1] / ``weight_v`` [K, p], or the newer
              ``parametrizations.weight.original0`` / ``original1``); keys may carry ``module.``. iBOT's patch head
              (``head.last_layer2``, ``head.mlp2``) is ignored: the CLS head is the one read. The normalization is not
              recorded there: "none" unless told (``vmf`` for DINO-vMF checkpoints); the teacher temperature is
              the saved ``args.teacher_temp`` when there is one, else 0.07.
Either way the prototypes are w_k = g_k * v_k / ||v_k||.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ssl_bench.dino_head import DINOHead
from ssl_bench.vmf import NORMALIZATIONS, prototype_logits

from .checkpoint import extract_state_dict, read_checkpoint
from .errors import UserError

log = logging.getLogger(__name__)

# For checkpoints that record no teacher temperature: the final one of DINO's and DINO-vMF's published ViT runs.
DEFAULT_TEACHER_TEMP = 0.07
EXPECTED = ("a pretraining checkpoint with the projection head (head.* keys), e.g. checkpoint.pth, "
            "not teacher_backbone.pth")
_G_KEYS = ("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
_V_KEYS = ("last_layer.weight_v", "last_layer.parametrizations.weight.original1")
_MLP_KEY = re.compile(r"^mlp\.(?:(\d+)\.)?(weight|bias|running_mean|running_var|num_batches_tracked)$")


@dataclass
class LoadedHead:
    """A checkpoint's projection head (eval mode, CPU) and what its teacher logits need."""

    head: DINOHead
    normalization: str  # none | l2 | vmf
    teacher_temp: float
    format: str  # ssl-bench | dino
    key: str  # teacher | student

    @property
    def bottleneck_dim(self) -> int:
        return int(self.head.prototype_direction.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.head.mlp[0].in_features)

    def teacher_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher logits [B, K] (no centering) and the L2-normalised bottleneck outputs y [B, p] of inputs x [B, D]."""
        out = self.head(x)
        logits = prototype_logits(out.dots, out.norms, self.teacher_temp, self.normalization, self.bottleneck_dim)
        return logits, out.y


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def head_tensors(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``head.*`` tensors of a state dict, with ``module.`` prefixes and the ``head.`` prefix removed."""
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        key = _strip_module(key)
        if key.startswith("head."):
            out[key[len("head."):]] = value
    return out


def _mlp_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MLP tensors renamed onto ``DINOHead.mlp`` (Linear at even indices, GELU between); other layouts are refused."""
    linear: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _MLP_KEY.match(key)
        if match is None:
            continue
        if value.ndim != {"weight": 2, "bias": 1}.get(match.group(2)):  # batch-norm tensors are 1-D or buffers
            raise UserError(f"projection head layer head.{key} {tuple(value.shape)} is not a Linear layer: only the "
                            "Linear-GELU MLP head (no batch norm) is supported")
        linear.setdefault(int(match.group(1) or 0), {})[match.group(2)] = value
    if not linear:
        raise UserError(f"the checkpoint's head has no MLP (head.mlp.* keys); expected {EXPECTED}")
    indices = sorted(linear)
    if indices != list(range(0, 2 * len(indices), 2)) or any(set(v) != {"weight", "bias"} for v in linear.values()):
        raise UserError(f"projection head MLP layers {indices} are not Linear layers at 0, 2, 4, ... with weight and "
                        "bias: only the Linear-GELU MLP head (no batch norm) is supported")
    return {f"mlp.{i}.{name}": value for i, layer in linear.items() for name, value in layer.items()}


def _prototype_state(tensors: Mapping[str, Tensor], fmt: str) -> tuple[Tensor, Tensor]:
    """(direction v [K, p], norm g [K]) of the prototype layer."""
    if "prototype_direction" in tensors and "prototype_norm" in tensors:
        return tensors["prototype_direction"], tensors["prototype_norm"].reshape(-1)
    for g_key, v_key in zip(_G_KEYS, _V_KEYS):
        if g_key in tensors and v_key in tensors:
            return tensors[v_key], tensors[g_key].reshape(-1)
    if "last_layer.weight" in tensors:  # weight norm already removed: g = ||w||
        weight = tensors["last_layer.weight"]
        return weight, weight.norm(dim=1)
    raise UserError(f"the {fmt} checkpoint's head has no prototype layer (head.last_layer.weight_g/weight_v, "
                    f"head.last_layer.parametrizations.weight.original0/1 or head.prototype_direction/prototype_norm; "
                    f"it has head.{', head.'.join(sorted(tensors)[:8])}); expected {EXPECTED}")


def build_head(tensors: Mapping[str, Tensor], normalization: str, fmt: str = "dino") -> DINOHead:
    """A ``DINOHead`` (eval mode) with the dims, layer count and weights of ``head.*`` tensors (prefix removed)."""
    mlp = _mlp_state(tensors)
    direction, norm = _prototype_state(tensors, fmt)
    nlayers = len(mlp) // 2
    first, last = mlp["mlp.0.weight"], mlp[f"mlp.{2 * (nlayers - 1)}.weight"]
    if direction.ndim != 2 or norm.shape != (direction.shape[0],) or direction.shape[1] != last.shape[0]:
        raise UserError(f"projection head shapes do not fit: bottleneck {last.shape[0]}, prototype directions "
                        f"{tuple(direction.shape)}, prototype norms {tuple(norm.shape)}")
    head = DINOHead(int(first.shape[1]), int(direction.shape[0]), int(first.shape[0]), int(last.shape[0]), nlayers,
                    norm_last_layer=normalization == "l2")
    state = {**mlp, "prototype_direction": direction, "prototype_norm": norm}
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise UserError(f"projection head weights do not form a DINO head: {exc}") from exc
    return head.eval()


def head_from_checkpoint(checkpoint: Any, key: str = "teacher", normalization: str | None = None,
                         teacher_temp: float | None = None) -> LoadedHead:
    """The head of an already-read checkpoint; ``normalization`` / ``teacher_temp`` override what it records."""
    fmt, used_key, weights = extract_state_dict(checkpoint, key)
    tensors = head_tensors(weights)
    if not tensors:
        raise UserError(f"the {fmt} checkpoint's {used_key or 'weights'} hold no projection head (head.* keys; "
                        f"keys look like {', '.join(list(weights)[:4])}); expected {EXPECTED}")
    ignored = sorted(k for k in tensors if not (_MLP_KEY.match(k) or k.startswith(("last_layer.", "prototype_"))))
    if ignored:
        log.info("projection head: ignoring head.%s (not part of the CLS head)", ", head.".join(ignored))
    config: Mapping[str, Any] = {}
    if fmt == "ssl-bench" and isinstance(checkpoint["ssl_bench"], Mapping):
        config = checkpoint["ssl_bench"].get("config") or {}
    elif isinstance(checkpoint, Mapping) and hasattr(checkpoint.get("args"), "teacher_temp"):
        config = {"teacher_temp": checkpoint["args"].teacher_temp}  # DINO / iBOT full checkpoints keep their args
    normalization = normalization or config.get("normalization", "none")
    if normalization not in NORMALIZATIONS:
        raise UserError(f"normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    temp = float(teacher_temp if teacher_temp is not None else config.get("teacher_temp", DEFAULT_TEACHER_TEMP))
    if not temp > 0:
        raise UserError(f"teacher temperature must be > 0; got {temp}")
    head = build_head(tensors, normalization, fmt)
    if config.get("bottleneck_dim") not in (None, head.bottleneck_dim):
        raise UserError(f"checkpoint config says bottleneck_dim={config['bottleneck_dim']} but its head has "
                        f"{head.bottleneck_dim}")
    return LoadedHead(head, normalization, temp, fmt, used_key or key)


def read_head(path: str | Path, key: str = "teacher", normalization: str | None = None,
              teacher_temp: float | None = None) -> LoadedHead:
    """Read ``path`` (any format ``read_checkpoint`` takes) and return its ``key`` head (``head_from_checkpoint``)."""
    return head_from_checkpoint(read_checkpoint(path, mmap=True), key, normalization, teacher_temp)


@torch.no_grad()
def assign_prototypes(loaded: LoadedHead, features: Tensor, batch_size: int = 4096,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Teacher assignments argmax_k logits [N] (long, CPU) and the sum of the bottleneck outputs y [p] (float64, CPU).

    ``features`` [N, D] are the head's inputs (post-norm CLS); they cross to ``device`` a batch at a time."""
    if features.ndim != 2 or features.shape[1] != loaded.in_dim:
        raise UserError(f"the projection head takes {loaded.in_dim}-dim inputs; features have shape "
                        f"{tuple(features.shape)} (is the backbone the checkpoint's?)")
    loaded.head.to(device)
    assignments = torch.empty(features.shape[0], dtype=torch.long)
    y_sum = torch.zeros(loaded.bottleneck_dim, dtype=torch.float64, device=device)
    for start in range(0, features.shape[0], batch_size):
        logits, y = loaded.teacher_logits(features[start:start + batch_size].to(device).float())
        assignments[start:start + y.shape[0]] = logits.argmax(dim=1).cpu()
        y_sum += y.double().sum(dim=0)
    loaded.head.to("cpu")
    return assignments, y_sum.cpu()

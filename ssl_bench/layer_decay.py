"""AdamW parameter groups for fine-tuning: BEiT's layer-wise lr decay and the weight-decay exemptions (protocols.md §8).

Layer ids of a ViT with L blocks (BEiT's ``get_num_layer_for_vit``): 0 = the embedding stage (``cls_token``,
``pos_embed``, ``patch_embed.*`` and timm's other prefix tokens and pre-norm), i + 1 = ``blocks.i.*``, L + 1 =
everything else (final norm, head). Layer l trains at lr x ``layer_decay ** (L + 1 - l)``: the head at the full lr,
the patch embedding at ``layer_decay ** (L + 1)``.

Weight decay: none on 1-D tensors (norm weights, biases), on names ending in ``.bias``, and on the names given as
``skip_decay`` (BEiT passes ``model.no_weight_decay()``, i.e. ``pos_embed`` and ``cls_token``; DeiT's small-dataset
recipe passes nothing, so those two are decayed there).
"""

from __future__ import annotations

from typing import Any, Collection, Iterable

from torch import nn

EMBEDDING_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")
EMBEDDING_PREFIXES = ("patch_embed.", "norm_pre.")


def is_vit_like(model: nn.Module) -> bool:
    """A model the layer ids apply to: a patch embedding followed by a sequence of ``blocks``."""
    return isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList) and hasattr(model, "patch_embed")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of parameter ``name`` in a ViT of ``depth`` blocks (see the module docstring)."""
    if name in EMBEDDING_NAMES or name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_scales(layer_decay: float, depth: int) -> list[float]:
    """lr scale of every layer id 0..depth + 1: ``layer_decay ** (depth + 1 - l)``."""
    return [layer_decay ** (depth + 1 - layer) for layer in range(depth + 2)]


def exempt_from_decay(name: str, param: nn.Parameter, skip_decay: Collection[str] = ()) -> bool:
    """BEiT's and timm's rule: no weight decay on 1-D tensors, biases and the names in ``skip_decay``."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip_decay


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 skip_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Groups for ``torch.optim.AdamW``: one per (layer id, decayed or not), in order of first appearance.

    Each group holds ``params``, ``names``, ``weight_decay``, ``lr_scale`` (multiply the scheduled lr by it) and
    ``layer_id`` (None without layer decay). ``layer_decay`` < 1 needs a ViT-like model (``is_vit_like``)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must lie in (0, 1]; got {layer_decay}")
    decayed = layer_decay < 1.0
    if decayed and not is_vit_like(model):
        raise ValueError(f"layer-wise lr decay needs a ViT (patch_embed + blocks); got {type(model).__name__}")
    depth = len(model.blocks) if decayed else 0
    scales = layer_scales(layer_decay, depth) if decayed else []
    skip = set(skip_decay)
    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = exempt_from_decay(name, param, skip)
        layer = vit_layer_id(name, depth) if decayed else None
        group = groups.setdefault((layer, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": scales[layer] if layer is not None else 1.0, "layer_id": layer,
        })
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())

"""DINO projection head (shared by pretraining and the prototypes task): MLP -> L2-normalised bottleneck y ->
weight-normalised prototypes w_k = g_k * v_k / ||v_k||.

The head returns the raw dot products <w_k, y> and the prototype norms ||w_k|| separately, so the
normalisation choice (none | l2 | vmf, see ``vmf.prototype_logits``) is made by the loss, not here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Names (relative to the head) of the prototype layer's tensors: the trainer freezes them in the first epoch.
LAST_LAYER_NAMES: tuple[str, ...] = ("prototype_direction", "prototype_norm")


class HeadOutput(NamedTuple):
    """What the losses need from one forward pass.

    dots:  [..., K] <w_k, y>, the prototype scores before any temperature.
    norms: [K]      ||w_k||; all ones with ``norm_last_layer`` (DINO's L2 prototypes).
    y:     [..., p] the L2-normalised bottleneck output.
    """

    dots: Tensor
    norms: Tensor
    y: Tensor


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO / DINO-vMF projection head (Caron et al. 2021; Govindarajan et al. 2023).

    Paper defaults: K = 65536 prototypes, hidden 2048, bottleneck p = 256, 3 layers, GELU.
    The prototype layer is weight-normalised by hand with two explicit tensors so the state dict is
    the same whatever the options: ``prototype_direction`` v [K, p] and ``prototype_norm`` g [K]
    (initialised to 1). With ``norm_last_layer`` g is a buffer fixed at 1 (L2-normalised prototypes,
    the "l2" normalisation); without it g is trainable ("none", DINO's ViT-S/16 setting, and "vmf").
    ``norm_last_layer`` has no default because the papers' defaults differ by method and model size.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        *,
        norm_last_layer: bool,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.norm_last_layer = norm_last_layer
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The direction keeps nn.Linear's default init (as DINO's last layer does): its scale sets the
        # effective step size of the direction, since the gradient through v / ||v|| scales as 1 / ||v||.
        direction = torch.empty(out_dim, bottleneck_dim)
        nn.init.kaiming_uniform_(direction, a=math.sqrt(5))
        self.prototype_direction = nn.Parameter(direction)
        if norm_last_layer:
            self.register_buffer("prototype_norm", torch.ones(out_dim))
        else:
            self.prototype_norm = nn.Parameter(torch.ones(out_dim))

    def prototype_weights(self) -> Tensor:
        """W [K, p] with rows w_k = g_k * v_k / ||v_k||: for monitoring (unique prototypes) and KoLeo."""
        return F.normalize(self.prototype_direction, dim=-1) * self.prototype_norm.unsqueeze(-1)

    def prototype_norms(self) -> Tensor:
        """||w_k|| [K] (= |g_k|): kappa_k = ||w_k|| / tau in DINO-vMF."""
        return self.prototype_norm.abs()

    def forward(self, x: Tensor) -> HeadOutput:
        """x [..., in_dim] (CLS or patch tokens) -> dots [..., K], norms [K], y [..., p]."""
        y = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        dots = F.linear(y, self.prototype_weights())
        return HeadOutput(dots=dots, norms=self.prototype_norms(), y=y)

    def last_layer_parameter_names(self) -> list[str]:
        """Names (relative to this head) of the trainable prototype-layer parameters, frozen in epoch 1."""
        params = dict(self.named_parameters())
        return [name for name in LAST_LAYER_NAMES if name in params]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The parameters named by ``last_layer_parameter_names`` (to drop their gradients in epoch 1)."""
        params = dict(self.named_parameters())
        return [params[name] for name in self.last_layer_parameter_names()]

"""The von Mises-Fisher normaliser log C_p(kappa) and the prototype logits of DINO / DINO-vMF.

DINO-vMF (Govindarajan et al., ICLR 2023) reads each prototype w_k as a vMF component with mean
direction w_k / ||w_k|| and concentration kappa_k = ||w_k|| / tau; the component's log-likelihood
of the bottleneck output y is <w_k, y> / tau + log C_p(kappa_k). The normaliser keeps prototypes with
large norms from winning only because of their norm, which is what lets the norms be trained.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "vmf")


def log_vmf_normaliser(kappa: Tensor, dim: int) -> Tensor:
    """log C_p(kappa) of the vMF density on the unit sphere in R^p (p = ``dim``, 256 in the paper).

    log C_p(kappa) = (p/2 - 1) log kappa - (p/2) log(2 pi) - log I_{p/2-1}(kappa). The Bessel term uses
    the first term of the uniform asymptotic expansion (DLMF 10.41.3), with nu = p/2 - 1, r = kappa / nu,
    s = sqrt(1 + r^2):
        log I_nu(nu r) ~ nu (s + log(r / (1 + s))) - 1/2 log(2 pi nu) - 1/4 log(1 + r^2).
    Substituted and simplified, the log kappa and log r terms cancel exactly, which leaves
        log C_p = nu log nu + 1/2 log(2 pi nu) - (p/2) log(2 pi) + nu (log(1 + s) - s) + 1/2 log s,
    a form with no log of a small number and no large cancelling terms, so it stays finite and
    differentiable for kappa in [1e-3, 1e5] and beyond. Its error is O(1/nu) in log I (below 1/(12 nu)),
    nearly constant in kappa; DINO-vMF only needs differences across prototypes.

    kappa: [...] positive concentrations. Returns a tensor shaped like kappa, in at least float32.
    """
    if dim < 3:
        raise ValueError(f"log_vmf_normaliser: dim must be >= 3 (nu = dim/2 - 1 > 0), got {dim}")
    if kappa.dtype not in (torch.float32, torch.float64):
        kappa = kappa.float()
    nu = dim / 2.0 - 1.0
    r = kappa / nu
    s = torch.hypot(torch.ones_like(r), r)  # sqrt(1 + r^2) without overflow
    constant = nu * math.log(nu) + 0.5 * math.log(2.0 * math.pi * nu) - (dim / 2.0) * math.log(2.0 * math.pi)
    return constant + nu * (torch.log1p(s) - s) + 0.5 * torch.log(s)


def prototype_logits(dots: Tensor, norms: Tensor, temperature: float, normalization: str, dim: int) -> Tensor:
    """Tempered prototype logits [B, K] from the head's dots [B, K] = <w_k, y> and norms [K] = ||w_k||.

    "none" and "l2": dots / tau (DINO; with "l2" the head fixes ||w_k|| = 1).
    "vmf": dots / tau + log C_p(||w_k|| / tau) (DINO-vMF eq. 6), p = ``dim`` the bottleneck width.
    tau is the student (0.1) or teacher (0.04 -> 0.07) temperature; the same formula serves both.
    The result is float32 (or float64) even for bf16 dots under autocast: a bf16 logit near 1 / 0.04 = 25
    would be rounded to steps of 0.125, on top of the rounding already in bf16 dots.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown prototype normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    logits = (dots if dots.dtype == torch.float64 else dots.float()) / temperature
    if normalization == "vmf":
        logits = logits + log_vmf_normaliser(norms / temperature, dim)
    return logits

"""The vMF normaliser (ssl_bench/vmf.py) against scipy's Bessel function, its gradients, and the logits it feeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ive

from ssl_bench.pretrain.centering import make_centering
from ssl_bench.vmf import log_vmf_normaliser, prototype_logits


def _exact_log_cp(kappa: np.ndarray, dim: int) -> np.ndarray:
    nu = dim / 2 - 1
    log_bessel = np.log(ive(nu, kappa)) + kappa  # ive(nu, k) = I_nu(k) exp(-k)
    return nu * np.log(kappa) - (dim / 2) * math.log(2 * math.pi) - log_bessel


# Measured on kappa = linspace(20, 500, 200), float64:
#   p     max |ours - exact|   max deviation after removing the mean offset
#   16    4.9e-3               4.1e-3
#   64    1.2e-3               1.2e-3
#   256   6.1e-4               7.5e-4
# against values that change by ~480 over the range. The first dropped term of DLMF 10.41.3 is
# U_1(p)/nu with |U_1| <= 1/12, so |error| <= 1/(12 nu) is the bound asserted (0.012, 0.0027, 0.00066),
# and the offset-free deviation is asserted below 1e-5 of the range of the values.
@pytest.mark.parametrize("dim", [16, 64, 256])
def test_log_normaliser_matches_scipy(dim):
    kappa = np.linspace(20.0, 500.0, 200)
    exact = _exact_log_cp(kappa, dim)
    ours = log_vmf_normaliser(torch.tensor(kappa, dtype=torch.float64), dim).numpy()
    error = ours - exact
    nu = dim / 2 - 1
    assert np.abs(error).max() <= 1.0 / (12.0 * nu)
    deviation = error - error.mean()
    assert np.abs(deviation).max() < 1e-5 * np.ptp(exact)
    # what the logits see: differences between neighbouring kappa (step 2.4), relative error measured
    # 1.7e-4 (p 16), 4.0e-4 (p 64), 5.8e-5 (p 256)
    assert np.allclose(np.diff(ours), np.diff(exact), rtol=1e-3, atol=0.0)


def test_log_normaliser_differentiable_and_safe():
    kappa = torch.tensor([1e-3, 0.5, 3.0, 40.0, 900.0], dtype=torch.float64, requires_grad=True)
    for dim in (16, 256):
        assert torch.autograd.gradcheck(lambda k: log_vmf_normaliser(k, dim), (kappa,))
    wide = torch.logspace(-3, 5, 50, requires_grad=True)  # float32 over the whole range asked for
    value = log_vmf_normaliser(wide, 256)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(wide.grad).all()
    # d/dkappa log C_p = -I_{p/2}(kappa) / I_{p/2-1}(kappa), in (-1, 0): negative, towards -1 for large kappa
    assert (wide.grad < 0).all() and (wide.grad > -1).all()
    assert wide.grad[-1] < -0.99


def test_vmf_with_equal_norms_gives_dino_probabilities():
    torch.manual_seed(0)
    dots = torch.randn(6, 32).clamp(-1, 1)
    norms = torch.full((32,), 1.0)
    for temperature in (0.1, 0.04):  # student, teacher
        plain = prototype_logits(dots, norms, temperature, "none", dim=16)
        vmf = prototype_logits(dots, norms, temperature, "vmf", dim=16)
        assert not torch.allclose(plain, vmf)  # differs by a constant across k ...
        assert torch.allclose(plain.softmax(-1), vmf.softmax(-1), atol=1e-6)  # ... which softmax ignores
    for kind in ("logit", "probability"):  # teacher probabilities through either centering
        centerings = {n: make_centering(kind, 32) for n in ("l2", "vmf")}
        for step in range(3):
            batch = torch.randn(6, 32).clamp(-1, 1)
            for n, centering in centerings.items():
                centering.update(prototype_logits(batch, norms, 0.04, n, dim=16), 0.04)
        probs = {n: c.teacher_probs(prototype_logits(dots, norms, 0.04, n, dim=16), 0.04) for n, c in centerings.items()}
        assert torch.allclose(probs["l2"], probs["vmf"], atol=1e-5)


def test_vmf_logits_hand_checked():
    # dots / tau + log C_p(norm / tau); none and l2 are dots / tau
    dots = torch.tensor([[0.5, -0.2]])
    norms = torch.tensor([1.0, 2.0])
    assert torch.allclose(prototype_logits(dots, norms, 0.1, "none", 8), torch.tensor([[5.0, -2.0]]))
    assert torch.allclose(prototype_logits(dots, norms, 0.1, "l2", 8), torch.tensor([[5.0, -2.0]]))
    expected = torch.tensor([[5.0, -2.0]]) + log_vmf_normaliser(torch.tensor([10.0, 20.0]), 8)
    assert torch.allclose(prototype_logits(dots, norms, 0.1, "vmf", 8), expected)
    # bf16 dots (autocast) still give float32 logits
    assert prototype_logits(dots.bfloat16(), norms, 0.1, "none", 8).dtype == torch.float32


def test_unknown_normalization_names_the_valid_ones():
    with pytest.raises(ValueError, match="none, l2, vmf"):
        prototype_logits(torch.zeros(1, 2), torch.ones(2), 0.1, "cosine", 8)

"""Teacher centering: DINO's logit centering and DINO-vMF's probability centering, as swappable modules.

Both keep a ``center`` buffer [K] updated by an EMA of a batch statistic of the teacher logits, and
share one interface:

    probs = centering.teacher_probs(teacher_logits, temperature)   # uses the current center
    centering.update(teacher_logits, temperature)                   # EMA step from this batch

Under torch.distributed the batch statistic is summed over ranks with an all-reduce that ``update``
starts asynchronously and that is awaited only when the center is next needed (``teacher_probs``,
``state_dict``, ``synchronize``), as DINOv2 does, so the reduction overlaps the student's backward.
Reading the ``center`` buffer directly sees it without a pending update: call ``synchronize`` first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

CENTERINGS: tuple[str, ...] = ("logit", "probability")


class _PendingMean:
    """A cross-rank mean of a per-sample statistic, possibly still being all-reduced."""

    def __init__(self, batch_sum: Tensor, count: int) -> None:
        # One all-reduce carries the sums and the sample count, so ranks may hold unequal batches.
        self._buffer = torch.cat([batch_sum.double(), batch_sum.new_tensor([count], dtype=torch.float64)])
        self._work = None
        if dist.is_available() and dist.is_initialized():
            self._work = dist.all_reduce(self._buffer, async_op=True)

    def wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
        return self._buffer[:-1] / self._buffer[-1]


class _EMACentering(nn.Module):
    """The EMA and the deferred all-reduce; subclasses say which statistic is averaged and how it is used."""

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"centering momentum must be in [0, 1], got {momentum}")
        self.out_dim = out_dim
        self.momentum = momentum
        # Zeros for both kinds: for logit centering this is DINO's initial center; for probability
        # centering it is log(1/K) (a uniform running mean) up to a constant across k, which no softmax sees.
        self.register_buffer("center", torch.zeros(out_dim))
        self._pending: _PendingMean | None = None

    def _batch_sum(self, logits: Tensor, temperature: float) -> Tensor:
        raise NotImplementedError

    def _ema_target(self, batch_mean: Tensor) -> Tensor:
        raise NotImplementedError

    def teacher_probs(self, logits: Tensor, temperature: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, logits: Tensor, temperature: float) -> None:
        """Start the EMA step from this batch's teacher logits [B, K] (all global crops, tempered)."""
        self.synchronize()
        logits = logits.detach().reshape(-1, logits.shape[-1])
        if logits.shape[-1] != self.out_dim:
            raise ValueError(f"centering: logits have {logits.shape[-1]} prototypes, expected {self.out_dim}")
        self._pending = _PendingMean(self._batch_sum(logits, temperature), logits.shape[0])

    @torch.no_grad()
    def synchronize(self) -> None:
        """Wait for a pending all-reduce and fold it into ``center``; a no-op when none is pending."""
        if self._pending is None:
            return
        target = self._ema_target(self._pending.wait()).to(self.center)
        self._pending = None
        self.center.mul_(self.momentum).add_(target, alpha=1.0 - self.momentum)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.synchronize()  # the saved center includes the last update: exact resume
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.synchronize()  # finish (then overwrite) any in-flight update rather than leave it dangling
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class LogitCentering(_EMACentering):
    """DINO centering (Caron et al. 2021, eq. 4): P_t = softmax((s - c) / T_t), c <- m c + (1 - m) mean_b s.

    s = logits * T_t is the raw teacher score (<w_k, y> for "none"/"l2", so this is exactly DINO's
    formula there). Paper default m = 0.9.
    """

    def _batch_sum(self, logits: Tensor, temperature: float) -> Tensor:
        return logits.float().sum(dim=0) * temperature

    def _ema_target(self, batch_mean: Tensor) -> Tensor:
        return batch_mean

    def teacher_probs(self, logits: Tensor, temperature: float) -> Tensor:
        """Centered teacher distribution [B, K] from tempered logits [B, K] = s / T_t."""
        self.synchronize()
        return torch.softmax(logits.float() - self.center / temperature, dim=-1)


class ProbabilityCentering(_EMACentering):
    """DINO-vMF centering in probability space (eq. 9): P_t proportional to exp(-c) softmax(logits).

    c <- m c + (1 - m) log(mean_b softmax(logits)_b), so P_t = softmax(logits - c): a prototype the
    teacher has been picking often is damped by its running mean probability. Paper default m = 0.9.
    ``temperature`` is unused (the logits are already tempered); it is taken for a common interface.
    """

    def _batch_sum(self, logits: Tensor, temperature: float) -> Tensor:
        # sum_b softmax(logits)_bk via log-sum-exp over the batch in float32, exponentiated in float64:
        # a prototype every sample gives probability below float32's range still gets a finite log mean.
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(log_probs, dim=0).double().exp()

    def _ema_target(self, batch_mean: Tensor) -> Tensor:
        return batch_mean.clamp_min(torch.finfo(torch.float64).tiny).log()

    def teacher_probs(self, logits: Tensor, temperature: float) -> Tensor:
        """Centered teacher distribution [B, K] = softmax(logits - c) from tempered logits [B, K]."""
        self.synchronize()
        return torch.softmax(logits.float() - self.center, dim=-1)


def make_centering(kind: str, out_dim: int, momentum: float = 0.9) -> LogitCentering | ProbabilityCentering:
    """``logit`` (DINO) or ``probability`` (DINO-vMF), independent of the prototype normalization."""
    if kind == "logit":
        return LogitCentering(out_dim, momentum)
    if kind == "probability":
        return ProbabilityCentering(out_dim, momentum)
    raise ValueError(f"unknown centering {kind!r}; expected one of {', '.join(CENTERINGS)}")


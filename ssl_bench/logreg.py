"""Multinomial L2 logistic regression on frozen features: a fast full-batch L-BFGS in torch (any device).

One classifier for every task that fits a logistic regression on frozen features (few-shot, the transfer probes).
It minimises scikit-learn's objective, so numbers agree with ``LogisticRegression(solver="lbfgs")`` (multinomial,
``penalty="l2"``), with K x D weights ``W`` and, optionally, an unpenalised intercept ``b``::

    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||_F^2

What makes it fast, none of which changes the minimiser:

- the objective is divided by ``C n`` (values of order one whatever C and n): ``mean CE + mu/2 ||W||^2``, ``mu =
  1 / (C n)``; with an intercept the features are centred and ``b' = b + W mean`` is solved for instead of ``b``;
- L-BFGS runs in preconditioned coordinates (``_Preconditioner``): the feature space is rotated onto the
  eigenvectors of a curvature-weighted covariance of the rows and each direction scaled so that the Hessian is
  close to the identity, rebuilt from the current predictions after iterations 5, 10, 20, 40, ... (the L-BFGS
  memory is carried into the new coordinates). Iterations with it / plain L-BFGS: synthetic ViT-like few-shot
  features (5000 x 384, 1000 classes) 16 / 51 at C = 13.3 and 81 / 253 at C = 1000; raw digits pixels at C = 1000
  194 / 664 (scikit-learn 3743, stopping higher); whitening once at the start instead took 9393 there;
- the logits are linear in the step along a search direction, so one product ``X Wd^T`` per iteration serves
  every trial of the strong-Wolfe line search (each trial is O(n K), not O(n K D)) and the accepted trial's
  softmax gives the next gradient with one more product: two n x D x K products per iteration.

Measured on this 2-core CPU (another process on it), MSN few-shot at ImageNet scale (K = 1000, D = 384, lambd
0.075 -> C = 13.3, no intercept, L2-normalised synthetic features, 50k val rows scored): the 1 % split (12,811
rows) 22 iterations, 8.6 s in float64 (scikit-learn's lbfgs on the same problem: 23 s at tol 1e-6, 35 s at 1e-8
for the same accuracy); 1-shot 0.9 s, 5-shot 3 s; all nine 1/2/5-shot splits plus 1 % in 25 s. float32 about 2x
faster.

Stopping (``tol``): the largest absolute entry of the gradient w.r.t. (W, b), divided by the same at the zero
start (relative, so one tol serves L2-normalised rows, whose gradients are ~1e-4, and raw features alike; at the
zero start it does not depend on C); or the objective's relative decrease in one iteration falls below 64 float64
epsilons (scikit-learn's ``ftol``: no further progress is measurable); or ``max_iter``. The objective is summed in
float64 for either working dtype.

float64 by default; float32 halves time and memory and reaches a relative gradient of about 1e-4. With two
classes this is still the multinomial model (two rows of weights), which is scikit-learn's binary model at ``2 C``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import UserError
from .runtime import strict_fp32

log = logging.getLogger(__name__)

# Eigenvalues of the curvature are floored at this fraction of the largest, so that the preconditioner never scales a
# direction by more than about floor^-1/2 relative to another.
_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6}
_HISTORY = 20  # L-BFGS memory (pairs)
# The preconditioner is rebuilt from the current predictions after iteration 5, 10, 20, 40, ... and then every 200;
# each rebuild also recomputes the logits from scratch (they are otherwise updated in place).
_REFRESH_FIRST, _REFRESH_MAX_GAP = 5, 200
_REFRESH_WARM = 20  # first rebuild in a fit that starts with the previous fit's preconditioner
_PREDICT_ROWS = 8192  # rows per block when predicting: bounds the N x K logits held at once
_C1, _C2 = 1e-4, 0.9  # strong Wolfe constants
# Below this many multiply-adds per n x D x K product, CPU fits run on one thread: each iteration is a few dozen
# small ops, each an OpenMP region that waits for every thread. On the 2-core CPU with one other busy process, ms per
# iteration on 1 / 2 threads: 1000 x 64 x 100 2.7 / 23; 2000 x 384 x 100 16 / 35; 5000 x 384 x 100 32 / 36;
# 2000 x 384 x 1000 103 / 75; 13000 x 384 x 1000 753 / 438. With more load, 2 threads lost far worse (36 ms
# against 0.5 ms for digits' 1347 x 16 x 10).
_ONE_THREAD_WORK = 1 << 28
_MAX_TRIALS = 30


@dataclass
class LogisticModel:
    """A fitted multinomial logistic regression: ``coef`` (K, D), ``intercept`` (K,) (zeros without intercept)."""

    coef: torch.Tensor
    intercept: torch.Tensor
    C: float
    fit_intercept: bool
    n_iter: int
    converged: bool
    stop_reason: str  # "gradient", "ftol", "max_iter" or "line_search"
    grad_rel: float  # largest |gradient| entry at the solution / the same at the zero start (``tol`` bounds it)
    objective: float  # scaled objective (1/n) sum CE + ||W||^2 / (2 C n) at the solution

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) in the model's dtype, on the model's device."""
        if not len(X):
            return self.coef.new_zeros((0, len(self.coef)))
        return torch.cat(list(self._logit_blocks(X)))

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(X), dim=1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Class indices (N,), computed in blocks of rows so that N x K logits are never held whole."""
        if not len(X):
            return torch.zeros(0, dtype=torch.long, device=self.coef.device)
        return torch.cat([block.argmax(dim=1) for block in self._logit_blocks(X)])

    def score(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy as a fraction (scikit-learn's ``score``)."""
        if len(X) != len(y):
            raise UserError(f"logistic regression: {len(X)} feature rows but {len(y)} labels")
        if not len(y):
            raise UserError("logistic regression: cannot score an empty set")
        return float((self.predict(X) == y.to(self.coef.device)).double().mean())

    def _logit_blocks(self, X: torch.Tensor):
        if X.ndim != 2 or X.shape[1] != self.coef.shape[1]:
            raise UserError(f"logistic regression: expected features (N, {self.coef.shape[1]}); got {tuple(X.shape)}")
        with strict_fp32():
            for start in range(0, len(X), _PREDICT_ROWS):
                block = X[start:start + _PREDICT_ROWS].to(device=self.coef.device, dtype=self.coef.dtype)
                yield torch.addmm(self.intercept, block, self.coef.T)


def _check(X: torch.Tensor, y: torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, int]:
    if X.ndim != 2:
        raise UserError(f"logistic regression needs 2-D features (N, D); got shape {tuple(X.shape)}")
    if y.ndim != 1 or len(y) != len(X):
        raise UserError(f"logistic regression: labels must be 1-D with one entry per row; got {tuple(y.shape)} "
                        f"for {len(X)} rows")
    if len(X) == 0:
        raise UserError("logistic regression: no training rows")
    if y.is_floating_point():
        raise UserError("logistic regression: labels must be integer class indices")
    y = y.long()
    low, high = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise UserError(f"logistic regression: labels must lie in [0, {num_classes}); found [{low}, {high}]")
    if num_classes < 2:
        raise UserError(f"logistic regression needs at least 2 classes; got {num_classes}")
    if not bool(torch.isfinite(X).all()):
        raise UserError("logistic regression: features contain NaN or inf")
    return y, num_classes


class _Problem:
    """Training data shared by every C of a path: centred features (with an intercept), labels, sizes.

    With an intercept and classes that have no training row, the minimiser does not exist (their intercepts would
    go to -inf): such classes are left out of the fit (``classes`` maps fitted rows to class ids) and get zero
    weights and an intercept of -inf, so they are never predicted, as scikit-learn never predicts an unseen class.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, fit_intercept: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.dim = X.shape
        self.num_classes, self.fit_intercept, self.dtype = num_classes, fit_intercept, dtype
        y = y.to(device)
        counts = torch.bincount(y, minlength=num_classes)
        self.classes: torch.Tensor | None = None
        if fit_intercept and bool((counts == 0).any()):
            self.classes = torch.nonzero(counts > 0).flatten()
            remap = torch.full((num_classes,), -1, dtype=torch.long, device=device)
            remap[self.classes] = torch.arange(len(self.classes), device=device)
            y = remap[y]
        self.k = num_classes if self.classes is None else len(self.classes)
        X64 = X.to(device=device, dtype=torch.float64)
        self.mean = X64.mean(dim=0) if fit_intercept else X64.new_zeros(self.dim)
        self.X = (X64 - self.mean).to(dtype)  # (n, D)
        self.mean = self.mean.to(dtype)
        self.y = y
        self.rows = torch.arange(self.n, device=device)
        # Scale of the gradient at the zero start (the same for every C): the stopping rule is relative to it, so
        # that it means the same whatever the feature scale, n and K (L2-normalised rows give entries ~1e-4).
        counts = torch.bincount(y, minlength=self.k).to(dtype)
        class_sums = self.X.new_zeros((self.k, self.dim)).index_add_(0, y, self.X)
        g_bias = 1.0 / self.k - counts / self.n
        gW = (self.X.sum(dim=0)[None, :] / self.k - class_sums) / self.n
        if fit_intercept:
            gW = gW + torch.outer(g_bias, self.mean)
            scale = max(float(gW.abs().max()), float(g_bias.abs().max()))
        else:
            scale = float(gW.abs().max())
        self.grad_scale = scale if scale > 0 else 1.0

    def logits(self, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.addmm(bias, self.X, W.T) if bias is not None else self.X @ W.T

    def fitted_rows(self, model: LogisticModel) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b') of a model for a warm start, restricted to the fitted classes; b' = b + W mean."""
        coef, intercept = model.coef, model.intercept
        if self.classes is not None:
            coef, intercept = coef[self.classes], intercept[self.classes]
        coef = coef.to(device=self.X.device, dtype=self.dtype)
        intercept = intercept.to(device=self.X.device, dtype=self.dtype)
        if not bool(torch.isfinite(intercept).all()):
            intercept = torch.zeros_like(intercept)
        return coef, (intercept + coef @ self.mean) if self.fit_intercept else intercept

    def model_rows(self, W: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(coef, intercept) over every class from the fitted (W, b')."""
        # Softmax ignores a shift shared by every intercept and the penalty does not see intercepts, so the shift
        # is whatever the preconditioner left; report the zero-sum intercepts (what scikit-learn's lbfgs returns).
        intercept = (bias - W @ self.mean) if bias is not None else W.new_zeros(self.k)
        intercept = intercept - intercept.mean()
        if self.classes is None:
            return W, intercept
        coef = W.new_zeros((self.num_classes, self.dim))
        full = W.new_full((self.num_classes,), -math.inf)
        coef[self.classes], full[self.classes] = W, intercept
        return coef, full


def _eigh(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a small symmetric matrix, in float64 on B's device.

    Through numpy's LAPACK: torch's MKL ``eigh`` took 0.1 to 1.7 s for a 384 x 384 matrix on the 2-core CPU when
    other processes shared it (numpy: 15 ms), and a D x D matrix crosses from any device in no time.
    """
    lam, U = np.linalg.eigh(B.detach().double().cpu().numpy())
    return torch.from_numpy(lam).to(B.device), torch.from_numpy(U).to(B.device)


class _Preconditioner:
    """A change of variables for L-BFGS, built from the current predictions; the minimiser is unchanged.

    The data Hessian (1/n) sum_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T is approximated by I_K (x) A + mu I, with
    A = (1 / (K n)) sum_i h_i x_i x_i^T and h_i = 1 - ||p_i||^2 the trace of row i's softmax curvature (uniform
    predictions give A = S (1 - 1/K) / K, S the covariance). With A's eigenvectors U and eigenvalues lam, the
    internal weights ``V = (W U) / scale``, ``scale_j = (lam_j + mu)^-1/2``, and intercepts ``c = b' / e``, ``e =
    mean(h)/K ^ -1/2``, see a Hessian close to the identity. One scale for every class: scaling classes apart
    (by their own curvature) broke the exact null direction of the softmax (a shift shared by all classes) and
    took 10x more iterations on digits. Parameters map in with ``param_in``, gradients with ``grad_in``.
    """

    def __init__(self, problem: _Problem, mu: float, h: torch.Tensor) -> None:
        A = (problem.X * (h / (problem.k * problem.n))[:, None]).T @ problem.X
        lam, U = _eigh(A)
        self.lam = lam.clamp_min(_FLOOR[problem.dtype] * max(float(lam.max()), 1e-300))
        self.U = U.to(problem.dtype)
        self.scale = (self.lam + mu).rsqrt().to(problem.dtype)  # (D,)
        a = max(float(h.mean()) / problem.k, 1e-12)
        self.e = a ** -0.5 if problem.fit_intercept else None
        self.kd = problem.k * problem.dim
        self.k, self.dim = problem.k, problem.dim

    def with_mu(self, mu: float) -> "_Preconditioner":
        """The same curvature for another penalty (the next C of a path): no new eigendecomposition."""
        other = copy.copy(self)
        other.scale = (self.lam + mu).rsqrt().to(self.U.dtype)
        return other

    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v[:self.kd].view(self.k, self.dim), v[self.kd:]

    def _join(self, V: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([V.reshape(-1), c]) if c is not None else V.reshape(-1).clone()

    def param_in(self, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._join((W @ self.U) / self.scale, bias / self.e if self.e is not None else None)

    def param_out(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        V, c = self._split(theta)
        return (V * self.scale) @ self.U.T, (c * self.e if self.e is not None else None)

    def grad_in(self, gW: torch.Tensor, g_bias: torch.Tensor | None) -> torch.Tensor:
        return self._join((gW @ self.U) * self.scale, g_bias * self.e if self.e is not None else None)

    def grad_out(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gV, gc = self._split(grad)
        return (gV / self.scale) @ self.U.T, (gc / self.e if self.e is not None else None)


def _cubic_min(t0: float, f0: float, g0: float, t1: float, f1: float, g1: float) -> float:
    """Minimiser of the cubic through (t0, f0, g0) and (t1, f1, g1); the midpoint when it has none."""
    d1 = g0 + g1 - 3.0 * (f0 - f1) / (t0 - t1)
    disc = d1 * d1 - g0 * g1
    if disc < 0 or not math.isfinite(disc):
        return 0.5 * (t0 + t1)
    d2 = math.copysign(math.sqrt(disc), t1 - t0)
    denom = g1 - g0 + 2.0 * d2
    if denom == 0:
        return 0.5 * (t0 + t1)
    return t1 - (t1 - t0) * (g1 + d2 - d1) / denom


def _strong_wolfe(phi: Callable[[float], tuple[float, float]], f0: float, g0: float, t: float) -> tuple[float, int]:
    """A step satisfying the strong Wolfe conditions (Nocedal & Wright, algorithms 3.5 and 3.6); 0.0 on failure.

    ``phi(t)`` returns (value, slope) along the search direction and remembers its last evaluation, which the
    caller reads for the accepted step (the last call is always at the returned step). Returns (step, trials).
    """
    t_prev, f_prev, g_prev = 0.0, f0, g0
    trials = 0
    lo = hi = None
    while trials < _MAX_TRIALS:
        f, g = phi(t)
        trials += 1
        if not math.isfinite(f) or f > f0 + _C1 * t * g0 or (trials > 1 and f >= f_prev):
            lo, hi = (t_prev, f_prev, g_prev), (t, f, g)
            break
        if abs(g) <= -_C2 * g0:
            return t, trials
        if g >= 0:
            lo, hi = (t, f, g), (t_prev, f_prev, g_prev)
            break
        # Still descending: extrapolate, by the secant root of the slope when it lies well ahead.
        step = t - g * (t - t_prev) / (g - g_prev) if g != g_prev else 4.0 * t
        t_prev, f_prev, g_prev = t, f, g
        t = min(max(step, 2.0 * t), 50.0 * t)
    else:
        return 0.0, trials
    # Zoom: lo has the lowest value seen with sufficient decrease; the minimiser lies between lo and hi.
    while trials < _MAX_TRIALS:
        (ta, fa, ga), (tb, fb, gb) = lo, hi
        width = abs(tb - ta)
        if width <= 1e-12 * max(abs(ta), abs(tb), 1e-30):
            break
        if math.isfinite(fb):
            t = _cubic_min(ta, fa, ga, tb, fb, gb)
        else:
            t = 0.5 * (ta + tb)
        low, high = min(ta, tb), max(ta, tb)
        if not (low + 0.1 * width <= t <= high - 0.1 * width):
            t = 0.5 * (ta + tb)
        f, g = phi(t)
        trials += 1
        if not math.isfinite(f) or f > f0 + _C1 * t * g0 or f >= fa:
            hi = (t, f, g)
        else:
            if abs(g) <= -_C2 * g0:
                return t, trials
            if g * (tb - ta) >= 0:
                hi = lo
            lo = (t, f, g)
    # No Wolfe point found: take the best point with sufficient decrease, if any (re-evaluated so phi remembers it).
    if lo[0] > 0:
        phi(lo[0])
        return lo[0], trials + 1
    return 0.0, trials


class _State:
    """Where the solver is, in the original coordinates: weights W (K, D), intercepts b' (K,) of the centred
    features (None without intercept), logits Z (n, K), objective f and its gradient (gW, g_bias)."""

    def __init__(self, problem: _Problem, mu: float, W: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.p, self.mu, self.W, self.bias = problem, mu, W, bias

    def recompute(self) -> torch.Tensor:
        """Logits, objective and gradient from scratch; returns each row's curvature 1 - ||p_i||^2 (n,)."""
        self.Z = self.p.logits(self.W, self.bias)
        log_p = torch.log_softmax(self.Z, dim=1)
        self.f = (-float(log_p[self.p.rows, self.p.y].sum(dtype=torch.float64)) / self.p.n
                  + 0.5 * self.mu * float((self.W * self.W).sum(dtype=torch.float64)))
        P = log_p.exp_()
        curvature = 1.0 - (P * P).sum(dim=1)
        self.set_gradient(P)
        return curvature

    def set_gradient(self, P: torch.Tensor) -> None:
        """Gradient from the softmax P at the current point (P is turned into P - onehot in place)."""
        P[self.p.rows, self.p.y] -= 1.0
        self.gW = torch.addmm(self.W, P.T, self.p.X, beta=self.mu, alpha=1.0 / self.p.n)
        self.g_bias = P.sum(dim=0) / self.p.n if self.bias is not None else None

    def grad_rel(self) -> float:
        """max |gradient| w.r.t. the user's (W, b) over its value at zero; dF/dW = gW + g_b' mean^T (b' = b + W
        mean), dF/db = g_b'."""
        if self.g_bias is None:
            return float(self.gW.abs().max()) / self.p.grad_scale
        gW = self.gW + torch.outer(self.g_bias, self.p.mean)
        return max(float(gW.abs().max()), float(self.g_bias.abs().max())) / self.p.grad_scale


def _lbfgs(state: _State, max_iter: int, tol: float, pre: _Preconditioner | None = None) -> dict:
    """Minimise from ``state`` (updated in place); returns a report (iterations, stop reason, the last
    preconditioner, ...). ``pre``: a preconditioner built at this starting point (a warm start's previous fit)."""
    p, mu = state.p, state.mu
    stats = state.recompute()
    refreshes = 0
    if pre is None:
        pre, refreshes = _Preconditioner(p, mu, stats), 1
    else:
        pre = pre.with_mu(mu)
    del stats
    grad = pre.grad_in(state.gW, state.g_bias)
    ftol = 64.0 * torch.finfo(torch.float64).eps  # the objective is accumulated in float64 for either dtype
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    RHO: list[float] = []
    reason, it, evals = "max_iter", 0, 1
    next_refresh = _REFRESH_FIRST if refreshes else _REFRESH_WARM
    gmax = state.grad_rel()
    while True:
        if gmax <= tol:
            reason = "gradient"
            break
        if it >= max_iter:
            break
        # Two-loop recursion: direction = -H grad, in the preconditioned coordinates.
        q = grad.neg()
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(RHO)):
            a = rho * float(torch.dot(s, q))
            alphas.append(a)
            q.add_(y, alpha=-a)
        if S:
            q.mul_(float(torch.dot(S[-1], Y[-1])) / float(torch.dot(Y[-1], Y[-1])))
        for (s, y, rho), a in zip(zip(S, Y, RHO), reversed(alphas)):
            q.add_(s, alpha=a - rho * float(torch.dot(y, q)))
        direction = q
        slope0 = float(torch.dot(grad, direction))
        if not slope0 < 0:  # not a descent direction (round-off): restart from steepest descent
            S, Y, RHO = [], [], []
            direction = grad.neg()
            slope0 = -float(torch.dot(grad, grad))
        Wd, bias_d = pre.param_out(direction)
        Zd = p.logits(Wd, bias_d)
        # phi(t) at (W, b') + t (Wd, bd): logits Z + t Zd (no product), penalty quadratic in t.
        pen_ww = float((state.W * state.W).sum(dtype=torch.float64))
        pen_wd = float((state.W * Wd).sum(dtype=torch.float64))
        pen_dd = float((Wd * Wd).sum(dtype=torch.float64))
        last: dict = {}

        def phi(t: float) -> tuple[float, float]:
            Zt = torch.add(state.Z, Zd, alpha=t)
            lse = torch.logsumexp(Zt, dim=1)
            log_p = Zt.sub_(lse[:, None])
            # Row terms first (cross-entropy -log p_y, and (p - onehot) . Zd), then a float64 sum over rows:
            # no cancellation between large sums, which float32 could not resolve near the minimum.
            ce = -float(log_p[p.rows, p.y].sum(dtype=torch.float64)) / p.n
            P = log_p.exp_()
            dots = (P * Zd).sum(dim=1) - Zd[p.rows, p.y]
            value = ce + 0.5 * mu * (pen_ww + 2 * t * pen_wd + t * t * pen_dd)
            slope = float(dots.sum(dtype=torch.float64)) / p.n + mu * (pen_wd + t * pen_dd)
            last.update(P=P, value=value)
            return value, slope

        # The preconditioned Hessian is close to the identity, so the unit step is the natural first trial.
        step, trials = _strong_wolfe(phi, state.f, slope0, 1.0)
        evals += trials
        if step == 0.0:
            if S:  # a stale curvature memory can give a bad direction: forget it and retry once
                S, Y, RHO = [], [], []
                continue
            reason = "line_search"
            break
        it += 1
        f_old = state.f
        s_vec = direction.mul_(step)
        state.W.add_(Wd, alpha=step)
        if state.bias is not None:
            state.bias.add_(bias_d, alpha=step)
        refresh = it >= next_refresh
        if refresh:  # exact logits (no drift from the in-place updates) and the curvature for a new preconditioner
            last.clear()
            stats = state.recompute()
        else:
            state.Z.add_(Zd, alpha=step)
            state.f = last["value"]
            state.set_gradient(last["P"])
            last.clear()
        del Zd
        new_grad = pre.grad_in(state.gW, state.g_bias)
        y_vec = new_grad - grad
        sy = float(torch.dot(s_vec, y_vec))
        if sy > 1e-10 * float(torch.dot(y_vec, y_vec)):
            S.append(s_vec)
            Y.append(y_vec)
            RHO.append(1.0 / sy)
            if len(S) > _HISTORY:
                S.pop(0), Y.pop(0), RHO.pop(0)
        grad = new_grad
        if refresh:
            # New coordinates; the curvature pairs are carried over (s like parameters, y like gradients).
            new_pre = _Preconditioner(p, mu, stats)
            del stats
            S = [new_pre.param_in(*pre.param_out(s)) for s in S]
            Y = [new_pre.grad_in(*pre.grad_out(y)) for y in Y]
            pre = new_pre
            grad = pre.grad_in(state.gW, state.g_bias)
            refreshes += 1
            next_refresh = min(2 * it, it + _REFRESH_MAX_GAP)
        gmax = state.grad_rel()
        if (f_old - state.f) <= ftol * max(abs(f_old), abs(state.f), 1.0) and gmax > tol:
            reason = "ftol"
            break
    return {"n_iter": it, "stop_reason": reason, "grad_rel": gmax, "objective": state.f, "evals": evals,
            "refreshes": refreshes, "preconditioner": pre}


@contextlib.contextmanager
def _threads_for(problem: _Problem) -> Iterator[None]:
    """One CPU thread for small problems (``_ONE_THREAD_WORK``); the caller's setting otherwise."""
    saved = torch.get_num_threads()
    small = problem.n * problem.dim * problem.k < _ONE_THREAD_WORK
    if problem.X.device.type != "cpu" or not small or saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _fit_one(problem: _Problem, C: float, max_iter: int, tol: float, init: LogisticModel | None,
             pre: _Preconditioner | None = None) -> tuple[LogisticModel, _Preconditioner]:
    """One fit; ``pre``: the previous fit's preconditioner when ``init`` is that fit's solution (a path)."""
    if not (C > 0 and math.isfinite(C)):
        raise UserError(f"logistic regression: C must be a positive finite number; got {C}")
    if init is not None:
        if tuple(init.coef.shape) != (problem.num_classes, problem.dim):
            raise UserError(f"logistic regression: init has coef {tuple(init.coef.shape)}; "
                            f"expected {(problem.num_classes, problem.dim)}")
        W, bias = problem.fitted_rows(init)
        W = W.clone()
        bias = bias.clone() if problem.fit_intercept else None
    else:
        W = problem.X.new_zeros((problem.k, problem.dim))
        bias = problem.X.new_zeros(problem.k) if problem.fit_intercept else None
    with strict_fp32(), _threads_for(problem):
        state = _State(problem, 1.0 / (C * problem.n), W, bias)
        report = _lbfgs(state, max_iter, tol, pre)
    pre = report.pop("preconditioner")
    coef, intercept = problem.model_rows(state.W, state.bias)
    converged = report["stop_reason"] in ("gradient", "ftol")
    if not converged:
        log.warning("logistic regression C=%g stopped (%s) after %d iterations with relative gradient %.2e > tol %.1e",
                    C, report["stop_reason"], report["n_iter"], report["grad_rel"], tol)
    log.debug("logistic regression C=%g: %s", C, report)
    model = LogisticModel(coef=coef, intercept=intercept, C=float(C), fit_intercept=problem.fit_intercept,
                          n_iter=report["n_iter"], converged=converged, stop_reason=report["stop_reason"],
                          grad_rel=report["grad_rel"], objective=report["objective"])
    return model, pre


def _problem(X: torch.Tensor, y: torch.Tensor, num_classes: int | None, fit_intercept: bool,
             dtype: torch.dtype, device: torch.device | str | None) -> _Problem:
    if dtype not in (torch.float32, torch.float64):
        raise UserError(f"logistic regression dtype {dtype}; expected torch.float32 or torch.float64")
    y, num_classes = _check(X, y, num_classes)
    device = torch.device(device) if device is not None else X.device
    return _Problem(X, y, num_classes, fit_intercept, dtype, device)


def fit_logistic(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    C: float = 1.0,
    fit_intercept: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: LogisticModel | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LogisticModel:
    """Multinomial L2 logistic regression, scikit-learn's objective ``C sum CE + ||W||^2 / 2`` (module docstring).

    X (N, D) features, y (N,) labels in [0, num_classes) (default max label + 1). A class without training rows
    gets the weights the penalty leaves it, or, with an intercept (whose minimiser would be -inf), zero weights
    and intercept -inf: it is never predicted. ``tol``: relative gradient (module docstring). ``init``: warm start
    from a fitted model with the same K and D. Runs on ``device`` (default: X's) in ``dtype``.
    """
    return _fit_one(_problem(X, y, num_classes, fit_intercept, dtype, device), C, max_iter, tol, init)[0]


def fit_path(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None,
    Cs: Sequence[float],
    fit_intercept: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    sort: bool = True,
    warm_start: bool = True,
) -> list[LogisticModel]:
    """One model per C (returned in the order of ``Cs``), each warm-started from the previous fit.

    ``sort=True`` fits from the smallest C (strongest penalty) to the largest: a strongly penalised problem is well
    conditioned and cheap, and each solution is a good start for the next, weaker penalty, so the whole path costs
    little more than its last fit. ``sort=False`` follows the given order (e.g. scikit-learn's warm-start chain in
    ``sslt``). ``warm_start=False`` starts every C from zero (results independent of the order). The data's
    centred features are shared by all C, and a warm start also takes over the previous fit's preconditioner
    (its eigendecomposition, rescaled for the new penalty): on Aircraft-sized features (5.3k x 768, 100 classes)
    the D x D curvature and its eigh were most of the time of the short fits that most of a path is made of.
    Converged solutions do not depend on the start beyond ``tol``.
    """
    Cs = [float(c) for c in Cs]
    if not Cs:
        raise UserError("logistic regression path: no C values given")
    problem = _problem(X, y, num_classes, fit_intercept, dtype, device)
    order = sorted(range(len(Cs)), key=lambda i: Cs[i]) if sort else list(range(len(Cs)))
    models: list[LogisticModel | None] = [None] * len(Cs)
    previous: LogisticModel | None = None
    pre: _Preconditioner | None = None
    for i in order:
        if warm_start:
            models[i], pre = _fit_one(problem, Cs[i], max_iter, tol, previous, pre)
        else:
            models[i] = _fit_one(problem, Cs[i], max_iter, tol, None)[0]
        previous = models[i]
    return models  # type: ignore[return-value]

"""The shared logistic-regression solver (ssl_bench/logreg.py): parity with scikit-learn, paths, warm starts, modes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from ssl_bench.errors import UserError
from ssl_bench.logreg import LogisticModel, fit_logistic, fit_path

# The transfer grid spans C = 1e-5 ... 1e6 (protocols.md §5.3); these cover it in steps of 100.
CS = (1e-5, 1e-3, 1e-1, 1e1, 1e3, 1e6)


@pytest.fixture(scope="module")
def digits():
    """Digits pixels through a fixed random projection to 16 dims: real data, 10 classes, not linearly separable, so
    the minimiser stays finite as C grows and both solvers can reach it. Half held out (899 rows: 0.2 points of
    accuracy is less than 2 images)."""
    X, y = load_digits(return_X_y=True)
    X = X @ np.random.default_rng(0).standard_normal((64, 16)) / 8
    return train_test_split(X, y, test_size=0.5, random_state=0, stratify=y)


def objective(X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """scikit-learn's objective divided by C n: mean cross-entropy + ||W||^2 / (2 C n)."""
    Z = X @ coef.T + intercept
    n = len(y)
    return float((logsumexp(Z, axis=1) - Z[np.arange(n), y]).mean() + 0.5 / (C * n) * (coef ** 2).sum())


def sklearn_fit(X: np.ndarray, y: np.ndarray, C: float, fit_intercept: bool = True) -> LogisticRegression:
    # One BLAS thread: with torch's OpenMP threads loaded in the same process, scipy's threaded BLAS made these tiny
    # fits 30x slower. ConvergenceWarning: at large C it stops on its ftol, short of the minimum (see the test).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, tol=1e-10, max_iter=10000, fit_intercept=fit_intercept).fit(X, y)


@pytest.mark.parametrize("C", CS)
def test_parity_with_sklearn_lbfgs(digits, C):
    Xtr, Xte, ytr, yte = digits
    reference = sklearn_fit(Xtr, ytr, C)
    model = fit_logistic(torch.from_numpy(Xtr), torch.from_numpy(ytr), 10, C=C, tol=1e-10, max_iter=10000)
    assert model.converged and model.coef.dtype == torch.float64
    ours = 100 * model.score(torch.from_numpy(Xte), torch.from_numpy(yte))
    assert ours == pytest.approx(100 * reference.score(Xte, yte), abs=0.2)
    # Same objective, minimised at least as far as scikit-learn gets.
    f_ours = objective(Xtr, ytr, model.coef.numpy(), model.intercept.numpy(), C)
    f_ref = objective(Xtr, ytr, reference.coef_, reference.intercept_, C)
    assert f_ours <= f_ref + 1e-12 * abs(f_ref)
    assert model.objective == pytest.approx(f_ours, rel=1e-10)
    # Coefficients: where scikit-learn converges tightly, the solutions coincide; beyond (C >= 1e3 its lbfgs stops
    # on its ftol in flat directions, at a higher objective) they still agree to a few percent.
    scale = np.abs(reference.coef_).max()
    tolerance = 1e-3 if C <= 10 else 0.1
    np.testing.assert_allclose(model.coef.numpy(), reference.coef_, atol=tolerance * scale, rtol=0)
    np.testing.assert_allclose(model.intercept.numpy(), reference.intercept_, atol=tolerance * max(1.0, scale), rtol=0)
    if C <= 10:
        probs = model.predict_proba(torch.from_numpy(Xte)).numpy()
        np.testing.assert_allclose(probs, reference.predict_proba(Xte), atol=1e-4)


def test_no_intercept_matches_sklearn(digits):
    Xtr, Xte, ytr, yte = digits
    for C in (1e-3, 1.0):
        reference = sklearn_fit(Xtr, ytr, C, fit_intercept=False)
        model = fit_logistic(torch.from_numpy(Xtr), torch.from_numpy(ytr), 10, C=C, fit_intercept=False, tol=1e-10)
        assert not model.fit_intercept and bool((model.intercept == 0).all())
        scale = np.abs(reference.coef_).max()
        np.testing.assert_allclose(model.coef.numpy(), reference.coef_, atol=1e-4 * scale, rtol=0)
        assert 100 * model.score(torch.from_numpy(Xte), torch.from_numpy(yte)) == pytest.approx(
            100 * reference.score(Xte, yte), abs=0.2)


def test_path_equals_independent_fits_in_any_order(digits):
    Xtr, _, ytr, _ = digits
    X, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    Cs = [100.0, 1e-2, 1.0]  # unsorted on purpose: results come back in this order
    for kwargs in ({}, {"sort": False}, {"warm_start": False}):
        path = fit_path(X, y, 10, Cs, tol=1e-10, **kwargs)
        assert [m.C for m in path] == Cs
        for C, model in zip(Cs, path):
            alone = fit_logistic(X, y, 10, C=C, tol=1e-10)
            scale = float(alone.coef.abs().max())
            torch.testing.assert_close(model.coef, alone.coef, atol=1e-4 * scale, rtol=0)
            assert torch.equal(model.predict(X), alone.predict(X))


def test_warm_start_from_the_solution_needs_no_work(digits):
    Xtr, _, ytr, _ = digits
    X, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    model = fit_logistic(X, y, C=1.0, tol=1e-8)
    again = fit_logistic(X, y, C=1.0, tol=1e-8, init=model)
    assert again.n_iter <= 2
    torch.testing.assert_close(again.coef, model.coef, atol=1e-6 * float(model.coef.abs().max()), rtol=0)
    with pytest.raises(UserError, match="init has coef"):
        fit_logistic(X[:, :8], y, C=1.0, init=model)


def test_float32_agrees_with_float64(digits):
    Xtr, Xte, ytr, yte = digits
    X = torch.from_numpy(Xtr).float()
    m64 = fit_logistic(X, torch.from_numpy(ytr), C=1.0, tol=1e-8)
    m32 = fit_logistic(X, torch.from_numpy(ytr), C=1.0, tol=1e-4, dtype=torch.float32)
    assert m32.coef.dtype == torch.float32 and m32.grad_rel < 1e-3
    test = torch.from_numpy(Xte).float()
    labels = torch.from_numpy(yte)
    assert 100 * m32.score(test, labels) == pytest.approx(100 * m64.score(test, labels), abs=0.2)
    torch.testing.assert_close(m32.coef.double(), m64.coef, atol=1e-2 * float(m64.coef.abs().max()), rtol=0)


def test_class_without_rows():
    # Three well-separated 2-D blobs labelled 0, 1, 3; num_classes = 4 leaves class 2 empty.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [-3.0, -3.0]])
    y = torch.tensor([0, 1, 3]).repeat_interleave(20)
    X = centres[y] + 0.5 * torch.randn(len(y), 2, generator=g, dtype=torch.float64)
    with_b = fit_logistic(X, y, 4, C=1.0, tol=1e-9)
    assert with_b.intercept[2] == -np.inf and bool((with_b.coef[2] == 0).all())
    assert 2 not in with_b.predict(X).tolist() and with_b.score(X, y) == 1.0
    assert float(with_b.predict_proba(X)[:, 2].max()) == 0.0
    # The other classes solve the 3-class problem (labels 0, 1, 2 for 0, 1, 3).
    three = fit_logistic(X, torch.where(y == 3, 2, y), 3, C=1.0, tol=1e-9)
    torch.testing.assert_close(with_b.coef[[0, 1, 3]], three.coef, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_b.intercept[[0, 1, 3]], three.intercept, atol=1e-6, rtol=0)
    # Without intercept the penalty keeps every weight finite; the empty class is pushed away from the data.
    no_b = fit_logistic(X, y, 4, C=1.0, fit_intercept=False, tol=1e-9)
    assert bool(torch.isfinite(no_b.coef).all()) and 2 not in no_b.predict(X).tolist()


def test_model_outputs():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    model = LogisticModel(coef=torch.eye(3, 2, dtype=torch.float64),
                          intercept=torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64), C=1.0, fit_intercept=True,
                          n_iter=0, converged=True, stop_reason="gradient", grad_rel=0.0, objective=0.0)
    # logits: row 0 (1, 0, 0.5) -> 0; row 1 (0, 1, 0.5) -> 1; row 2 (-1, 0, 0.5) -> 2
    torch.testing.assert_close(model.decision_function(X), torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5],
                                                                         [-1.0, 0.0, 0.5]], dtype=torch.float64))
    assert model.predict(X).tolist() == [0, 1, 2]
    torch.testing.assert_close(model.predict_proba(X).sum(1), torch.ones(3, dtype=torch.float64))
    assert model.score(X, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert model.predict(X[:0]).shape == (0,)


@pytest.mark.parametrize(
    "X, y, kwargs, message",
    [
        (torch.ones(4), torch.zeros(4, dtype=torch.long), {}, "2-D features"),
        (torch.ones(4, 2), torch.zeros(3, dtype=torch.long), {}, "one entry per row"),
        (torch.ones(4, 2), torch.zeros(4), {}, "integer class indices"),
        (torch.ones(4, 2), torch.tensor([0, 1, 2, 5]), {"num_classes": 3}, r"labels must lie in \[0, 3\)"),
        (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), {}, "NaN or inf"),
        (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), {"C": 0.0}, "C must be a positive"),
        (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), {"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_inputs(X, y, kwargs, message):
    with pytest.raises(UserError, match=message):
        fit_logistic(X, y, **kwargs)

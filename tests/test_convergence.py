"""The one stop rule: converged exactly when max |∇J| <= tol, for every solver and the grid."""

import math

import numpy as np
import pytest

from lr_kernel import StopRule, fit, fit_many, gradient_max, loss_and_gradients

SOLVERS = ["gd", "nesterov", "lbfgs"]


def one_indicator_problem(m=400, seed=0):
    """One 0/1 feature: with l2 = 0 the optimum is known in closed form.

    ``b* = logit(p0)`` and ``w* = logit(p1) - logit(p0)``, with ``p0``, ``p1`` the
    share of positives among the rows with ``x = 0`` and ``x = 1``.
    """
    rng = np.random.default_rng(seed)
    x = (rng.random(m) < 0.4).astype(np.float64)
    y = (rng.random(m) < np.where(x == 1, 0.7, 0.25)).astype(np.float64)
    p0, p1 = y[x == 0].mean(), y[x == 1].mean()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    return x.reshape(1, m), y.reshape(1, m), logit(p1) - logit(p0), logit(p0)


@pytest.mark.parametrize("optimizer", SOLVERS)
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_each_solver_stops_at_the_first_point_within_tol(optimizer, tol):
    X, Y, w_star, b_star = one_indicator_problem()
    result = fit(X, Y, learning_rate=2.0, iterations=100_000, tol=tol, optimizer=optimizer)
    assert result.stop_reason == "tolerance" and result.converged
    norms = result.gradient_norm_history
    assert norms[-1] <= tol and np.all(norms[:-1] > tol)
    # The history's number is the rule's: max |∇J| at the returned parameters.
    _, dw, db = loss_and_gradients(X, Y, result.w, result.b)
    assert gradient_max(dw, db) == pytest.approx(norms[-1], rel=1e-12)
    # Near the optimum, the error is H⁻¹ ∇J: within tol / λ_min(H) of the known optimum.
    a = 1 / (1 + np.exp(-(w_star * X + b_star)))  # (1, m)
    d = (a * (1 - a)).ravel()
    H = np.array([[d @ X[0] ** 2, d @ X[0]], [d @ X[0], d.sum()]]) / X.shape[1]
    bound = 2 * math.sqrt(2) * tol / np.linalg.eigvalsh(H)[0]
    assert abs(result.w[0, 0] - w_star) <= bound
    assert abs(result.b - b_star) <= bound


@pytest.mark.parametrize("optimizer", SOLVERS)
def test_the_cap_is_not_convergence(optimizer):
    X, Y, _, _ = one_indicator_problem(seed=1)
    result = fit(X, Y, learning_rate=0.1, iterations=2, tol=1e-8, optimizer=optimizer)
    assert (result.stop_reason, result.converged, result.n_iterations) == ("iterations", False, 2)
    assert result.gradient_norm_history[-1] > 1e-8


@pytest.mark.parametrize("optimizer", SOLVERS)
def test_a_start_within_tol_takes_no_step(optimizer):
    X, Y, w_star, b_star = one_indicator_problem(seed=2)
    start = np.array([[w_star]])  # the exact optimum: its gradient is rounding
    result = fit(
        X, Y, learning_rate=2.0, iterations=50, tol=1e-6, optimizer=optimizer, w0=start,
        b0=b_star,
    )  # fmt: skip
    assert (result.stop_reason, result.n_iterations) == ("tolerance", 0)


def test_tol_zero_never_converges():
    X, Y, _, _ = one_indicator_problem(seed=3)
    result = fit(X, Y, learning_rate=2.0, iterations=30, tol=0.0)
    assert result.stop_reason == "iterations" and not result.converged


def test_lbfgs_below_rounding_says_stalled_not_converged():
    X, Y, _, _ = one_indicator_problem(seed=4)
    result = fit(X, Y, iterations=10_000, tol=1e-300, optimizer="lbfgs")
    assert result.stop_reason == "stalled" and not result.converged
    assert result.n_iterations < 10_000
    assert result.gradient_norm_history[-1] > 1e-300


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_grid_candidates_stop_by_the_same_rule(optimizer):
    X, Y, _, _ = one_indicator_problem(seed=5)
    grid = fit_many(
        X, Y, learning_rate=[0.5, 2.0], l2=[0.0, 3.0], iterations=100_000, tol=1e-7,
        optimizer=optimizer,
    )  # fmt: skip
    assert grid.stop_reason == ("tolerance",) * 4
    for k in range(4):
        norms = grid.gradient_norm_history[k]
        assert norms[-1] <= 1e-7 and np.all(norms[:-1] > 1e-7)
        alone = fit(
            X, Y, learning_rate=float(grid.learning_rate[k]), l2=float(grid.l2[k]),
            iterations=100_000, tol=1e-7, optimizer=optimizer,
        )  # fmt: skip
        assert alone.n_iterations == grid.n_iterations[k]


def test_stop_rule_reasons():
    dtype = np.dtype(np.float64)
    rule = StopRule(1e-6, dtype, initial_cost=0.7)
    small, large = np.full((2, 1), 1e-7), np.array([[1e-7], [-2e-6]])
    assert rule.check(0.6, 0.7, small, 5e-7) == "tolerance"
    assert rule.check(0.6, 0.7, large, 0.0) is None
    assert rule.check(0.6, 0.7, small, -2e-6) is None  # the intercept counts too
    assert rule.check(math.nan, 0.7, small, 0.0) == "diverged"
    assert rule.check(0.5, 0.7, np.array([[math.inf]]), 0.0) == "diverged"
    assert rule.check(0.8, 0.6, large, 0.0) == "diverged"  # above the initial cost
    assert rule.check(0.8, 0.6, large, 0.0, monotone=True) is None
    rising = StopRule(1e-6, dtype, initial_cost=1.0)
    reasons = [rising.check(c, c - 0.01, large, 0.0) for c in (0.5, 0.6, 0.7)]
    assert reasons == [None, None, "diverged"]  # three rises in a row
    assert not StopRule(0.0, dtype, 0.7).converged(np.zeros((2, 1)), 0.0)
    with pytest.raises(ValueError, match="tol"):
        StopRule(-1.0, dtype, 0.7)

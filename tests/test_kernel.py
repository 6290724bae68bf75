"""The kernel against closed forms, finite differences, the loop oracles and its stop rules."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_kernel import FitResult, fit, loss_and_gradients, predict_proba, sigmoid
from lr_kernel.reference import loss_and_gradients_double_loop, loss_and_gradients_loop


def make_problem(n=5, m=200, seed=0, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    X = np.ascontiguousarray(rng.normal(size=(n, m)) * scale, dtype=dtype)
    w_true = rng.normal(size=(n, 1))
    p = 1 / (1 + np.exp(-(w_true.T @ X + 0.3)))
    Y = (rng.random((1, m)) < p).astype(dtype)
    X.flags.writeable = False  # the kernel must never write X
    return X, Y


def test_cost_at_zero_is_log_2():
    X, Y = make_problem()
    cost, dw, db = loss_and_gradients(X, Y, np.zeros((5, 1)), 0.0)
    assert cost == pytest.approx(math.log(2), rel=1e-15)
    # At w = 0 every A is 1/2, so the gradients have closed forms too.
    np.testing.assert_allclose(dw, X @ (0.5 - Y).T / X.shape[1], rtol=1e-12)
    assert db == pytest.approx(float(np.mean(0.5 - Y)), rel=1e-12)


@pytest.mark.parametrize("l2", [0.0, 0.7])
@pytest.mark.parametrize("oracle", [loss_and_gradients_loop, loss_and_gradients_double_loop])
def test_vectorized_equals_loops(oracle, l2):
    X, Y = make_problem(n=4, m=60, seed=1)
    w = np.random.default_rng(2).normal(size=(4, 1))
    cost, dw, db = loss_and_gradients(X, Y, w, -0.4, l2)
    ref_cost, ref_dw, ref_db = oracle(X, Y, w, -0.4, l2)
    assert cost == pytest.approx(ref_cost, rel=1e-12)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12)
    assert db == pytest.approx(ref_db, rel=1e-12)


@pytest.mark.parametrize("l2", [0.0, 2.5])
def test_gradients_match_finite_differences(l2):
    X, Y = make_problem(n=6, m=80, seed=3)
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 1))
    b = 0.2
    _, dw, db = loss_and_gradients(X, Y, w, b, l2)
    h = 1e-6
    for j in range(6):
        step = np.zeros_like(w)
        step[j] = h
        plus = loss_and_gradients(X, Y, w + step, b, l2)[0]
        minus = loss_and_gradients(X, Y, w - step, b, l2)[0]
        assert dw[j, 0] == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-9)
    plus = loss_and_gradients(X, Y, w, b + h, l2)[0]
    minus = loss_and_gradients(X, Y, w, b - h, l2)[0]
    assert db == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-9)


def test_extreme_scores_neither_overflow_nor_take_log_zero():
    X = np.array([[1000.0, -1000.0, 1000.0, -1000.0]])
    Y = np.array([[1.0, 0.0, 0.0, 1.0]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        cost, dw, db = loss_and_gradients(X, Y, np.ones((1, 1)), 0.0)
    # Two examples right with certainty (loss 0), two wrong by z = 1000 (loss 1000).
    assert cost == pytest.approx(500.0, rel=1e-15)
    assert np.all(np.isfinite(dw)) and math.isfinite(db)
    A = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(A, [0.0, 0.5, 1.0])


def test_predict_proba_is_sigmoid_of_scores():
    X, _ = make_problem(n=3, m=10)
    w = np.array([[0.5], [-1.0], [2.0]])
    np.testing.assert_allclose(predict_proba(X, w, 0.1), 1 / (1 + np.exp(-(w.T @ X + 0.1))))


def test_fit_cost_never_rises_and_reaches_the_optimum_condition():
    X, Y = make_problem(n=5, m=500, seed=5)
    result = fit(X, Y, learning_rate=2.0, iterations=5000)
    assert isinstance(result, FitResult)
    assert result.w.shape == (5, 1) and isinstance(result.b, float)
    assert result.cost_history.shape == (result.n_iterations + 1,)
    assert np.all(np.diff(result.cost_history) <= 1e-15)
    assert result.cost_history[0] == pytest.approx(math.log(2))
    # Unpenalized optimum with an intercept: predicted and observed positives agree.
    A = predict_proba(X, result.w, result.b)
    assert float(A.sum()) == pytest.approx(float(Y.sum()), abs=1e-9)
    assert result.gradient_norm_history[-1] < 1e-12


def test_fit_stop_reasons():
    X, Y = make_problem(n=5, m=300, seed=6)
    by_count = fit(X, Y, learning_rate=0.1, iterations=7)
    assert (by_count.stop_reason, by_count.n_iterations, by_count.converged) == (
        "iterations",
        7,
        False,
    )
    by_tol = fit(X, Y, learning_rate=0.5, iterations=100_000, tol=1e-9)
    assert by_tol.stop_reason == "tolerance" and by_tol.converged
    assert by_tol.n_iterations < 100_000
    assert abs(by_tol.cost_history[-1] - by_tol.cost_history[-2]) < 1e-9


def test_fit_reports_divergence_instead_of_garbage():
    # Labels independent of large features: no separation, and a step far past 2/L.
    rng = np.random.default_rng(7)
    X = rng.normal(size=(5, 1000)) * 30
    Y = (rng.random((1, 1000)) < 0.5).astype(np.float64)
    for learning_rate in (0.01, 1.0, 1e4):
        result = fit(X, Y, learning_rate=learning_rate, iterations=500)
        assert result.stop_reason == "diverged"
        assert not result.converged
        assert result.n_iterations < 10
    stable = fit(X, Y, learning_rate=1e-3, iterations=500)
    assert stable.stop_reason == "iterations"


def test_fit_is_deterministic_and_leaves_inputs_alone():
    X, Y = make_problem(seed=8)
    w0 = np.full((5, 1), 0.1)
    first = fit(X, Y, learning_rate=0.3, iterations=50, w0=w0, b0=0.5)
    second = fit(X, Y, learning_rate=0.3, iterations=50, w0=w0, b0=0.5)
    np.testing.assert_array_equal(first.w, second.w)
    np.testing.assert_array_equal(first.cost_history, second.cost_history)
    np.testing.assert_array_equal(w0, 0.1)


def test_fit_float32_agrees_with_float64():
    X, Y = make_problem(n=5, m=400, seed=9)
    r64 = fit(X, Y, learning_rate=0.5, iterations=200)
    r32 = fit(X.astype(np.float32), Y.astype(np.float32), learning_rate=0.5, iterations=200)
    assert r32.w.dtype == np.float32
    np.testing.assert_allclose(r32.w, r64.w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r32.cost_history, r64.cost_history, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0.0, "iterations": 1}, "learning_rate"),
        ({"learning_rate": 0.1, "iterations": 0}, "iterations"),
        ({"learning_rate": 0.1, "iterations": 1, "l2": -1.0}, "l2"),
        ({"learning_rate": 0.1, "iterations": 1, "w0": np.zeros((2, 1))}, "w0"),
    ],
)
def test_fit_rejects_bad_parameters(kwargs, message):
    X, Y = make_problem()
    with pytest.raises(ValueError, match=message):
        fit(X, Y, **kwargs)


def test_fit_matches_scikit_learn_on_a_real_dataset():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    features = StandardScaler().fit_transform(data.data)  # (m, n)
    X = np.ascontiguousarray(features.T)
    Y = data.target.reshape(1, -1).astype(np.float64)
    l2 = 1.0
    result = fit(X, Y, learning_rate=1.0, iterations=200_000, l2=l2, tol=1e-15)
    assert sklearn is not None
    oracle = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10_000).fit(features, data.target)
    ours = predict_proba(X, result.w, result.b).ravel()
    np.testing.assert_allclose(ours, oracle.predict_proba(features)[:, 1], atol=1e-4)
    np.testing.assert_allclose(result.w.ravel(), oracle.coef_.ravel(), atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    m=st.integers(1, 50),
    l2=st.floats(0, 10),
)
def test_a_small_step_lowers_the_cost(seed, n, m, l2):
    X, Y = make_problem(n=n, m=m, seed=seed)
    w = np.random.default_rng(seed).normal(size=(n, 1))
    cost, dw, db = loss_and_gradients(X, Y, w, 0.1, l2)
    grad_sq = float(np.sum(dw**2)) + db**2
    # The log-loss has curvature at most (||x||² + 1)/4 per example, so 1/L is safe.
    lipschitz = (float(np.sum(X**2, axis=0).max()) + 1) / 4 + l2 / m
    step = 1 / lipschitz
    new_cost = loss_and_gradients(X, Y, w - step * dw, 0.1 - step * db, l2)[0]
    assert new_cost <= cost - 0.5 * step * grad_sq + 1e-12

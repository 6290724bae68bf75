"""The fused blocked kernel against the naive formula, and the solvers built on it."""

import math
import pickle
import tracemalloc

import numpy as np
import pytest

from lr_kernel import OPTIMIZERS, FusedLoss, fit, loss_and_gradients, loss_and_gradients_naive
from tests.test_kernel import make_problem

# Both ways of summing the blocks: NumPy calls, and the compiled loop.
ENGINES = ["numpy", "numba"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("l2", [0.0, 0.7])
@pytest.mark.parametrize(
    ("m", "block_size"),
    [(1, None), (1, 1), (7, 3), (1000, 256), (1000, 1000), (999, 4096), (5000, None)],
)
def test_fused_equals_naive_across_block_boundaries(m, block_size, l2, engine):
    X, Y = make_problem(n=6, m=m, seed=m)
    w = np.random.default_rng(1).normal(size=(6, 1))
    loss = FusedLoss(X, Y, block_size=block_size, engine=engine)
    assert loss.engine == engine
    cost, dw, db = loss(w, -0.4, l2)
    ref_cost, ref_dw, ref_db = loss_and_gradients_naive(X, Y, w, -0.4, l2)
    assert cost == pytest.approx(ref_cost, rel=1e-12)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12, atol=1e-15)
    assert db == pytest.approx(ref_db, rel=1e-12, abs=1e-15)
    assert dw.shape == (6, 1) and dw.dtype == np.float64


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_float32_equals_naive_in_float64(engine):
    X, Y = make_problem(n=8, m=3001, seed=2, dtype=np.float32)
    w = np.random.default_rng(3).normal(size=(8, 1)).astype(np.float32)
    cost, dw, db = FusedLoss(X, Y, block_size=1000, engine=engine)(w, 0.2, 1.5)
    ref_cost, ref_dw, ref_db = loss_and_gradients_naive(
        X.astype(np.float64), Y.astype(np.float64), w.astype(np.float64), 0.2, 1.5
    )
    assert dw.dtype == np.float32
    # float32 elementwise work: relative error a few float32 ulps.
    assert cost == pytest.approx(ref_cost, rel=1e-6)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-6)
    assert db == pytest.approx(ref_db, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_scores_in_blocks_match_the_exact_loss(dtype, engine):
    # Scores up to ±5000 cross the exp cap in some blocks and not in others.
    rng = np.random.default_rng(4)
    X = (rng.choice([-1.0, 1.0], size=(2, 50)) * rng.uniform(0, 2500, size=(2, 50))).astype(dtype)
    Y = (rng.random((1, 50)) < 0.5).astype(dtype)
    w = np.ones((2, 1), dtype=dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        cost, dw, db = FusedLoss(X, Y, block_size=7, engine=engine)(w, 0.0)
    Z = (w.T @ X).astype(np.float64).ravel()
    exact = np.mean(np.logaddexp(0.0, Z) - Y.ravel() * Z)
    assert cost == pytest.approx(exact, rel=1e-6 if dtype == np.float32 else 1e-12)
    assert np.all(np.isfinite(dw)) and math.isfinite(db)


@pytest.mark.parametrize("engine", ENGINES)
def test_threads_agree_with_one_thread_and_are_bitwise_reproducible(engine):
    X, Y = make_problem(n=4, m=10_001, seed=5)
    w = np.random.default_rng(6).normal(size=(4, 1))
    one = FusedLoss(X, Y, block_size=1000, engine=engine)(w, 0.3, 0.5)
    threaded = FusedLoss(X, Y, block_size=1000, n_threads=3, engine=engine)
    first, second = threaded(w, 0.3, 0.5), threaded(w, 0.3, 0.5)
    assert first[0] == second[0] and first[2] == second[2]
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0] == pytest.approx(one[0], rel=1e-13)
    np.testing.assert_allclose(first[1], one[1], rtol=1e-12)
    fits = [
        fit(X, Y, learning_rate=1.0, iterations=20, n_threads=2, block_size=1000, engine=engine)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(fits[0].w, fits[1].w)
    np.testing.assert_array_equal(fits[0].cost_history, fits[1].cost_history)


def test_gd_follows_the_naive_formula_update_by_update():
    X, Y = make_problem(n=5, m=700, seed=7)
    result = fit(X, Y, learning_rate=0.8, iterations=30, l2=0.3, block_size=128)
    w, b = np.zeros((5, 1)), 0.0
    costs = []
    for _ in range(31):
        cost, dw, db = loss_and_gradients_naive(X, Y, w, b, 0.3)
        costs.append(cost)
        w, b = w - 0.8 * dw, b - 0.8 * db
    np.testing.assert_allclose(result.cost_history, costs, rtol=1e-12)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_reaches_scikit_learns_optimum(optimizer):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    features = StandardScaler().fit_transform(data.data)  # (m, n)
    X = np.ascontiguousarray(features.T)
    Y = data.target.reshape(1, -1).astype(np.float64)
    l2 = 1.0
    result = fit(X, Y, learning_rate=1.0, iterations=200_000, l2=l2, tol=1e-9, optimizer=optimizer)
    assert result.stop_reason == "tolerance" and result.converged
    assert result.gradient_norm_history[-1] <= 1e-9
    dw, db = loss_and_gradients(X, Y, result.w, result.b, l2)[1:]
    # The rule's number, to rounding (newton's comes from the Hessian pass).
    assert max(np.abs(dw).max(), abs(db)) == pytest.approx(
        result.gradient_norm_history[-1], rel=1e-4, abs=1e-15
    )
    oracle = LogisticRegression(C=1 / l2, solver="newton-cholesky", tol=1e-12, max_iter=100)
    oracle.fit(features, data.target)
    ours = 1 / (1 + np.exp(-(result.w.T @ X + result.b))).ravel()
    np.testing.assert_allclose(ours, oracle.predict_proba(features)[:, 1], atol=1e-6)
    cost_at_result = loss_and_gradients(X, Y, result.w, result.b, l2)[0]
    assert result.cost_history[-1] == pytest.approx(cost_at_result, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["nesterov", "lbfgs"])
def test_fast_optimizers_stop_reasons_and_history(optimizer):
    X, Y = make_problem(n=5, m=300, seed=6)
    seen = []
    by_count = fit(
        X,
        Y,
        learning_rate=0.1,
        iterations=3,
        optimizer=optimizer,
        callback=lambda i, c: seen.append((i, c)),
    )
    assert (by_count.stop_reason, by_count.n_iterations, by_count.converged) == (
        "iterations",
        3,
        False,
    )
    assert by_count.cost_history.shape == by_count.gradient_norm_history.shape == (4,)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_array_equal([c for _, c in seen], by_count.cost_history)
    by_tol = fit(X, Y, learning_rate=0.5, iterations=100_000, tol=1e-9, optimizer=optimizer)
    assert by_tol.stop_reason == "tolerance" and by_tol.converged
    assert by_tol.cost_history[-1] < by_tol.cost_history[0]


def test_nesterov_reports_divergence_and_restarts_when_stable():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(5, 1000)) * 30
    Y = (rng.random((1, 1000)) < 0.5).astype(np.float64)
    for learning_rate in (0.01, 1.0, 1e4):
        result = fit(X, Y, learning_rate=learning_rate, iterations=500, optimizer="nesterov")
        assert result.stop_reason == "diverged" and not result.converged
        assert result.n_iterations < 20
    stable = fit(X, Y, learning_rate=1e-3, iterations=500, optimizer="nesterov")
    assert stable.stop_reason == "iterations"
    plain = fit(X, Y, learning_rate=1e-3, iterations=500)
    assert stable.cost_history[-1] <= plain.cost_history[-1]


def test_fit_rejects_unknown_optimizer_and_missing_learning_rate():
    X, Y = make_problem()
    with pytest.raises(ValueError, match="optimizer"):
        fit(X, Y, learning_rate=0.1, iterations=1, optimizer="adam")
    with pytest.raises(ValueError, match="learning_rate"):
        fit(X, Y, iterations=1)
    assert fit(X, Y, iterations=2, optimizer="lbfgs").n_iterations <= 2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_iterations_allocate_nothing_of_size_m(optimizer, engine):
    n, m = 2, 400_000
    X, Y = make_problem(n=n, m=m, seed=8)
    fit(X, Y, learning_rate=1.0, iterations=2, optimizer=optimizer, engine=engine)  # warm caches
    tracemalloc.start()
    try:
        fit(X, Y, learning_rate=1.0, iterations=25, tol=0.0, optimizer=optimizer, engine=engine)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Scratch is three vectors of one block (32768 examples here): O(block).
    # One (1, m) temporary alone would be m * 8 = 3.2 MB; the naive formula makes five.
    assert peak < m * X.itemsize / 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_worker_threads_error_is_raised_to_the_caller(engine, monkeypatch):
    X, Y = make_problem(n=3, m=4_000, seed=9)
    loss = FusedLoss(X, Y, block_size=500, n_threads=4, engine=engine)
    w = np.zeros((3, 1))
    expected = loss(w, 0.0)
    original = loss._sum_blocks

    def failing(share, *args):
        if share == 2:
            raise MemoryError("share 2 failed")
        return original(share, *args)

    monkeypatch.setattr(loss, "_sum_blocks", failing)
    with pytest.raises(MemoryError, match="share 2 failed"):
        loss(w, 0.0)
    monkeypatch.undo()
    assert loss(w, 0.0)[0] == expected[0]  # the threads are still there and well


def test_a_threaded_loss_pickles_and_its_copy_gives_the_same_bits():
    X, Y = make_problem(n=3, m=4_000, seed=10)
    loss = FusedLoss(X, Y, block_size=500, n_threads=3)
    w = np.full((3, 1), 0.2)
    before = loss(w, 0.1)  # starts its threads
    copy = pickle.loads(pickle.dumps(loss))
    after = copy(w, 0.1)
    assert after[0] == before[0] and after[2] == before[2]
    np.testing.assert_array_equal(after[1], before[1])

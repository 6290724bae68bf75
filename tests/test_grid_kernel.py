"""K models in one pass: FusedLossMany against FusedLoss, fit_many against separate fits."""

import math

import numpy as np
import pytest

import lr_kernel.loss as loss_module
from lr_kernel import (
    FitResult,
    FusedLoss,
    FusedLossMany,
    GridFitResult,
    fit,
    fit_many,
    grid_candidates,
)
from lr_kernel.reference import loss_and_gradients_loop
from tests.test_fast_kernel import make_problem

# The GEMM sums X dZᵀ in another order than the GEMV: parameters agree to
# rounding, far inside the 1e-10.
PARAMETER_ATOL = 1e-10


@pytest.mark.parametrize(
    ("m", "block_size", "n_threads"), [(1, None, 1), (7, 3, 2), (5000, 512, 3)]
)
def test_many_models_equal_one_model_at_a_time(m, block_size, n_threads):
    X, Y = make_problem(n=6, m=m, seed=m)
    rng = np.random.default_rng(2)
    W = rng.normal(size=(6, 4))
    b = np.array([-0.4, 0.0, 0.3, 2.0])
    l2 = np.array([0.0, 0.5, 3.0, 0.0])
    many = FusedLossMany(X, Y, n_models=5, block_size=block_size, n_threads=n_threads)
    cost, dW, db = many(W, b, l2)
    assert cost.shape == (4,) and dW.shape == (6, 4) and db.shape == (4,)
    for k in range(4):
        ref_cost, ref_dw, ref_db = FusedLoss(X, Y)(W[:, k : k + 1], float(b[k]), float(l2[k]))
        assert cost[k] == pytest.approx(ref_cost, rel=1e-12)
        np.testing.assert_allclose(dW[:, k : k + 1], ref_dw, rtol=1e-11, atol=1e-15)
        assert db[k] == pytest.approx(ref_db, rel=1e-11, abs=1e-15)
    # Fewer models than the scratch holds, and bitwise reproducible.
    again = many(W[:, 1:3], b[1:3], l2[1:3])
    np.testing.assert_array_equal(again[1], many(W[:, 1:3], b[1:3], l2[1:3])[1])
    np.testing.assert_allclose(again[1], dW[:, 1:3], rtol=1e-12, atol=1e-15)


def test_many_models_keep_extreme_scores_exact():
    rng = np.random.default_rng(4)
    X = rng.choice([-1.0, 1.0], size=(2, 50)) * rng.uniform(0, 2500, size=(2, 50))
    Y = (rng.random((1, 50)) < 0.5).astype(np.float64)
    W = np.array([[1.0, 0.0], [1.0, 0.001]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        cost, dW, _ = FusedLossMany(X, Y, n_models=2, block_size=7)(W, np.zeros(2), np.zeros(2))
    Z = W.T @ X  # (2, m)
    exact = np.mean(np.logaddexp(0.0, Z) - Y * Z, axis=1)
    np.testing.assert_allclose(cost, exact, rtol=1e-12)
    assert np.all(np.isfinite(dW))


def test_float32_many_models_match_float64_to_float32_rounding():
    X, Y = make_problem(n=8, m=3001, seed=2, dtype=np.float32)
    W = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    cost, dW, db = FusedLossMany(X, Y, n_models=3, block_size=1000)(W, np.full(3, 0.2), np.ones(3))
    assert dW.dtype == np.float32
    for k in range(3):
        ref = FusedLoss(X.astype(np.float64), Y.astype(np.float64))(
            W[:, k : k + 1].astype(np.float64), 0.2, 1.0
        )
        assert cost[k] == pytest.approx(ref[0], rel=1e-6)
        np.testing.assert_allclose(dW[:, k : k + 1], ref[1], rtol=1e-5, atol=1e-6)
        assert db[k] == pytest.approx(ref[2], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "K"), [(3, 1), (9, 2), (6, 4), (17, 5), (13, 8), (30, 9)])
def test_compiled_many_models_equal_the_loop_formula(dtype, weighted, n, K):
    # n around the compiled tiles' 12 and 4 rows, K around a group's 2, 4 or 8 models
    # (9: a second group, padded); blocks of 128 examples (tiles of 24, 8 and
    # 1) and a short last one; two threads.
    m = 700
    X, Y = make_problem(n=n, m=m, seed=n + K, dtype=dtype)
    rng = np.random.default_rng(K)
    W = (rng.normal(size=(n, K)) * 2).astype(dtype)
    b = rng.normal(size=K)
    l2 = rng.uniform(0, 2, size=K)
    weights = rng.uniform(0, 3, size=(1, m)) if weighted else None
    loss = FusedLossMany(
        X, Y, n_models=K + 1, sample_weight=weights, block_size=128, n_threads=2, engine="numba"
    )
    assert loss.engine == "numba"
    cost, dW, db = loss(W, b, l2)
    assert dW.dtype == dtype and dW.shape == (n, K)
    numpy_pass = FusedLossMany(X, Y, n_models=K, sample_weight=weights, engine="numpy")(W, b, l2)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for k in range(K):
        ref_cost, ref_dw, ref_db = loss_and_gradients_loop(
            X.astype(np.float64), Y.astype(np.float64), W[:, k : k + 1].astype(np.float64),
            float(b[k]), float(l2[k]), sample_weight=weights,
        )  # fmt: skip
        assert cost[k] == pytest.approx(ref_cost, rel=rtol)
        np.testing.assert_allclose(dW[:, k : k + 1], ref_dw, rtol=rtol, atol=rtol)
        assert db[k] == pytest.approx(ref_db, rel=rtol, abs=rtol)
    np.testing.assert_allclose(cost, numpy_pass[0], rtol=rtol)
    np.testing.assert_allclose(dW, numpy_pass[1], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(db, numpy_pass[2], rtol=rtol, atol=rtol)
    # Bitwise reproducible from call to call.
    again = loss(W, b, l2)
    for got, first in zip(again, (cost, dW, db), strict=True):
        np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_many_models_keep_extreme_scores_exact(dtype):
    rng = np.random.default_rng(4)
    X = rng.choice([-1.0, 1.0], size=(2, 50)) * rng.uniform(0, 2500, size=(2, 50))
    X = X.astype(dtype)
    Y = (rng.random((1, 50)) < 0.5).astype(dtype)
    W = np.array([[1.0, 0.0, -1.0], [1.0, 0.001, 0.5]], dtype=dtype)
    weights = rng.uniform(0.5, 2, size=(1, 50))
    loss = FusedLossMany(X, Y, n_models=3, block_size=7, engine="numba", sample_weight=weights)
    cost, dW, db = loss(W, np.zeros(3), np.zeros(3))
    Z = W.astype(np.float64).T @ X.astype(np.float64)  # (3, m)
    exact = (np.logaddexp(0.0, Z) - Y * Z) @ weights.T / weights.sum()  # (3, 1)
    np.testing.assert_allclose(cost, exact.ravel(), rtol=1e-12 if dtype == np.float64 else 1e-6)
    assert np.all(np.isfinite(dW)) and np.all(np.isfinite(db))


@pytest.mark.parametrize(("m", "block_size"), [(1000, 64), (1001, 61), (777, 100)])
@pytest.mark.parametrize("K", [5, 8])
def test_float32_groups_of_eight_match_separate_float64_passes(m, block_size, K):
    # A group of 8 float32 lanes (K = 5 padded, K = 8 full) on blocks of odd and
    # even widths, n = 17 around the 12-, 4- and 1-row tiles; some examples'
    # scores reach |Z| ~ 1e3, where exp underflows and dZ is exactly 0 or ±1.
    n = 17
    X, Y = make_problem(n=n, m=m, seed=m + K, dtype=np.float32)
    X = X.copy()
    X[:, ::97] *= 300.0
    rng = np.random.default_rng(K)
    W = rng.normal(size=(n, K)).astype(np.float32)
    b = rng.normal(size=K)
    l2 = rng.uniform(0, 2, size=K)
    loss = FusedLossMany(X, Y, n_models=K, block_size=block_size, n_threads=2, engine="numba")
    assert loss.engine == "numba"
    cost, dW, db = loss(W, b, l2)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    assert np.abs(W.astype(np.float64).T @ X64).max() > 500  # extreme scores present
    for k in range(K):
        ref_cost, ref_dw, ref_db = FusedLoss(X64, Y64)(
            W[:, k : k + 1].astype(np.float64), float(b[k]), float(l2[k])
        )
        assert cost[k] == pytest.approx(ref_cost, rel=1e-5)
        scale = np.abs(ref_dw).max()
        np.testing.assert_allclose(dW[:, k : k + 1], ref_dw, rtol=1e-5, atol=1e-5 * scale)
        assert db[k] == pytest.approx(ref_db, rel=1e-5, abs=1e-5 * scale)


def test_compiled_many_models_take_any_strides():
    X, Y = make_problem(n=7, m=300, seed=8)
    W = np.random.default_rng(9).normal(size=(7, 3))
    ref = FusedLossMany(X, Y, n_models=3, engine="numpy")(W, np.zeros(3), np.zeros(3))
    for strided in (np.asfortranarray(X), np.repeat(X, 2, axis=1)[:, ::2]):
        got = FusedLossMany(strided, Y, n_models=3, block_size=48, engine="numba")(
            W, np.zeros(3), np.zeros(3)
        )
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-11, atol=1e-15)


def test_auto_runs_many_models_compiled_where_one_model_would(monkeypatch):
    X, Y = make_problem(n=4, m=1_000, seed=7)
    monkeypatch.setattr(loss_module, "COMPILED_MIN_ELEMENTS", 4_000)
    assert FusedLossMany(X, Y, n_models=3, n_threads=2).engine == "numba"
    assert FusedLossMany(X, Y, n_models=3, n_threads=1).engine == "numpy"
    assert FusedLossMany(X[:, :999], Y[:, :999], n_models=3, n_threads=2).engine == "numpy"
    assert FusedLossMany(X, Y, n_models=3, n_threads=2, engine="numpy").engine == "numpy"


def test_candidates_are_every_l2_with_every_learning_rate():
    l2, rates = grid_candidates([0.0, 1.0, 10.0], [0.1, 1.0])
    assert l2.tolist() == [0.0, 0.0, 1.0, 1.0, 10.0, 10.0]
    assert rates.tolist() == [0.1, 1.0, 0.1, 1.0, 0.1, 1.0]
    l2, rates = grid_candidates(0.5, None)
    assert l2.tolist() == [0.5] and math.isnan(rates[0])


def _assert_equals_single_fits(grid, X, Y, **kwargs):
    assert isinstance(grid, GridFitResult)
    for k in range(len(grid)):
        single = fit(
            X, Y, learning_rate=float(grid.learning_rate[k]), l2=float(grid.l2[k]), **kwargs
        )
        assert grid.stop_reason[k] == single.stop_reason
        assert grid.n_iterations[k] == single.n_iterations
        np.testing.assert_allclose(grid.w[:, k : k + 1], single.w, rtol=0, atol=PARAMETER_ATOL)
        assert grid.b[k] == pytest.approx(single.b, rel=0, abs=PARAMETER_ATOL)
        np.testing.assert_allclose(grid.cost_history[k], single.cost_history, rtol=1e-12)
        as_single = grid.candidate(k)
        assert isinstance(as_single, FitResult) and as_single.w.shape == single.w.shape


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_each_candidate_equals_its_own_fit_while_others_stop(optimizer):
    # Scaled features: a step of 30 diverges; the others run to the budget, and
    # each stopped candidate is frozen while the rest go on.
    X, Y = make_problem(n=5, m=2000, seed=11, scale=2.0)
    kwargs = {"iterations": 150, "optimizer": optimizer, "block_size": 300, "n_threads": 2}
    grid = fit_many(X, Y, l2=[0.0, 1.0, 50.0], learning_rate=[0.05, 0.5, 30.0], **kwargs)
    assert len(grid) == 9 and grid.w.shape == (5, 9) and grid.b.shape == (9,)
    assert grid.stop_reason.count("diverged") == 3
    assert set(grid.stop_reason[k] for k in range(9) if grid.learning_rate[k] < 1) == {"iterations"}
    _assert_equals_single_fits(grid, X, Y, **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_candidates_equal_their_own_fits(dtype):
    X, Y = make_problem(n=11, m=3000, seed=16, dtype=dtype)
    weights = np.random.default_rng(17).uniform(0.2, 2.0, size=(1, 3000))
    kwargs = {
        "iterations": 40, "block_size": 256, "n_threads": 2, "engine": "numba",
        "sample_weight": weights,
    }  # fmt: skip
    grid = fit_many(X, Y, l2=[0.0, 0.3, 3.0], learning_rate=[0.2, 1.0], **kwargs)
    if dtype == np.float64:
        _assert_equals_single_fits(grid, X, Y, **kwargs)
        return
    # float32: the products sum in another order than the single model's, so
    # candidates agree with single fits to float32 rounding.
    for k in range(len(grid)):
        rate, l2 = float(grid.learning_rate[k]), float(grid.l2[k])
        single = fit(X, Y, learning_rate=rate, l2=l2, **kwargs)
        np.testing.assert_allclose(grid.w[:, k : k + 1], single.w, rtol=0, atol=1e-5)
        np.testing.assert_allclose(grid.cost_history[k], single.cost_history, rtol=1e-6)


def test_tolerance_stops_each_candidate_at_its_own_iteration():
    X, Y = make_problem(n=4, m=800, seed=12)
    kwargs = {"iterations": 5000, "tol": 1e-7}
    grid = fit_many(X, Y, learning_rate=[0.2, 2.0], l2=0.0, **kwargs)
    assert grid.stop_reason == ("tolerance", "tolerance")
    assert grid.converged.tolist() == [True, True]
    assert grid.n_iterations[0] > grid.n_iterations[1]  # the small step needs longer
    _assert_equals_single_fits(grid, X, Y, **kwargs)


def test_callback_reports_every_candidate_and_nan_once_stopped():
    X, Y = make_problem(n=3, m=300, seed=13, scale=3.0)
    seen = []
    grid = fit_many(
        X, Y, learning_rate=[0.1, 1e4], iterations=5, callback=lambda i, c: seen.append((i, c))
    )
    assert grid.stop_reason == ("iterations", "diverged")
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal([c[0] for _, c in seen], grid.cost_history[0])
    stopped = [c[1] for _, c in seen[grid.n_iterations[1] + 1 :]]
    assert all(math.isnan(c) for c in stopped)


def test_one_candidate_is_todays_fit_bit_for_bit():
    X, Y = make_problem(n=4, m=500, seed=14)
    single = fit(X, Y, learning_rate=0.7, l2=0.3, iterations=40)
    assert isinstance(single, FitResult)
    grid = fit_many(X, Y, learning_rate=[0.7], l2=[0.3], iterations=40)
    assert isinstance(grid, GridFitResult) and len(grid) == 1
    np.testing.assert_array_equal(grid.w, single.w)
    np.testing.assert_array_equal(grid.cost_history[0], single.cost_history)
    assert grid.b[0] == single.b


def test_lbfgs_fits_an_l2_grid_one_candidate_at_a_time():
    X, Y = make_problem(n=4, m=500, seed=15)
    grid = fit_many(X, Y, l2=[0.1, 10.0], iterations=50, optimizer="lbfgs", tol=1e-12)
    for k, l2 in enumerate([0.1, 10.0]):
        single = fit(X, Y, l2=l2, iterations=50, optimizer="lbfgs", tol=1e-12)
        np.testing.assert_array_equal(grid.w[:, k : k + 1], single.w)
    assert np.isnan(grid.learning_rate).all()
    with pytest.raises(ValueError, match="learning_rate grid"):
        fit_many(X, Y, learning_rate=[0.1, 1.0], iterations=5, optimizer="lbfgs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l2": [0.1, -1.0], "learning_rate": 0.1}, "l2"),
        ({"l2": [0.1, 1.0], "learning_rate": [0.1, math.inf]}, "learning_rate"),
        ({"l2": [0.1, 1.0]}, "learning_rate"),
        ({"l2": [], "learning_rate": 0.1}, "non-empty"),
        ({"l2": [[0.1]], "learning_rate": 0.1}, "1-d"),
    ],
)
def test_bad_grids_are_rejected(kwargs, message):
    X, Y = make_problem()
    with pytest.raises(ValueError, match=message):
        fit_many(X, Y, iterations=3, **kwargs)


def test_fit_fits_one_model_and_refuses_a_grid():
    X, Y = make_problem()
    with pytest.raises(TypeError, match="fit_many"):
        fit(X, Y, iterations=3, learning_rate=0.1, l2=[0.1, 1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fit_many"):
        fit(X, Y, iterations=3, learning_rate=[0.1, 1.0])  # type: ignore[arg-type]


def test_the_grid_builds_on_the_single_fit_and_not_the_reverse():
    import ast
    import pathlib

    import lr_kernel.train

    tree = ast.parse(pathlib.Path(lr_kernel.train.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "lr_kernel.grid" not in imported

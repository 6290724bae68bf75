"""K models over a TiledMatrix: FusedLossMany and fit_many equal the same calls on the ndarray."""

import numpy as np
import pytest

from lr_kernel import FusedLoss, FusedLossMany, fit_many
from lr_kernel.reference import loss_and_gradients_loop
from lr_kernel.tiles import TiledMatrix, tile_width
from tests.test_kernel import make_problem

# The tiled passes sum in other blocks than the ndarray's: equal to rounding.
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def tiled(X: np.ndarray) -> TiledMatrix:
    """``X`` in tiles, read-only like the problems' ndarrays: the kernel must never write it."""
    T = TiledMatrix.from_array(X)
    T.tiles.flags.writeable = False
    return T


def assert_passes_equal(got, expected, rtol):
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol)


def problem(n, m, K, dtype, weighted, seed):
    X, Y = make_problem(n=n, m=m, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    W = (rng.normal(size=(n, K)) * 2).astype(dtype)
    b = rng.normal(size=K)
    l2 = rng.uniform(0, 2, size=K)
    weights = rng.uniform(0, 3, size=(1, m)) if weighted else None
    return X, Y, W, b, l2, weights


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("K", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_many_models_on_tiles_equal_the_ndarray(dtype, weighted, K, engine):
    # Examples: fewer than one tile, and whole tiles plus a short last one
    # (192 float64 / 384 float32 per tile at 13 features); one and two threads.
    width = tile_width(13, np.dtype(dtype))
    for m in (width // 3, 5 * width + 77):
        X, Y, W, b, l2, weights = problem(13, m, K, dtype, weighted, seed=m + K)
        T = tiled(X)
        for n_threads in (1, 2):
            kwargs = {"n_models": K, "sample_weight": weights, "n_threads": n_threads}
            loss = FusedLossMany(T, Y, engine=engine, **kwargs)
            assert loss.engine == engine and loss.X is T  # no copy of X
            got = loss(W, b, l2)
            expected = FusedLossMany(X, Y, engine=engine, **kwargs)(W, b, l2)
            assert_passes_equal(got, expected, RTOL[dtype])
            # Bitwise reproducible from call to call.
            for again, first in zip(loss(W, b, l2), got, strict=True):
                np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "K"), [(3, 1), (17, 2), (30, 8), (13, 9)])
def test_compiled_many_models_on_tiles_equal_separate_single_passes(dtype, weighted, n, K):
    # n around the backward tiles' 12 and 4 rows; K a group of 1, 2, 8 and two groups.
    m = 3 * tile_width(n, np.dtype(dtype)) + 5
    X, Y, W, b, l2, weights = problem(n, m, K, dtype, weighted, seed=n + K)
    T = tiled(X)
    many = FusedLossMany(T, Y, n_models=K, sample_weight=weights, n_threads=2, engine="numba")
    cost, dW, db = many(W, b, l2)
    rtol = RTOL[dtype]
    for k in range(K):
        single = FusedLoss(T, Y, sample_weight=weights, n_threads=2, engine="numba")
        ref_cost, ref_dw, ref_db = single(W[:, k : k + 1], float(b[k]), float(l2[k]))
        assert cost[k] == pytest.approx(ref_cost, rel=rtol)
        np.testing.assert_allclose(dW[:, k : k + 1], ref_dw, rtol=rtol, atol=rtol)
        assert db[k] == pytest.approx(ref_db, rel=rtol, abs=rtol)
        # And the loop formula, in float64.
        loop = loss_and_gradients_loop(
            X.astype(np.float64), Y.astype(np.float64), W[:, k : k + 1].astype(np.float64),
            float(b[k]), float(l2[k]), sample_weight=weights,
        )  # fmt: skip
        assert cost[k] == pytest.approx(loop[0], rel=rtol)
        np.testing.assert_allclose(dW[:, k : k + 1], loop[1], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [1, 3, 9])
def test_wide_data_takes_narrow_tiles(dtype, K):
    # Past 341 features a tile is 8 lines (64 float64 / 128 float32 examples):
    # the forward tiles of 24 and 8 examples cover it, and 350 rows are 29
    # backward tiles of 12 and two single rows.
    n, m = 350, 300
    X, Y, W, b, l2, _ = problem(n, m, K, dtype, False, seed=K)
    T = tiled(X)
    assert T.width == 8 * 64 // np.dtype(dtype).itemsize
    got = FusedLossMany(T, Y, n_models=K, n_threads=2, engine="numba")(W, b, l2)
    expected = FusedLossMany(X, Y, n_models=K, n_threads=2, engine="numba")(W, b, l2)
    assert_passes_equal(got, expected, RTOL[dtype])


@pytest.mark.parametrize("K", [1, 3, 8])
def test_the_padding_adds_nothing(K):
    # A padding that is not zero would change every sum if it were read as
    # examples; the tiled pass reads only the last tile's first k columns
    # (one model: its dZ there is zero).
    X, Y, W, b, l2, weights = problem(6, 200, K, np.float64, True, seed=3)
    T = TiledMatrix.from_array(X)
    assert T.n_tiles * T.width > 200
    T.tiles[-1, :, 200 - (T.n_tiles - 1) * T.width :] = 1e6
    got = FusedLossMany(T, Y, n_models=K, sample_weight=weights, engine="numba")(W, b, l2)
    expected = FusedLossMany(X, Y, n_models=K, sample_weight=weights, engine="numba")(W, b, l2)
    assert_passes_equal(got, expected, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_extreme_scores_on_tiles_stay_finite_and_exact(dtype, K):
    # |z| from about 50 to 800 and more: exp overflows where it is not guarded.
    rng = np.random.default_rng(4)
    m = 450
    X = (rng.choice([-1.0, 1.0], size=(2, m)) * rng.uniform(50, 800, size=(2, m))).astype(dtype)
    Y = (rng.random((1, m)) < 0.5).astype(dtype)
    W = np.array([[1.0, 0.0, -1.0] * 3, [1.0, 0.001, 0.5] * 3], dtype=dtype)[:, :K]
    weights = rng.uniform(0.5, 2, size=(1, m))
    T = tiled(X)
    for engine in ("numpy", "numba"):
        kwargs = {"n_models": K, "sample_weight": weights, "engine": engine}
        with np.errstate(over="raise", invalid="raise"):
            got = FusedLossMany(T, Y, **kwargs)(W, np.zeros(K), np.zeros(K))
        expected = FusedLossMany(X, Y, **kwargs)(W, np.zeros(K), np.zeros(K))
        for part in got:
            assert np.all(np.isfinite(part))
        assert_passes_equal(got, expected, RTOL[dtype])
        Z = W.astype(np.float64).T @ X.astype(np.float64)  # (K, m)
        exact = (np.logaddexp(0.0, Z) - Y * Z) @ weights.T / weights.sum()  # (K, 1)
        np.testing.assert_allclose(got[0], exact.ravel(), rtol=RTOL[dtype])


def test_numpy_engine_blocks_cross_tiles():
    # Blocks of 100 examples start and end inside tiles: each is a C-contiguous
    # copy of X[:, a:b] in X's dtype, and the sums equal the ndarray's blocks.
    for dtype in (np.float64, np.float32):
        X, Y, W, b, l2, _ = problem(5, 1000, 4, dtype, False, seed=9)
        T = tiled(X)
        block = T[:, 150:250]
        assert block.dtype == dtype and block.flags.c_contiguous and block.shape == (5, 100)
        np.testing.assert_array_equal(block, X[:, 150:250])
        kwargs = {"n_models": 4, "block_size": 100, "n_threads": 2, "engine": "numpy"}
        got = FusedLossMany(T, Y, **kwargs)(W, b, l2)
        expected = FusedLossMany(X, Y, **kwargs)(W, b, l2)
        assert_passes_equal(got, expected, 1e-13 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize(
    ("optimizer", "l2", "learning_rate"),
    [
        ("gd", [0.0, 1.0, 30.0], [0.1, 1.0, 40.0]),  # 9 candidates, some diverge
        ("nesterov", [0.0, 0.5], [0.3, 2.0]),
        ("gd", [0.3], [0.5]),  # one candidate: fit itself
        ("lbfgs", [0.1, 3.0], None),  # one candidate after another, fit's FusedLoss
    ],
)
def test_fit_many_on_tiles_equals_fit_many_on_the_ndarray(
    dtype, engine, optimizer, l2, learning_rate
):
    m = 2 * tile_width(7, np.dtype(dtype)) + 31
    X, Y = make_problem(n=7, m=m, seed=21, dtype=dtype, scale=2.0)
    weights = np.random.default_rng(22).uniform(0.2, 2.0, size=(1, m))
    kwargs = {
        "l2": l2, "learning_rate": learning_rate, "iterations": 30, "tol": 1e-4,
        "optimizer": optimizer, "n_threads": 2, "engine": engine, "sample_weight": weights,
    }  # fmt: skip
    got = fit_many(tiled(X), Y, **kwargs)
    expected = fit_many(X, Y, **kwargs)
    rtol = RTOL[dtype]
    assert got.stop_reason == expected.stop_reason
    np.testing.assert_array_equal(got.n_iterations, expected.n_iterations)
    np.testing.assert_array_equal(got.l2, expected.l2)
    np.testing.assert_array_equal(got.learning_rate, expected.learning_rate)
    assert got.w.dtype == expected.w.dtype == dtype
    finite = np.array([reason != "diverged" for reason in got.stop_reason])
    np.testing.assert_allclose(got.w[:, finite], expected.w[:, finite], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got.b[finite], expected.b[finite], rtol=rtol, atol=rtol)
    for k in np.flatnonzero(finite):
        np.testing.assert_allclose(got.cost_history[k], expected.cost_history[k], rtol=rtol)


@pytest.mark.parametrize("K", [1, 3])
def test_tiles_of_any_width(K):
    # A TiledMatrix made by hand, 40 examples a tile (5 float64 lines, neither
    # tile_width's 24 nor 8): the single model's tile loop does not fit it.
    X, Y, W, b, l2, _ = problem(6, 300, K, np.float64, False, seed=K)
    tiles = np.zeros((8, 6, 40))
    for t in range(8):
        tiles[t, :, : min(40, 300 - 40 * t)] = X[:, 40 * t : 40 * (t + 1)]
    T = TiledMatrix(tiles, 300)
    got = FusedLossMany(T, Y, n_models=K, n_threads=2, engine="numba")(W, b, l2)
    expected = FusedLossMany(X, Y, n_models=K, n_threads=2, engine="numba")(W, b, l2)
    assert_passes_equal(got, expected, 1e-12)


def test_float32_groups_put_examples_in_the_lanes():
    # Which loops the tests above exercise: float32 groups of 2-8 models on the
    # flows' tiles (wide and narrow) take the examples-in-lanes loops, float64
    # groups and odd widths the models-in-lanes ones.
    from lr_kernel._compiled import examples_in_lanes

    for n in (13, 400):
        width = tile_width(n, np.dtype(np.float32))
        assert all(examples_in_lanes(4, lanes, width) for lanes in (2, 4, 8))
        assert not examples_in_lanes(8, 8, tile_width(n, np.dtype(np.float64)))
    assert not examples_in_lanes(4, 1, 384)
    assert not examples_in_lanes(4, 8, 40)


@pytest.mark.parametrize("K", [2, 4, 8, 16])
def test_float32_examples_in_lanes_equal_the_formula(K):
    # Rows not a multiple of the backward's 2/4/8, a padded last tile, and
    # confident scores: each model's pass against the loop formulas in float64.
    n, m = 11, 1000
    X, Y, W, b, l2, weights = problem(n, m, K, np.float32, True, seed=K)
    W *= 4
    T = tiled(X)
    cost, dW, db = FusedLossMany(
        T, Y, n_models=K, sample_weight=weights, n_threads=2, engine="numba"
    )(W, b, l2)
    X64, W64 = X.astype(np.float64), W.astype(np.float64)
    b32 = b.astype(np.float32).astype(np.float64)
    for k in range(K):
        Z = W64[:, k] @ X64 + b32[k]
        A = 1 / (1 + np.exp(-Z))
        s = weights.ravel()
        loss = (s * (np.logaddexp(0, Z) - Y.ravel() * Z)).sum() / s.sum()
        loss += l2[k] / (2 * s.sum()) * (W64[:, k] @ W64[:, k])
        dz = s * (A - Y.ravel()) / s.sum()
        np.testing.assert_allclose(
            dW[:, k], X64 @ dz + l2[k] / s.sum() * W64[:, k], rtol=1e-5, atol=1e-6
        )
        assert db[k] == pytest.approx(dz.sum(), rel=1e-5, abs=1e-6)
        assert cost[k] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_models_on_tiles_have_the_same_bits_whatever_the_threads(dtype):
    # The threads take runs of tiles as they come free; each run's sums are
    # added in run order, so neither the thread count nor timing shows.
    X, Y, W, b, l2, weights = problem(10, 20_000, 9, dtype, True, seed=4)
    T = tiled(X)
    results = [
        FusedLossMany(T, Y, n_models=9, sample_weight=weights, n_threads=t, engine="numba")(
            W, b, l2
        )
        for t in (1, 2, 3, 2)
    ]
    assert len(FusedLossMany(T, Y, n_models=9, n_threads=3, engine="numba")._runs) == 16
    for got in results[1:]:
        for g, e in zip(got, results[0], strict=True):
            np.testing.assert_array_equal(g, e)

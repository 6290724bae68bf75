"""X in tiles of examples (lr_kernel.tiles) and the compiled engine over them."""

import numpy as np
import pytest

from lr_kernel import FusedLoss, fit, loss_and_gradients_naive
from lr_kernel.tiles import TiledMatrix, tile_width
from tests.test_compiled_kernel import compiled_allocations
from tests.test_kernel import make_problem


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 7, 400])
def test_a_tiled_matrix_holds_the_same_values_as_the_array(n, dtype):
    width = tile_width(n, np.dtype(dtype))
    rng = np.random.default_rng(n)
    for m in (1, width - 1, width, width + 1, 5 * width + 3):
        X = rng.normal(size=(n, m)).astype(dtype)
        tiled = TiledMatrix.from_array(X)
        assert tiled.shape == (n, m) and tiled.dtype == dtype and tiled.n_tiles == -(-m // width)
        np.testing.assert_array_equal(tiled.to_array(), X)
        np.testing.assert_array_equal(tiled[:, 3 : m - 1], X[:, 3 : m - 1])
        np.testing.assert_array_equal(tiled[n - 1], X[n - 1])
        # The last tile's padding is zero: it adds nothing to a product.
        assert not tiled.tiles[-1, :, m - (tiled.n_tiles - 1) * width :].any()


def test_tile_width_is_24_lines_or_8_for_wide_data():
    assert tile_width(100, np.dtype(np.float64)) == 192
    assert tile_width(100, np.dtype(np.float32)) == 384
    assert tile_width(341, np.dtype(np.float64)) == 192  # 341 x 1536 bytes <= 512 KiB
    assert tile_width(342, np.dtype(np.float64)) == 64
    assert tile_width(5000, np.dtype(np.float32)) == 128


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_equal_the_arrays_products(dtype):
    rng = np.random.default_rng(1)
    m = 70 * tile_width(6, np.dtype(dtype)) + 5  # more than one group of PRODUCT_TILES
    X = rng.normal(size=(6, m)).astype(dtype)
    tiled = TiledMatrix.from_array(X)
    A = rng.normal(size=(3, 6)).astype(dtype)
    B = rng.normal(size=(m, 2)).astype(dtype)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(A @ tiled, A @ X, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(A[0] @ tiled, A[0] @ X, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(tiled @ B, X @ B, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(tiled @ B[:, 0], X @ B[:, 0], rtol=rtol, atol=rtol * 10)
    w = A[:1].T  # (n, 1), as the flows score rows: wᵀ X + b
    np.testing.assert_allclose(w.T @ tiled + 0.5, w.T @ X + 0.5, rtol=rtol, atol=rtol)


def test_a_tiled_matrix_is_never_densified_silently():
    tiled = TiledMatrix.from_array(np.ones((2, 10)))
    with pytest.raises(TypeError, match="not converted implicitly"):
        np.asarray(tiled)
    with pytest.raises(TypeError, match=r"X\[j\] or X\[:, a:b\]"):
        tiled[:, ::2]
    with pytest.raises(ValueError, match="do not fit"):
        tiled.set_columns(8, np.ones((2, 3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        TiledMatrix(np.ones((2, 3, 4)).transpose(0, 2, 1), 4)
    with pytest.raises(ValueError, match="do not fill"):
        TiledMatrix(np.ones((2, 3, 4)), 4)


def weighted_naive(X, Y, w, b, l2, s):
    """The objective's formula with row weights ``s`` (1 each if None), whole arrays, float64."""
    X64, Y64, w64 = (a.astype(np.float64) for a in (X, Y, w))
    if s is None:
        return loss_and_gradients_naive(X64, Y64, w64, b, l2)
    Z = w64.T @ X64 + b
    A = 1 / (1 + np.exp(-Z))
    total = s.sum()
    cost = ((s * (np.logaddexp(0, Z) - Y64 * Z)).sum() + 0.5 * l2 * (w64**2).sum()) / total
    dZ = s * (A - Y64)
    return cost, (X64 @ dZ.T + l2 * w64) / total, dZ.sum() / total


@pytest.mark.parametrize("n", [1, 9, 100, 400])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_engine_over_tiles_equals_the_naive_formula(n, dtype):
    # n = 400 takes the narrow tiles; m leaves a short last tile.
    X, Y = make_problem(n=n, m=3_001, seed=n, dtype=dtype)
    tiled = TiledMatrix.from_array(X)
    w = (np.random.default_rng(n).normal(size=(n, 1)) / np.sqrt(n)).astype(dtype)
    s = np.random.default_rng(n + 1).uniform(0, 2, size=(1, 3_001))
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for weights in (None, s):
        loss = FusedLoss(tiled, Y, n_threads=2, engine="numba", sample_weight=weights)
        assert loss._tiled and loss.block_size == tiled.width
        cost, dw, db = loss(w, 0.7, 0.3)
        ref = weighted_naive(X, Y, w, 0.7, 0.3, weights)
        assert dw.dtype == dtype and dw.shape == (n, 1)
        assert cost == pytest.approx(ref[0], rel=rtol)
        np.testing.assert_allclose(dw, ref[1], rtol=rtol, atol=rtol)
        assert db == pytest.approx(ref[2], rel=rtol, abs=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_scores_over_tiles_match_the_column_layout(dtype):
    # Scores of |z| up to ~800 (float64) and ~80 (float32): the element-wise
    # step is the same code on both layouts, so the sums agree to rounding.
    scale = 80.0 if dtype == np.float64 else 8.0
    with np.errstate(over="ignore"):
        X, Y = make_problem(n=10, m=2_000, seed=3, dtype=dtype, scale=scale)
    w = np.ones((10, 1), dtype)
    columns = FusedLoss(X, Y, n_threads=2, engine="numba", block_size=256)(w, -1.0)
    tiles = FusedLoss(TiledMatrix.from_array(X), Y, n_threads=2, engine="numba")(w, -1.0)
    assert np.isfinite(tiles[0]) and np.all(np.isfinite(tiles[1]))
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert tiles[0] == pytest.approx(columns[0], rel=rtol)
    np.testing.assert_allclose(tiles[1], columns[1], rtol=rtol, atol=rtol * scale)
    assert tiles[2] == pytest.approx(columns[2], rel=rtol, abs=rtol)


@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_hessian_and_fits_over_tiles_equal_those_over_the_array(engine):
    X, Y = make_problem(n=12, m=20_000, seed=6)
    tiled = TiledMatrix.from_array(X)
    w = np.random.default_rng(7).normal(size=(12, 1)) * 0.3
    s = np.random.default_rng(8).uniform(0, 2, size=(1, 20_000))
    for weights in (None, s):
        on_array = FusedLoss(X, Y, n_threads=2, engine=engine, sample_weight=weights)
        on_tiles = FusedLoss(tiled, Y, n_threads=2, engine=engine, sample_weight=weights)
        H, H_tiles = on_array.hessian(w, 0.2, 0.5)[3], on_tiles.hessian(w, 0.2, 0.5)[3]
        np.testing.assert_allclose(H_tiles, H, rtol=1e-12, atol=1e-15)
    runs = [
        fit(data, Y, iterations=30, n_threads=2, engine=engine, **setting)
        for setting in ({"optimizer": "gd", "learning_rate": 0.5}, {"optimizer": "newton"})
        for data in (X, tiled)
    ]
    for on_array, on_tiles in (runs[:2], runs[2:]):
        np.testing.assert_allclose(on_tiles.w, on_array.w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(on_tiles.cost_history, on_array.cost_history, rtol=1e-12)


def test_tiled_sums_have_the_same_bits_whatever_the_threads():
    # The threads take runs of tiles as they come free; each run's sums are kept
    # apart and added in run order.
    X, Y = make_problem(n=20, m=50_000, seed=9)
    tiled = TiledMatrix.from_array(X)
    w = np.full((20, 1), 0.05)
    three = FusedLoss(tiled, Y, n_threads=3, engine="numba")
    first = three(w, 0.1)
    for threads in (1, 2, 3, 5):
        again = FusedLoss(tiled, Y, n_threads=threads, engine="numba")(w, 0.1)
        assert again[0] == first[0] and again[2] == first[2]
        np.testing.assert_array_equal(again[1], first[1])
    ref = loss_and_gradients_naive(X, Y, w, 0.1)
    assert first[0] == pytest.approx(ref[0], rel=1e-13)


def test_the_tiled_calls_allocate_nothing_but_their_arguments_headers():
    # As the column layout's test: one MemInfo header per array argument (8) of
    # each compiled call, one call per run of tiles (16 here), whatever the threads.
    X, Y = make_problem(n=9, m=6_000, seed=11)
    loss = FusedLoss(TiledMatrix.from_array(X), Y, n_threads=3, engine="numba")
    w = np.full((9, 1), 0.1)
    assert len(loss._runs) == 16
    allocated, freed = compiled_allocations(lambda: loss(w, 0.2), times=5)
    assert allocated == 5 * 16 * 8
    assert allocated == freed

"""The compiled engine: its exp and log1p, its results, and when "auto" picks it."""

import math
import subprocess
import sys

import numpy as np
import pytest

import lr_kernel.loss as loss_module
from lr_kernel import FusedLoss, fit, loss_and_gradients_naive
from lr_kernel._compiled import exp_nonpositive, exp_nonpositive_32, log1p_unit, log1p_unit_32
from tests.test_kernel import make_problem

ULP = np.finfo(np.float64).eps


def test_exp_is_within_one_ulp_of_libm_and_zero_below_its_range():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -np.logspace(-300, np.log10(708.0), 200_000),
            -rng.uniform(0, 708, 100_000),
            [0.0, -0.0, -np.log(2) / 2, -np.log(2), -707.9, -708.0],
        ]
    )
    got, ref = exp_nonpositive(x), np.exp(x)
    assert np.max(np.abs(got - ref) / ref) <= ULP
    # Below -708 the kernel returns 0: the example's loss is then exact without it.
    np.testing.assert_array_equal(exp_nonpositive(np.array([-708.1, -745.2, -1e300, -np.inf])), 0)


def test_log1p_is_within_three_ulp_of_libm_on_the_unit_interval():
    rng = np.random.default_rng(1)
    e = np.concatenate(
        [np.logspace(-300, 0, 200_000), rng.random(100_000), [0.0, 1.0, np.sqrt(2) - 1]]
    )
    got, ref = log1p_unit(e), np.log1p(e)
    assert got[e == 0.0].tolist() == [0.0]
    nonzero = e > 0
    assert np.max(np.abs(got[nonzero] - ref[nonzero]) / ref[nonzero]) <= 3 * ULP


def test_float32_exp_and_log1p_are_within_one_and_three_float32_ulp():
    # The many-model engine's float32 element-wise step; the float64 results
    # rounded to float32 are the reference.
    eps = np.finfo(np.float32).eps
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [-np.logspace(-40, np.log10(87.0), 200_000), -rng.uniform(0, 87, 100_000), [0.0, -87.0]]
    ).astype(np.float32)
    got, ref = exp_nonpositive_32(x), np.exp(x.astype(np.float64))
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref) / ref) <= eps
    below = np.array([-87.01, -100.0, -3e38, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(exp_nonpositive_32(below), 0)
    e = np.concatenate([np.logspace(-38, 0, 200_000), rng.random(100_000), [1.0]])
    e = e.astype(np.float32)
    got, ref = log1p_unit_32(e), np.log1p(e.astype(np.float64))
    assert log1p_unit_32(np.zeros(1, np.float32)).tolist() == [0.0]
    assert np.max(np.abs(got - ref) / ref) <= 3 * eps


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 100])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_engine_equals_the_naive_formula(n, dtype):
    # n around the 8 rows the compiled loops take per sweep; blocks of 300 and a short last one.
    X, Y = make_problem(n=n, m=2_345, seed=n, dtype=dtype)
    w = np.random.default_rng(n).normal(size=(n, 1)).astype(dtype)
    cost, dw, db = FusedLoss(X, Y, block_size=300, n_threads=2, engine="numba")(w, 0.7, 0.3)
    ref = loss_and_gradients_naive(
        X.astype(np.float64), Y.astype(np.float64), w.astype(np.float64), 0.7, 0.3
    )
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert dw.dtype == dtype and dw.shape == (n, 1)
    assert cost == pytest.approx(ref[0], rel=rtol)
    np.testing.assert_allclose(dw, ref[1], rtol=rtol, atol=rtol)
    assert db == pytest.approx(ref[2], rel=rtol, abs=rtol)


def test_compiled_engine_takes_row_views_of_a_wider_array():
    # Unit stride along examples, rows further apart than m: a column slice.
    wide, Y = make_problem(n=9, m=3_000, seed=3)
    X = wide[:, :2_000]
    assert not X.flags.c_contiguous
    w = np.random.default_rng(4).normal(size=(9, 1))
    got = FusedLoss(X, Y[:, :2_000], block_size=512, engine="numba")(w, 0.1)
    ref = loss_and_gradients_naive(np.ascontiguousarray(X), Y[:, :2_000], w, 0.1)
    assert got[0] == pytest.approx(ref[0], rel=1e-12)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12, atol=1e-15)


def test_non_finite_scores_give_a_non_finite_cost_in_both_engines():
    X, Y = make_problem(n=3, m=500, seed=5)
    for w in (np.full((3, 1), 1e308), np.full((3, 1), np.nan)):
        for engine in ("numpy", "numba"):
            with np.errstate(all="ignore"):
                cost, _, _ = FusedLoss(X, Y, engine=engine)(w, 0.0)
            assert not math.isfinite(cost), (engine, w[0, 0])


def test_fit_with_either_engine_reaches_the_same_parameters():
    X, Y = make_problem(n=12, m=20_000, seed=6)
    runs = {
        engine: fit(X, Y, learning_rate=0.5, iterations=60, n_threads=2, engine=engine)
        for engine in ("numpy", "numba")
    }
    np.testing.assert_allclose(runs["numba"].w, runs["numpy"].w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(runs["numba"].cost_history, runs["numpy"].cost_history, rtol=1e-12)
    lbfgs = fit(X, Y, iterations=50, optimizer="lbfgs", n_threads=2, engine="numba")
    assert lbfgs.cost_history[-1] <= runs["numba"].cost_history[-1]


def test_auto_picks_the_compiled_engine_only_where_it_pays(monkeypatch):
    X, Y = make_problem(n=4, m=1_000, seed=7)
    monkeypatch.setattr(loss_module, "COMPILED_MIN_ELEMENTS", 4_000)
    assert FusedLoss(X, Y, n_threads=2).engine == "numba"
    assert FusedLoss(X, Y, n_threads=1).engine == "numpy"  # one thread: NumPy + BLAS threads
    assert FusedLoss(X[:, :999], Y[:, :999], n_threads=2).engine == "numpy"  # too small
    wide, wide_y = make_problem(n=4, m=2_000, seed=8)
    assert FusedLoss(wide[:, :1_500], wide_y[:, :1_500], n_threads=2).engine == "numpy"
    assert FusedLoss(X, Y, n_threads=2, engine="numpy").engine == "numpy"
    # Its default blocks are ~1 MiB of X; NumPy's stay at 8 MiB.
    assert FusedLoss(X, Y, n_threads=2).block_size == 1_000
    big, big_y = make_problem(n=100, m=40_000, seed=9)
    assert FusedLoss(big, big_y, engine="numba").block_size == 1280
    assert FusedLoss(big, big_y, engine="numpy").block_size == 10240


def test_engine_errors_are_clear(monkeypatch):
    X, Y = make_problem(n=2, m=10, seed=10)
    with pytest.raises(ValueError, match="engine must be one of auto, numpy, numba"):
        FusedLoss(X, Y, engine="cuda")  # type: ignore[arg-type]
    monkeypatch.setattr(loss_module, "compiled_engine_available", lambda: False)
    with pytest.raises(ValueError, match="needs numba installed"):
        FusedLoss(X, Y, engine="numba")
    monkeypatch.setattr(loss_module, "COMPILED_MIN_ELEMENTS", 1)
    assert FusedLoss(X, Y, n_threads=2).engine == "numpy"  # auto without numba


def test_import_lr_kernel_does_not_import_numba():
    code = (
        "import sys, numpy as np, lr_kernel\n"
        "assert 'numba' not in sys.modules, 'imported too early'\n"
        "X = np.ones((2, 10)); Y = np.ones((1, 10))\n"
        "lr_kernel.fit(X, Y, learning_rate=0.1, iterations=2, n_threads=2)\n"
        "assert 'numba' not in sys.modules, 'imported for small data'\n"
        "lr_kernel.FusedLoss(X, Y, engine='numba')\n"
        "assert 'numba' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_compiled_calls_allocate_nothing_but_their_arguments_headers():
    # tracemalloc does not see numba's allocator; its own counters do. Each
    # compiled call wraps its 7 array arguments in one MemInfo header apiece; an
    # array made inside the kernel would add allocations of its own.
    X, Y = make_problem(n=9, m=6_000, seed=11)
    loss = FusedLoss(X, Y, block_size=700, n_threads=3, engine="numba")
    w = np.full((9, 1), 0.1)
    allocated, freed = compiled_allocations(lambda: loss(w, 0.2), times=5)
    assert allocated == 5 * 3 * 7
    assert allocated == freed  # nothing kept


def compiled_allocations(call, times):
    """What ``times`` calls of ``call`` allocate and free through numba's allocator
    (after one call to warm up), counted by its own statistics."""
    from numba.core.runtime import _nrt_python, rtsys

    call()
    enabled = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats()
        for _ in range(times):
            call()
        after = rtsys.get_allocation_stats()
    finally:
        if not enabled:
            _nrt_python.memsys_disable_stats()
    return after.alloc - before.alloc, after.free - before.free

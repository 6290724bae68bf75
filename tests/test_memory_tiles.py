"""The in-memory backend's X in tiles: the same values and the same runs as in columns."""

import mmap

import numpy as np
import polars as pl
import pytest

from flows.backends import memory as memory_backend
from flows.backends import open_training_data, plan_run, requested_kernel
from flows.backends.memory import kernel_setting_over, small_pages_empty
from flows.features import PlanSettings
from flows.store import latest
from lr_kernel import FusedLoss, default_block_size
from lr_kernel.loss import COMPILED_MIN_ELEMENTS, compiled_engine_available
from lr_kernel.tiles import TiledMatrix
from tests.conftest import memory_config
from tests.test_cli import run_cli

needs_numba = pytest.mark.skipif(not compiled_engine_available(), reason="needs numba")


def write_parts(directory, rows, files=3, seed=0):
    """Numeric, integer, boolean and categorical features, a weight and a label, in files
    of uneven sizes (so blocks start and end inside tiles)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, rows)) * np.array([[1.0], [40.0]]) + 3.0
    city = rng.choice(["berlin", "oslo", "paris", "rome"], rows)
    z = 0.8 * (x[0] - 3) - 0.02 * (x[1] - 3) + 0.5 * (city == "oslo") + rng.normal(size=rows)
    frame = pl.DataFrame(
        {
            "x0": x[0],
            "x1": x[1],
            "count": rng.integers(0, 20, rows),
            "flag": rng.random(rows) < 0.3,
            "city": city,
            "s": rng.uniform(0.2, 2.0, rows),
            "y": z > 0,
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [0, rows // 3 + 17, 2 * rows // 3 - 5, rows][: files + 1]
    for k in range(len(bounds) - 1):
        part = frame.slice(bounds[k], bounds[k + 1] - bounds[k])
        part.write_parquet(directory / f"part-{k}.parquet", row_group_size=900)
    return directory


def open_memory_data(path, **kwargs):
    kwargs.setdefault("label", "y")
    kwargs.setdefault("optimizer", "lbfgs")  # Newton fits keep the columns
    config = memory_config(path, **kwargs)
    return open_training_data(config, *plan_run(config))


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("split", [{}, {"validation_fraction": 0.25}])
@pytest.mark.parametrize("weight", [{}, {"weight": "s"}])
def test_tiles_hold_exactly_the_columns_values(tmp_path, monkeypatch, dtype, split, weight):
    path = write_parts(tmp_path / "parts", rows=5000)
    # Batches of 700 rows: many blocks, each copied into the tiles from the one scratch block.
    monkeypatch.setattr(PlanSettings, "batch_rows", lambda self, budget=0: 700)
    settings = dict(dtype=dtype, threads=2, **split, **weight)
    columns = open_memory_data(path, engine="numpy", **settings)
    tiles = open_memory_data(path, engine="numba", **settings)
    assert isinstance(tiles.train.X, TiledMatrix)
    assert isinstance(columns.train.X, np.ndarray)
    assert tiles.train.X.shape == columns.train.X.shape
    assert tiles.train.X.dtype == columns.train.X.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tiles.train.X.to_array(), columns.train.X)
    m, X = columns.n_examples, tiles.train.X
    last = X.tiles[-1, :, m - (X.n_tiles - 1) * X.width :]
    np.testing.assert_array_equal(last, 0.0)  # the padding stays zero
    storage = X.tiles
    while isinstance(storage, np.ndarray):
        storage = storage.base
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # allocated by small_pages_empty
        assert isinstance(storage, memoryview) and isinstance(storage.obj, mmap.mmap)
    np.testing.assert_array_equal(tiles.train.Y, columns.train.Y)
    if weight:
        np.testing.assert_array_equal(tiles.train.weight, columns.train.weight)
    if split:
        assert tiles.held_out is not None and columns.held_out is not None
        assert isinstance(tiles.held_out.X, np.ndarray)  # metrics and one validation loss
        np.testing.assert_array_equal(tiles.held_out.X, columns.held_out.X)
    else:
        assert tiles.held_out is None
    assert tiles.plan.to_json() == columns.plan.to_json()
    assert tiles.fingerprint == columns.fingerprint


@needs_numba
def test_what_reads_the_training_rows_gives_the_columns_results(tmp_path):
    path = write_parts(tmp_path / "parts", rows=4000)
    settings = dict(threads=2, validation_fraction=0.2, weight="s")
    columns = open_memory_data(path, engine="numpy", **settings)
    tiles = open_memory_data(path, engine="numba", **settings)
    assert isinstance(tiles.train.X, TiledMatrix)
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(columns.plan.n_terms, 1)) * 0.3, -0.2
    expected, got = columns.metrics(w, b), tiles.metrics(w, b)
    assert got.keys() == expected.keys()
    for split in expected:
        assert got[split] == pytest.approx(expected[split], rel=1e-12)
    assert tiles.validation_log_loss(w, b) == pytest.approx(
        columns.validation_log_loss(w, b), rel=1e-12
    )
    assert tiles.stable_learning_rate(0.5) == pytest.approx(
        columns.stable_learning_rate(0.5), rel=1e-12
    )
    # The losses of the two data, each on its own engine, and the tiles on NumPy's too.
    for engine in ("numba", "numpy"):
        cost, dw, db, H = tiles.loss(n_threads=2, engine=engine).hessian(w, b, 0.7)
        ref = columns.loss(n_threads=2, engine="numpy").hessian(w, b, 0.7)
        assert cost == pytest.approx(ref[0], rel=1e-12)
        np.testing.assert_allclose(dw, ref[1], rtol=1e-11, atol=1e-14)
        assert db == pytest.approx(ref[2], rel=1e-11, abs=1e-14)
        np.testing.assert_allclose(H, ref[3], rtol=1e-11, atol=1e-14)


def test_the_layout_follows_the_engine_the_run_resolves(tmp_path):
    """Tiles exactly where the kernel will sum X with the compiled engine: the layout and
    ``kernel_setting`` come from one rule, for every engine and thread count."""
    path = write_parts(tmp_path / "parts", rows=2000)
    for engine, threads in [("numpy", 2), ("auto", 2), ("auto", 1), ("numba", 1), ("numba", 2)]:
        if engine == "numba" and not compiled_engine_available():
            continue
        config = memory_config(path, label="y", engine=engine, threads=threads, optimizer="gd")
        data = open_training_data(config, *plan_run(config))
        resolved = data.kernel_setting(*requested_kernel(config))
        assert isinstance(data.train.X, TiledMatrix) == (resolved[1] == "numba"), config
        # A Newton fit (auto over few terms, here) keeps the columns whatever the engine.
        newton = memory_config(path, label="y", engine=engine, threads=threads)
        assert isinstance(open_training_data(newton, *plan_run(newton)).train.X, np.ndarray)
        # Small data: auto is NumPy's, only an explicit numba tiles it.
        assert resolved[1] == ("numba" if engine == "numba" else "numpy")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_rule_on_shapes_the_flows_meet(dtype):
    """``kernel_setting_over``'s answers, on untouched storage (no page of it is made)."""
    dtype = np.dtype(dtype)
    n = 50
    block = default_block_size(n, dtype)
    large = max(COMPILED_MIN_ELEMENTS // n + 1, block + 1)
    numba = "numba" if compiled_engine_available() else "numpy"

    def rule(m, threads, engine):
        return kernel_setting_over(small_pages_empty((n, m), dtype), threads, engine)

    assert rule(large, 2, "auto") == (2, numba)
    assert rule(large, 1, "auto") == (1, "numpy")  # one thread: NumPy with BLAS
    assert rule(large, 2, "numpy") == (2, "numpy")
    assert rule(block, 2, "auto") == (1, "numpy")  # one block: one thread
    assert rule(COMPILED_MIN_ELEMENTS // n - 1, 2, "auto")[1] == "numpy"  # too small
    tiles = TiledMatrix.empty(n, large, dtype, allocate=small_pages_empty)
    assert kernel_setting_over(tiles, 2, "auto") == rule(large, 2, "auto")


def test_the_requested_threads_default_to_the_available_cores(tmp_path, monkeypatch):
    import flows.backends

    monkeypatch.setattr(flows.backends, "available_cores", lambda: 7)
    assert requested_kernel(memory_config(tmp_path / "x.parquet")) == (7, "auto")
    config = memory_config(tmp_path / "x.parquet", threads=3, engine="numpy")
    assert requested_kernel(config) == (3, "numpy")


@needs_numba
def test_the_tiled_loss_never_asks_for_a_dense_x(tmp_path, monkeypatch):
    """A fit's passes over the tiles (either engine, the Hessian's), the metrics and the
    step size copy at most a block of X at a time, never all of it."""
    path = write_parts(tmp_path / "parts", rows=50_000)  # ~40,000 training rows
    data = open_memory_data(path, engine="numba", threads=2, validation_fraction=0.2)
    X = data.train.X
    assert isinstance(X, TiledMatrix)
    block = default_block_size(X.shape[0], X.dtype)
    assert X.shape[1] > block

    def refuse(*args, **kwargs):
        raise AssertionError("a dense copy of more than a block of X")

    with pytest.raises(TypeError):
        np.asarray(X)  # the refusal the kernel and the flows rely on
    monkeypatch.setattr(TiledMatrix, "to_array", refuse)
    columns = TiledMatrix.columns
    monkeypatch.setattr(
        TiledMatrix,
        "columns",
        lambda self, a, b: refuse() if b - a > block else columns(self, a, b),
    )
    w = np.zeros((data.plan.n_terms, 1))
    for threads, engine in [(2, "numba"), (1, "numpy"), (2, "numpy")]:
        loss = data.loss(n_threads=threads, engine=engine)
        assert isinstance(loss, FusedLoss) and loss.engine == engine
        loss.hessian(w, 0.0)
        loss(w, 0.0)
    data.metrics(w, 0.0)
    assert data.stable_learning_rate(0.0) > 0


def read_run(out):
    run = latest(out)
    return {
        name: pl.read_parquet(run / f"{name}.parquet")
        for name in ("params", "cost_history", "metrics")
    }


@needs_numba
@pytest.mark.slow
def test_a_train_run_over_tiles_equals_the_numpy_run(prefect_api, tmp_path, monkeypatch, capsys):
    # 48,000 rows: ~38,400 training rows, past one block, so the kernel runs 2 threads;
    # gd, whose loss passes go over the tiles (a Newton fit keeps the columns).
    path = write_parts(tmp_path / "parts", rows=48_000)
    layouts = []
    open_memory = memory_backend.open_memory

    def spy(*args, **kwargs):
        data = open_memory(*args, **kwargs)
        layouts.append(type(data.train.X))
        return data

    monkeypatch.setattr(memory_backend, "open_memory", spy)
    runs = {}
    for engine in ("numpy", "numba"):
        out = tmp_path / engine
        status = run_cli(
            "train", "--data", path, "--output", out, "--label", "y", "--weight", "s",
            "--threads", "2", "--engine", engine, "--backend", "memory",
            "--validation-fraction", "0.2", "--iterations", "50", "--optimizer", "gd",
        )  # fmt: skip
        assert status == 0, capsys.readouterr().err
        runs[engine] = read_run(out)
    assert layouts == [np.ndarray, TiledMatrix]
    numpy_run, tiles_run = runs["numpy"], runs["numba"]
    params = numpy_run["params"]
    assert tiles_run["params"]["term"].to_list() == params["term"].to_list()
    for column in ("estimate", "std_error", "z_value", "ci_lower", "ci_upper"):
        np.testing.assert_allclose(
            tiles_run["params"][column].to_numpy(), params[column].to_numpy(), rtol=1e-9, atol=1e-12
        )
    history = numpy_run["cost_history"]
    assert tiles_run["cost_history"].height == history.height
    np.testing.assert_array_equal(tiles_run["cost_history"]["iteration"], history["iteration"])
    np.testing.assert_allclose(tiles_run["cost_history"]["cost"], history["cost"], rtol=1e-10)
    for column in ("gradient_norm", "validation_cost"):
        got = tiles_run["cost_history"][column].to_numpy()
        expected = history[column].to_numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-12)
    metrics = numpy_run["metrics"].sort("split", "metric")
    got = tiles_run["metrics"].sort("split", "metric")
    assert got.select("split", "metric").equals(metrics.select("split", "metric"))
    np.testing.assert_allclose(got["value"].to_numpy(), metrics["value"].to_numpy(), rtol=1e-9)


def test_the_layout_follows_the_passes_the_fit_makes():
    from flows.backends.memory import HUGE_PAGES_MIN_PASSES, tiled_layout
    from lr_kernel.train import NEWTON_MAX_FEATURES

    many = HUGE_PAGES_MIN_PASSES
    assert tiled_layout("gd", 1000, 50) == (True, True)
    assert tiled_layout("nesterov", many, 50) == (True, True)
    assert tiled_layout("gd", many - 1, 50) == (True, False)
    assert tiled_layout("lbfgs", 1000, 50) == (True, False)
    assert tiled_layout("newton", 1000, 50) == (False, False)  # Hessian passes: columns
    assert tiled_layout("auto", 1000, NEWTON_MAX_FEATURES) == (False, False)  # auto is newton
    assert tiled_layout("auto", 1000, NEWTON_MAX_FEATURES + 1) == (True, False)  # lbfgs


@needs_numba
@pytest.mark.parametrize(("optimizer", "allocator"), [("gd", "huge"), ("lbfgs", "small")])
def test_the_tiles_of_a_long_first_order_fit_are_in_huge_pages(
    tmp_path, monkeypatch, optimizer, allocator
):
    made = []

    def spy(name, allocate):
        def record(shape, dtype):
            made.append((name, shape))
            return allocate(shape, dtype)

        return record

    monkeypatch.setattr(
        memory_backend, "huge_pages_empty", spy("huge", memory_backend.huge_pages_empty)
    )
    monkeypatch.setattr(
        memory_backend, "small_pages_empty", spy("small", memory_backend.small_pages_empty)
    )
    path = write_parts(tmp_path / "parts", rows=3000)
    data = open_memory_data(path, engine="numba", threads=2, optimizer=optimizer, iterations=500)
    X = data.train.X
    assert isinstance(X, TiledMatrix)
    tiles_shape = (X.n_tiles * X.shape[0], X.width)
    assert (allocator, tiles_shape) in made
    assert ("huge" if allocator == "small" else "small", tiles_shape) not in made

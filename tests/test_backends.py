"""Backends: the stream cache and Dask shards give the in-memory run's parameters and costs."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.backends import (
    in_memory_bytes,
    open_training_data,
    parse_bytes,
    plan_run,
    resolve_backend,
)
from flows.config import TrainConfig
from flows.errors import DataError
from flows.features import Summary, choose_columns, summarize
from flows.store import latest
from lr_kernel import FusedLoss, fit, fit_loss
from tests.conftest import load_memory, local_dask_client, memory_config

# Same data, same config: only the float rounding of differently grouped sums differs.
RTOL = 1e-9


def make_parts(directory, rows=3000, files=3, row_group_rows=400, seed=1):
    """Several files of several row groups: features on different scales, an int label."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, rows)) * np.array([[1.0], [50.0], [0.01], [3.0]]) + 7.0
    z = 1.2 * (x[0] - 7) + 0.02 * (x[1] - 7) - 40 * (x[2] - 7) + rng.normal(size=rows)
    frame = pl.DataFrame(
        {"key": np.arange(rows), **{f"f{j}": x[j] for j in range(4)}, "y": (z > 0).astype(int)}
    )
    frame = frame.with_columns(pl.col("f3").round(0).cast(pl.Int32))  # an integer feature
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for k in range(files):
        part = frame.slice(bounds[k], bounds[k + 1] - bounds[k])
        part.write_parquet(directory / f"part-{k}.parquet", row_group_size=row_group_rows)
    return directory


@pytest.fixture
def parts(tmp_path):
    return make_parts(tmp_path / "parts")


def config_of(path, **kwargs):
    """The four features of ``path``, nothing held out (unless asked)."""
    return memory_config(path, label="y", features=["f0", "f1", "f2", "f3"], **kwargs)


def plan_of(path, **kwargs):
    return plan_run(config_of(path, **kwargs))[0]


def stream_of(path, root, memory_budget, cleanup=False, **kwargs):
    config = config_of(
        path,
        backend="stream",
        cache_dir=str(root),
        memory_budget=memory_budget,
        cleanup_cache=cleanup,
        **kwargs,
    )
    return open_training_data(config, *plan_run(config))


def dask_of(path, client, **kwargs):
    """The Dask backend on a given client (``open_training_data`` starts its own cluster)."""
    from flows.backends.dask_backend import open_dask
    from flows.backends.passes import settings_of

    config = config_of(path, backend="dask", **kwargs)
    plan, validation = plan_run(config)
    return open_dask(plan, validation, settings_of(config, plan), client=client)


def assert_same_fit(expected, got):
    scale = np.max(np.abs(expected.w))
    np.testing.assert_allclose(got.w, expected.w, rtol=0, atol=RTOL * scale)
    assert got.b == pytest.approx(expected.b, rel=RTOL, abs=RTOL * scale)
    np.testing.assert_allclose(got.cost_history, expected.cost_history, rtol=RTOL)
    assert got.stop_reason == expected.stop_reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256MB", 256_000_000), ("2GiB", 2**30 * 2), ("1000", 1000), ("1.5kb", 1500)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "12 parsecs", "-3MB", "MB"])
def test_parse_bytes_rejects_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_summaries_merge_to_the_whole_data_statistics(parts):
    plan = plan_of(parts)
    frame = pl.concat([pl.read_parquet(p) for p in plan.files])
    frame = frame.with_columns((pl.col("key") % 3).cast(pl.String).alias("c"))  # categorical
    features = ["f0", "f1", "f2", "f3", "c"]
    choice = choose_columns(frame.schema, label="y", features=features, where=plan.files[0])
    whole = summarize(frame, choice, path=plan.files[0], max_levels=100)
    merged = Summary()
    for start in range(0, frame.height, 700):  # uneven pieces, merged in order
        part = summarize(frame.slice(start, 700), choice, path=plan.files[0], max_levels=100)
        merged.merge(part, max_levels=100)
    assert merged.rows == whole.rows == 3000
    for name in features[:4]:
        got, expected = merged.columns[name], whole.columns[name]
        assert got.rows == got.count == expected.count == 3000
        assert got.mean == pytest.approx(expected.mean, rel=1e-13)
        assert got.m2 == pytest.approx(expected.m2, rel=1e-12)
        assert (got.minimum, got.maximum) == (expected.minimum, expected.maximum)
        values = frame.get_column(name).cast(pl.Float64).to_numpy()
        assert got.m2 == pytest.approx(np.sum((values - values.mean()) ** 2), rel=1e-12)
    assert (
        merged.columns["c"].levels == whole.columns["c"].levels == {"0": 1000, "1": 1000, "2": 1000}
    )
    y = frame.get_column("y")
    assert merged.labels == whole.labels == {0: int((y == 0).sum()), 1: int((y == 1).sum())}


@pytest.mark.parametrize("budget", [60_000, 10**9])  # many chunks (a ragged last one), or one
def test_stream_loss_equals_the_in_memory_loss(parts, tmp_path, budget):
    memory = load_memory(config_of(parts))
    stream = stream_of(parts, tmp_path / "cache", budget)
    assert stream.plan.terms == memory.plan.terms
    for got, expected in zip(
        stream.plan.term_mean_scale(), memory.plan.term_mean_scale(), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-13)
    w = np.array([[0.5], [-1.0], [2.0], [0.1]])
    with stream.loss() as loss:
        assert (len(loss._ranges) > 1) == (budget < 10**6)
        cost, dw, db = loss(w, 0.3, l2=0.7)
    expected = FusedLoss(memory.train.X, memory.train.Y)(w, 0.3, l2=0.7)
    assert cost == pytest.approx(expected[0], rel=1e-13)
    np.testing.assert_allclose(dw, expected[1], rtol=1e-12)
    assert db == pytest.approx(expected[2], rel=1e-12)


@pytest.mark.parametrize("optimizer", ["gd", "nesterov", "lbfgs"])
def test_every_optimizer_on_the_stream_gives_the_in_memory_fit(parts, tmp_path, optimizer):
    memory = load_memory(config_of(parts))
    stream = stream_of(parts, tmp_path / "cache", 60_000)
    # lbfgs stops on its iteration budget here, before rounding-level noise could
    # decide a line search either way.
    iterations = 12 if optimizer == "lbfgs" else 150
    settings = dict(learning_rate=0.5, iterations=iterations, l2=0.3, optimizer=optimizer)
    expected = fit(memory.train.X, memory.train.Y, **settings)
    with stream.loss(n_threads=2) as loss:
        got = fit_loss(loss, **settings)
    assert_same_fit(expected, got)


def test_stream_cache_is_reused_and_cleaned_up(parts, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = stream_of(parts, root, 60_000, cleanup=True)
    assert [p.name for p in root.iterdir()] == [first.path.name]  # no temporary left
    assert sorted(p.name for p in first.path.iterdir()) == [
        "meta.json",
        "train.npy",
        "validation.npy",
    ]
    cached = np.load(first.path / "train.npy", mmap_mode="r")
    assert np.load(first.path / "validation.npy").shape == (5, 0)  # nothing held out
    memory = load_memory(config_of(parts))
    # Standardized values: the statistics (other batches) differ in the last bits only.
    np.testing.assert_allclose(cached[:4], memory.train.X, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cached[4:], memory.train.Y)
    del cached

    import flows.backends.stream as stream_module

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt for an unchanged input")

    monkeypatch.setattr(stream_module, "_build_cache", must_not_rebuild)
    again = stream_of(parts, root, 60_000)
    assert again.path == first.path
    # A different dtype is a different cache.
    with pytest.raises(AssertionError, match="rebuilt"):
        stream_of(parts, root, 60_000, dtype="float32")
    first.close()
    assert not first.path.exists()


def test_stream_reports_bad_values_with_file_and_column(parts, tmp_path):
    bad = pl.read_parquet(parts / "part-2.parquet").with_columns(
        pl.when(pl.col("key") == 2900).then(None).otherwise(pl.col("f1")).alias("f1")
    )
    bad.write_parquet(parts / "part-2.parquet")
    with pytest.raises(DataError) as caught:
        stream_of(parts, tmp_path / "cache", 60_000)
    # One column with nulls: the error names it and the file where they are.
    assert caught.value.path.endswith("part-2.parquet")
    assert "null values in 1 column(s): 'f1' (1)" in str(caught.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_auto_backend_streams_what_does_not_fit_the_budget(parts):
    plan = plan_of(parts)
    config = dict(data=str(parts), output="out", label="y")
    needed = in_memory_bytes(plan, 3000, "float64")
    assert needed > 3000 * 6 * 8  # X, Y and the weights, plus one batch
    assert resolve_backend(TrainConfig(**config, memory_budget=needed), plan) == "memory"
    assert resolve_backend(TrainConfig(**config, memory_budget=needed - 1), plan) == "stream"
    assert resolve_backend(TrainConfig(**config, memory_budget="100kB"), plan) == "stream"
    assert resolve_backend(TrainConfig(**config, backend="stream"), plan) == "stream"


def test_dask_address_requires_the_dask_backend():
    with pytest.raises(ValueError, match="dask_address"):
        TrainConfig(data="d", output="o", backend="stream", dask_address="tcp://h:1")


def test_row_groups_split_into_contiguous_shards_in_input_order(parts):
    from flows.backends.dask_backend import split_pieces
    from flows.dataset import row_group_pieces

    plan = plan_of(parts)
    files = plan.files  # 3 files x 3 row groups (400, 400, 200 rows)
    pieces = row_group_pieces(plan, "split")
    shards = split_pieces(pieces, 2)
    flat = [piece for shard in shards for piece in shard]
    assert [(p.path, p.row_groups) for p in flat] == [(f, (g,)) for f in files for g in range(3)]
    # Each piece knows its rows' positions in the input: the split is the same as in memory.
    assert [p.first_row for p in flat] == list(np.cumsum([0] + [p.n_rows for p in flat])[:-1])
    assert len(shards) == 2 and all(shards)
    first_file = [p for p in pieces if p.path == files[0]]
    assert len(split_pieces(first_file, 5)) == 3  # never more shards than row groups


@pytest.mark.parametrize("optimizer", ["gd", "nesterov", "lbfgs"])
def test_every_optimizer_on_dask_gives_the_in_memory_fit(parts, dask_client, optimizer):
    memory = load_memory(config_of(parts))
    data = dask_of(parts, dask_client)
    try:
        assert len(data.workers) == 2 and data.n_examples == 3000
        assert data.plan.terms == memory.plan.terms
        for got, expected in zip(
            data.plan.term_mean_scale(), memory.plan.term_mean_scale(), strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-13)
        iterations = 12 if optimizer == "lbfgs" else 150
        settings = dict(learning_rate=0.5, iterations=iterations, l2=0.3, optimizer=optimizer)
        expected = fit(memory.train.X, memory.train.Y, **settings)
        got = fit_loss(data.loss(), **settings)
        assert_same_fit(expected, got)
        metrics = data.metrics(got.w, got.b)["train"]
        assert metrics["n_examples"] == 3000
        assert 0.5 < metrics["accuracy"] <= 1.0
    finally:
        data.close()


def test_a_lost_dask_worker_fails_the_run_with_a_clear_message(parts):
    pytest.importorskip("distributed")
    from flows.backends.dask_backend import WorkerLostError

    with local_dask_client() as client:  # its own: the test loses one of its workers
        data = dask_of(parts, client)

        def lose_a_worker(iteration, cost):
            if iteration == 3:
                client.retire_workers(workers=[data.workers[1]], close_workers=True)

        with pytest.raises(WorkerLostError, match="left the cluster with shard 1 of 2"):
            fit_loss(data.loss(), learning_rate=0.5, iterations=50, callback=lose_a_worker)
        data.close()


@pytest.mark.parametrize("backend", ["stream", "dask"])
def test_cli_backends_write_the_in_memory_params(prefect_api, parts, tmp_path, backend):
    pytest.importorskip("distributed")
    from tests.test_cli import run_cli

    # The default validation split: every backend holds out the same rows.
    common = ["train", "--data", parts, "--label", "y", "--iterations", "200", "--l2", "0.1"]
    assert run_cli(*common, "--output", tmp_path / "memory", "--backend", "memory") == 0
    flags = ["--backend", backend, "--memory-budget", "50kB", "--cache-dir", tmp_path / "cache"]
    flags += ["--cleanup-cache"] if backend == "stream" else ["--dask-workers", "2"]
    assert run_cli(*common, "--output", tmp_path / backend, *flags) == 0
    run = {d: latest(tmp_path / d) for d in ("memory", backend)}  # the stores' promoted runs
    expected = pl.read_parquet(run["memory"] / "params.parquet")
    got = pl.read_parquet(run[backend] / "params.parquet")
    assert got["term"].to_list() == expected["term"].to_list()
    np.testing.assert_allclose(got["estimate"], expected["estimate"], rtol=RTOL)
    costs = [pl.read_parquet(run[d] / "cost_history.parquet") for d in ("memory", backend)]
    np.testing.assert_allclose(costs[1]["cost"], costs[0]["cost"], rtol=RTOL)
    metrics = [
        {
            (split, metric): value
            for split, metric, value in pl.read_parquet(run[d] / "metrics.parquet").iter_rows()
        }
        for d in ("memory", backend)
    ]
    assert list(metrics[1]) == list(metrics[0])
    assert {split for split, _ in metrics[0]} == {"train", "validation"}
    assert metrics[0][("validation", "n_examples")] > 0
    for split in ("train", "validation"):
        auc = [m.pop((split, "roc_auc")) for m in metrics]
        assert auc[1] == pytest.approx(auc[0], abs=1e-4)  # from score histograms
    np.testing.assert_allclose(list(metrics[1].values()), list(metrics[0].values()), rtol=1e-12)
    if backend == "stream":  # --cleanup-cache: nothing left behind
        assert not any((tmp_path / "cache").iterdir())


def test_metrics_merged_over_pieces_equal_the_whole():
    from flows.backends.partial_metrics import merge_metrics, piece_sums
    from lr_kernel.metrics import binary_metrics

    rng = np.random.default_rng(5)
    Z = rng.normal(scale=3, size=(1, 20_000))
    Z[0, :50] = 40.0  # beyond the histogram's range: clamped, still ordered
    Y = (rng.random((1, 20_000)) < 1 / (1 + np.exp(-Z))).astype(np.float64)
    whole = binary_metrics(Z, Y)
    merged = merge_metrics(
        [piece_sums(Z[:, a:b], Y[:, a:b]) for a, b in [(0, 7), (7, 12_345), (12_345, 20_000)]]
    )
    assert list(merged) == list(whole)
    for name in whole:
        if name == "roc_auc":
            assert merged[name] == pytest.approx(whole[name], abs=1e-4)
        else:
            assert merged[name] == pytest.approx(whole[name], rel=1e-12)


def test_read_ahead_gives_every_item_in_order_and_an_error_in_its_place():
    from flows.backends.passes import read_ahead

    made = []

    def items():
        for i in range(6):
            made.append(i)
            yield i
        raise DataError("bad batch", path="part-9.parquet")

    got = []
    with pytest.raises(DataError, match="bad batch"):
        for item in read_ahead(items()):
            # The caller's item and at most the one being made: two alive at once.
            assert len(made) <= item + 2
            got.append(item)
    assert got == list(range(6))


def test_read_ahead_closes_the_items_when_the_caller_stops():
    from flows.backends.passes import read_ahead

    closed = []

    def items():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    for item in read_ahead(items()):
        if item == 3:
            break
    assert closed == [True]


def test_memory_rows_read_ahead_equal_the_plain_passes_bit_for_bit(tmp_path, monkeypatch):
    """Many small batches over many row groups and files, a held-out split and weights:
    ``X``, ``Y`` and the weights filled with read-ahead equal the plain sequential passes."""
    from flows.backends import passes
    from flows.backends.passes import learn, pieces_blocks, pieces_of, settings_of
    from flows.dataset import file_pieces
    from flows.features import PlanSettings

    directory = make_parts(tmp_path / "parts", rows=2000, files=3, row_group_rows=90)
    for path in sorted(directory.glob("*.parquet")):
        frame = pl.read_parquet(path)
        levels = (pl.col("key") * 7 % 5).cast(pl.String)
        frame = frame.with_columns(("v" + levels).alias("c"), (pl.col("key") % 4 + 1).alias("s"))
        frame.write_parquet(path, row_group_size=90)
    monkeypatch.setattr(PlanSettings, "batch_rows", lambda self, budget=0: 37)
    config = memory_config(
        directory,
        label="y",
        features=["f0", "f1", "f2", "f3", "c"],
        weight="s",
        validation_fraction=0.3,
    )
    data = load_memory(config)

    plan, validation = plan_run(config)
    prep = settings_of(config, plan)
    pieces = pieces_of(plan, validation, prep.validation_fraction, file_pieces)
    summaries = [passes.summarize_piece(piece, prep) for piece in pieces]
    feature_plan = learn(prep, [s[0] for s in summaries], [s[1] for s in summaries])[0]
    assert data.plan == feature_plan
    parts: dict[bool, list] = {False: [], True: []}
    for is_held_out, block in pieces_blocks(pieces, feature_plan, prep):
        parts[is_held_out].append(block)
    assert len(parts[False]) > 30 and data.held_out is not None
    for rows, blocks in ((data.train, parts[False]), (data.held_out, parts[True])):
        assert np.array_equal(rows.X, np.hstack([b.X for b in blocks]))
        assert np.array_equal(rows.Y, np.hstack([b.Y for b in blocks]))
        assert np.array_equal(rows.weight, np.hstack([b.weight for b in blocks]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_memory_matrix_is_a_writable_c_array_in_small_pages(dtype):
    from flows.backends.memory import small_pages_empty

    X = small_pages_empty((3, 1 << 20), np.dtype(dtype))  # 12 or 24 MiB: NumPy would madvise
    assert X.shape == (3, 1 << 20) and X.dtype == dtype
    assert X.flags.c_contiguous and X.flags.writeable
    X[:] = 1.5
    assert float(X.sum()) == 1.5 * 3 * (1 << 20)
    assert small_pages_empty((0, 5), np.dtype(dtype)).shape == (0, 5)
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return
    start = X.__array_interface__["data"][0]
    lines = smaps.read_text().splitlines()
    for i, line in enumerate(lines):
        low, _, high = line.partition(" ")[0].partition("-")
        if "-" in line.split(" ")[0] and int(low, 16) <= start < int(high, 16):
            fields = dict(f.split(":", 1) for f in lines[i + 1 : i + 25] if ":" in f)
            assert fields["AnonHugePages"].strip() == "0 kB"
            assert "nh" in fields.get("VmFlags", "")  # MADV_NOHUGEPAGE
            break
    else:
        pytest.fail("the matrix's mapping is not in /proc/self/smaps")

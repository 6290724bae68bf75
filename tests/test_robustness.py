"""Nothing lost, nothing half-written: bad inputs, output sets under crashes, divergence."""

import datetime
import decimal
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import outputs
from flows.cli import main
from flows.dataset import plan_inputs, resolve_files
from flows.errors import DataError, DivergedError
from flows.outputs import (
    MANIFEST_NAME,
    STAGING_PREFIX,
    read_manifest,
    read_metadata,
    recover_output_set,
    verify_output_set,
    write_output_set,
)
from flows.store import latest
from lr_kernel import fit, loss_and_gradients
from lr_kernel.stepsize import gram_largest_eigenvalue, stable_learning_rate
from tests.conftest import load, load_memory, memory_config

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"x": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]}


def run_cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def table(path: Path, columns: dict | pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(columns if isinstance(columns, pa.Table) else pa.table(columns), path)
    return path


def _junk_dir(t):
    table(t / "d" / "a.parquet", GOOD)
    (t / "d" / "b.parquet").write_text("id,label\n1,0\n")
    return t / "d", []


def _many_files_one_bad(t):
    for i in range(300):
        x = [1.0, None] if i == 217 else [1.0, 2.0]
        table(t / "d" / f"part-{i:04d}.parquet", {"x": x, "label": [0, 1]})
    return t / "d", []


def _broken_link(t):
    table(t / "d" / "a.parquet", GOOD)
    (t / "d" / "b.parquet").symlink_to(t / "nowhere.parquet")
    return t / "d", []


def _glob_of_directories(t):
    (t / "d" / "x.parquet").mkdir(parents=True)
    return str(t / "d" / "*.parquet"), []


def _dir_named_parquet(t):
    (t / "x.parquet").mkdir()
    return t / "x.parquet", []


def _one(columns, *extra):
    return lambda t: (table(t / "a.parquet", columns), list(extra))


# Held-out bad inputs beyond design.md section 5's list, each through the real CLI:
# (make(tmp_path) -> (data, extra flags), expected part of the one-line message).
BAD_CLI_INPUTS = {
    "parquet mixed with junk": (_junk_dir, r"b\.parquet: not a readable Parquet file"),
    "zero-byte file": (
        lambda t: ((t / "a.parquet").write_bytes(b""), t / "a.parquet", [])[1:],
        r"a\.parquet: not a readable Parquet file",
    ),
    "directory named x.parquet": (_dir_named_parquet, "directory holds no"),
    "glob matching only directories": (_glob_of_directories, "no file matches"),
    "broken symlink among the files": (_broken_link, r"b\.parquet: broken symbolic link"),
    "device instead of a file": (lambda t: ("/dev/null", []), "not a regular file"),
    "300 files, one with a null": (
        _many_files_one_bad,
        r"part-0217\.parquet: null values in 1 column\(s\): 'x' \(1\)",
    ),
    "zero columns": (_one(pa.table({})), "file has no columns"),
    "duplicate column names in the file": (
        _one(
            pa.Table.from_arrays(
                [pa.array([1.0]), pa.array([2.0]), pa.array([0])], ["x", "x", "label"]
            )
        ),
        "not a readable Parquet file",
    ),
    "label of nulls only": (
        _one({"x": [1.0, 2.0], "label": pa.array([None, None], pa.int64())}),
        "column 'label': label has 2 null values",
    ),
    "label of null type": (
        _one({"x": [1.0, 2.0], "label": pa.array([None, None], pa.null())}),
        "column 'label': label holds only null values",
    ),
    "list label": (_one({"x": [1.0, 2.0], "label": [[0], [1]]}), "label has type List"),
    "struct label": (_one({"x": [1.0, 2.0], "label": [{"a": 0}, {"a": 1}]}), "type Struct"),
    "binary label": (_one({"x": [1.0, 2.0], "label": [b"n", b"y"]}), "label has type Binary"),
    "NaN label": (
        _one({"x": [1.0, 2.0, 3.0], "label": [0.0, math.nan, 1.0]}),
        "column 'label': 1 NaN or infinite",
    ),
    "boolean label with one value": (
        _one({"x": [1.0, 2.0], "label": [True, True]}),
        "label has one value",
    ),
    "list feature": (
        _one({"x": [[1.0], [2.0]], "label": [0, 1]}, "--features", "x"),
        "column 'x': feature has type List",
    ),
    "struct feature": (
        _one({"x": [{"a": 1}, {"a": 2}], "label": [0, 1]}, "--features", "x"),
        "feature has type Struct",
    ),
    "date feature": (
        _one({"x": [datetime.date(2020, 1, 1)] * 2, "label": [0, 1]}, "--features", "x"),
        "feature has type Date",
    ),
    "datetime feature": (
        _one({"x": [datetime.datetime(2020, 1, 1)] * 2, "label": [0, 1]}, "--features", "x"),
        "feature has type Datetime",
    ),
    "decimal beyond 38 digits": (
        _one({"x": pa.array([decimal.Decimal(10**70)] * 2, pa.decimal256(76, 0)), "label": [0, 1]}),
        r"a\.parquet: column 'x': cannot read data \(decimal precision 76",
    ),
    "values that overflow the standardization": (
        _one({"x": [1e200, -1e200, 0.0], "label": [0, 1, 0]}),
        "values too large to standardize",
    ),
    "values beyond float32": (
        # Nothing held out: with two rows, the split could leave a class without training rows.
        _one(
            {"x": [1e39, 1.0], "label": [0, 1]},
            *("--dtype", "float32", "--no-standardize", "--validation-fraction", "0"),
        ),
        "column 'x': values exceed the float32 range",
    ),
    "duplicate --features": (_one(GOOD, "--features", "x,x"), "features repeats x"),
    "empty --features": (_one(GOOD, "--features", ""), "features must name at least one"),
    "unicode column missing": (
        _one({"größe ✓": [1.0, 2.0], "label": [0, 1]}, "--features", "größe ✓,höhe"),
        r"column 'höhe': feature not found \(columns: größe ✓, label\)",
    ),
    "newline in a column name": (
        _one({"x\nevil": [1.0, 2.0], "y": [0, 1]}),
        r"label column 'label' not found \(columns: x\\nevil, y\)",
    ),
    "empty --data": (lambda t: ("", []), "data: String should have at least 1 character"),
    "learning rate NaN": (_one(GOOD, "--learning-rate", "nan"), "learning_rate: Value error"),
    "learning rate word": (
        _one(GOOD, "--learning-rate", "fast"),
        "positive finite number or 'auto'",
    ),
    "infinite l2": (_one(GOOD, "--l2", "inf"), "l2: Value error, must be a finite number >= 0"),
    "negative tol": (_one(GOOD, "--tol", "-1"), "tol: Input should be greater than or equal to 0"),
    "positive label absent": (
        _one({"x": [1.0, 2.0], "label": ["a", "b"]}, "--positive-label", "c"),
        "positive label 'c' is not one of its values",
    ),
}


@pytest.mark.parametrize("case", BAD_CLI_INPUTS, ids=list(BAD_CLI_INPUTS))
def test_held_out_bad_input_gets_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    make, message = BAD_CLI_INPUTS[case]
    data, extra = make(tmp_path)
    out = tmp_path / "out"
    status = run_cli("train", "--data", data, "--output", out, *extra)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("lrflow: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_output_inside_the_data_directory_is_refused(tmp_path, capsys):
    table(tmp_path / "d" / "a.parquet", GOOD)
    for data, out in [
        (tmp_path / "d", tmp_path / "d" / "results"),
        (tmp_path / "d", tmp_path / "d"),
        (str(tmp_path / "d" / "**" / "*.parquet"), tmp_path / "d" / "results"),
    ]:
        assert run_cli("train", "--data", data, "--output", out) == 2
        assert "the next run would read its results as training data" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.parquet"]


def test_unreadable_file_and_directory_are_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = table(tmp_path / "d" / "sub" / "a.parquet", GOOD)
    path.chmod(0)
    with pytest.raises(DataError, match=r"a\.parquet: cannot read file \(Permission denied\)"):
        plan_inputs(path)
    path.chmod(0o644)
    (tmp_path / "d" / "sub").chmod(0)
    try:
        with pytest.raises(DataError, match=r"sub: cannot list directory \(Permission denied\)"):
            resolve_files(tmp_path / "d")
    finally:
        (tmp_path / "d" / "sub").chmod(0o755)


def test_permission_errors_are_translated(tmp_path, monkeypatch):
    """The same translation as above, provoked without relying on the user id."""
    path = table(tmp_path / "d" / "sub" / "a.parquet", GOOD)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pl, "read_parquet_schema", denied)
    with pytest.raises(DataError, match=r"a\.parquet: cannot read file \(Permission denied\)"):
        plan_inputs(path)
    real_scandir = os.scandir

    def scandir(directory):
        if Path(directory).name == "sub":
            raise PermissionError(13, "Permission denied", str(directory))
        return real_scandir(directory)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"sub: cannot list directory \(Permission denied\)"):
        resolve_files(tmp_path / "d")


def test_odd_but_valid_inputs_load_correctly(tmp_path):
    """Decimal and unicode features, a nested directory named x.parquet, and other
    writers' hidden or underscore-prefixed files (ignored, as Spark and pyarrow do)."""
    x = [decimal.Decimal("1.25"), decimal.Decimal("-2.50"), decimal.Decimal("3.00")]
    columns = {"größe ✓": pa.array(x, pa.decimal128(5, 2)), "label": ["n", "y", "n"]}
    table(tmp_path / "d" / "x.parquet" / "part-0.parquet", columns)
    (tmp_path / "d" / "_temporary").mkdir()
    (tmp_path / "d" / "_temporary" / "part-1.parquet").write_text("half written")
    (tmp_path / "d" / ".staging").mkdir()
    (tmp_path / "d" / ".staging" / "part-2.parquet").write_text("half written")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    data = load(tmp_path / "d", standardize=False)
    assert [p.name for p in data.files] == ["part-0.parquet"]
    assert data.plan.terms == ("größe ✓",)
    # exact: all are binary fractions
    np.testing.assert_array_equal(data.train.X, [[1.25, -2.5, 3.0]])
    np.testing.assert_array_equal(data.train.Y, [[0.0, 1.0, 0.0]])


def test_a_missing_file_exits_2_in_a_real_process_and_prints_no_traceback(tmp_path):
    path = table(tmp_path / "a.parquet", {"x": [1.0, 2.0], "label": [[0], [1]]})
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--data", path, "--output", tmp_path / "o"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"lrflow: error: {path}: column 'label': label has type List(Int64), not boolean, "
        "integer, float, decimal, string, categorical, date or time"
    ]
    assert not (tmp_path / "o").exists()


# --- output sets ----------------------------------------------------------------------


def _tables(tag: str) -> dict[str, pa.Table]:
    meta = {b"lrflow": json.dumps({"run_id": tag}).encode()}
    return {
        name: pa.table(
            {"value": [float(i)] * (3 + i), "tag": [tag] * (3 + i)}
        ).replace_schema_metadata(meta)
        for i, name in enumerate(["params.parquet", "cost_history.parquet", "metrics.parquet"])
    }


def assert_consistent(out: Path) -> str:
    """The directory holds one complete set: manifest, sizes, checksums and run ids agree."""
    manifest = verify_output_set(out)
    for entry in manifest.files:
        if entry.name.endswith(".parquet"):  # the picture has no metadata, only its checksum
            assert read_metadata(out / entry.name)["run_id"] == manifest.run_id
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    return manifest.run_id


def test_the_manifest_is_written_last_and_describes_the_set(tmp_path):
    out = tmp_path / "out"
    manifest = write_output_set(out, _tables("run-1"), run_id="run-1")
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST_NAME, "cost_history.parquet", "metrics.parquet", "params.parquet",
    ]  # fmt: skip
    assert read_manifest(out) == manifest
    assert [f.name for f in manifest.files] == [
        "params.parquet",
        "cost_history.parquet",
        "metrics.parquet",
    ]
    for entry in manifest.files:
        assert entry.size == (out / entry.name).stat().st_size
    # The manifest is the newest entry of the directory.
    newest = max(out.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST_NAME
    assert assert_consistent(out) == "run-1"
    raw = bytearray((out / "metrics.parquet").read_bytes())
    raw[-10] ^= 0xFF
    (out / "metrics.parquet").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"metrics\.parquet: size or checksum differs"):
        verify_output_set(out)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match="no _SUCCESS manifest"):
        verify_output_set(out)


class Crash(BaseException):
    """Stands in for the process dying: nothing after it runs."""


# os.replace calls of one write: each staged file into place (flows.durable), the
# staged manifest last (the set is then complete), then the commit: three data files
# and the manifest.
@pytest.mark.parametrize(
    ("crash_at", "survivor"), [(k, "old") for k in range(1, 5)] + [(k, "new") for k in range(5, 9)]
)
def test_a_crash_at_every_rename_leaves_one_whole_set(tmp_path, monkeypatch, crash_at, survivor):
    out = tmp_path / "out"
    write_output_set(out, _tables("old"), run_id="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == crash_at:
            raise Crash
        real_replace(source, target)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(Crash):
        write_output_set(out, _tables("new"), run_id="new")
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    if survivor == "old":  # the new set was not complete: the old one is untouched
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    else:  # mid-commit there is no manifest: consumers see "being replaced", never a mix
        assert read_manifest(out) is None
    recover_output_set(out)
    assert assert_consistent(out) == survivor


def test_a_crash_while_staging_leaves_the_earlier_set_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_output_set(out, _tables("old"), run_id="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write, calls = pq.write_table, []

    def write_some_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(*args, **kwargs)

    monkeypatch.setattr(outputs.pq, "write_table", write_some_then_crash)
    with pytest.raises(OSError, match="No space left"):
        write_output_set(out, _tables("new"), run_id="new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A writer killed while staging cannot clean up; the next one does.
    staging = out / f"{STAGING_PREFIX}dead"
    staging.mkdir()
    (staging / "params.parquet").write_bytes(b"PAR1 half")
    recover_output_set(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


WRITER = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    from flows.backends import open_training_data, plan_run
    from flows.config import TrainConfig
    from flows.outputs import write_run_outputs
    from lr_kernel import fit

    data, out, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    config = TrainConfig(data=data, output=str(out), iterations=5, backend="memory")
    print("ready", flush=True)
    for k in range(1_000_000):
        dataset = open_training_data(config, *plan_run(config))
        rows = dataset.train
        result = fit(rows.X, rows.Y, learning_rate=0.5, iterations=1 + k % 7)
        write_run_outputs(out, dataset, result, config, started_at=datetime.now(timezone.utc),
                          run_id=f"{name}-{k:07d}")
    """
)


def test_kill_9_at_random_moments_never_leaves_a_partial_or_mixed_set(tmp_path, small_frame):
    """Two writers into one directory (the lock serializes them), each killed with
    SIGKILL at a random moment, over and over: after every round each file under a
    final name is whole, the manifest (when present) matches the files, and the
    next writer's recovery always finds one complete set, never an older one."""
    data = table(tmp_path / "in" / "a.parquet", pa.table(pl.DataFrame(small_frame).to_arrow()))
    out = tmp_path / "out"
    rng = random.Random(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    committed: dict[str, int] = {}  # writer name -> last run number seen committed
    for round_ in range(6):
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(data), str(out), f"w{round_}{j}"],
                stdout=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )
            for j in range(2)
        ]
        for writer in writers:
            assert writer.stdout.readline() == b"ready\n"
        for writer in rng.sample(writers, 2):
            time.sleep(rng.uniform(0.0, 0.4))
            writer.send_signal(signal.SIGKILL)
        for writer in writers:
            assert writer.wait(timeout=30) == -signal.SIGKILL
        for path in out.glob("*.parquet") if out.exists() else []:
            pq.read_table(path)  # whole: a torn file would not parse
        if out.exists() and read_manifest(out) is not None:
            verify_output_set(out)
        recover_output_set(out)
        if not out.exists() or read_manifest(out) is None:
            assert not committed, "a committed set was lost"
            continue
        run_id = assert_consistent(out)
        name, number = run_id.rsplit("-", 1)
        assert int(number) >= committed.get(name, 0)
        committed[name] = int(number)


# --- divergence and the stable step -------------------------------------------------------


def _gram(X):
    Xa = np.vstack([X, np.ones((1, X.shape[1]))])
    return Xa @ Xa.T / X.shape[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(6))
def test_power_iteration_matches_eigvalsh(seed, dtype):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 40)), int(rng.integers(1, 400))
    X = rng.normal(size=(n, m)) * rng.lognormal(0, 2, size=(n, 1)) + rng.normal(0, 3, size=(n, 1))
    if seed % 2:
        X[: n // 2] = X[0]  # repeated rows: a degenerate spectrum
    X = X.astype(dtype)
    exact = np.linalg.eigvalsh(_gram(X.astype(np.float64)))[-1]
    estimate = gram_largest_eigenvalue(X)
    rtol = 1e-5 if dtype == np.float64 else 1e-4  # float32 products carry ~1e-7 relative error
    assert estimate == pytest.approx(exact, rel=rtol)
    assert estimate <= exact * (1 + rtol)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 8),
    m=st.integers(2, 60),
    scale=st.floats(1e-3, 1e3),
    l2=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_stable_learning_rate_never_raises_the_cost(n, m, scale, l2, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(rng.normal(0, 3, size=(n, 1)), 1.0, size=(n, m)) * scale
    Y = (rng.random((1, m)) < 0.5).astype(np.float64)
    learning_rate = stable_learning_rate(X, l2)
    exact = np.linalg.eigvalsh(_gram(X))[-1] / 4 + l2 / m
    # 1/L up to rounding (1e-12), and below the stability limit 2/L.
    assert (1 - 1e-12) / exact <= learning_rate < 2 / exact
    result = fit(X, Y, learning_rate=learning_rate, iterations=50, l2=l2)
    assert result.stop_reason != "diverged"
    steps = np.diff(result.cost_history)
    assert np.all(steps <= 1e-12 * result.cost_history[:-1])  # monotone up to rounding


def test_divergence_names_a_stable_rate_that_then_trains(tmp_path):
    from flows.train import fit_dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 500)) * [[100.0], [3.0]]
    label = (x[0] / 100 + x[1] / 3 + rng.normal(size=500)) > 0
    path = table(tmp_path / "d.parquet", {"x0": x[0], "x1": x[1], "label": label})
    config = memory_config(
        path, output=str(tmp_path / "o"), learning_rate=10.0, standardize=False, optimizer="gd"
    )
    dataset = load_memory(config)
    with pytest.raises(DivergedError) as raised:
        fit_dataset(dataset, config)
    message = str(raised.value)
    assert "learning rate 10 is too large" in message and "--learning-rate auto" in message
    suggested = float(re.search(r"; ([0-9.e+-]+) is stable for it", message).group(1))
    # 3 digits shown
    assert suggested == pytest.approx(stable_learning_rate(dataset.train.X), rel=1e-2)
    result = fit_dataset(
        dataset, config.model_copy(update={"learning_rate": suggested, "iterations": 200})
    )
    assert result.stop_reason != "diverged"
    assert np.all(np.diff(result.cost_history) <= 1e-12)
    auto = fit_dataset(
        dataset, config.model_copy(update={"learning_rate": "auto", "iterations": 200})
    )
    assert auto.cost_history[-1] < auto.cost_history[0]
    cost, _, _ = loss_and_gradients(dataset.train.X, dataset.train.Y, auto.w, auto.b)
    assert cost == pytest.approx(auto.cost_history[-1], rel=1e-12)


def test_learning_rate_auto_runs_and_records_the_number(prefect_api, sample_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--learning-rate", "auto", "--optimizer", "gd", "--exclude", "id"]
    assert run_cli("train", "--data", sample_file, "--output", out, *args) == 0
    out = latest(out)  # the run's directory in the store
    meta = read_metadata(out / "params.parquet")
    dataset = load(sample_file, validation_fraction=0.2, exclude=["id"])  # the CLI's default
    # 1/L of the training rows: L the exact largest eigenvalue of the Hessian at zero.
    exact = 4 / np.linalg.eigvalsh(_gram(dataset.train.X))[-1]
    assert meta["config"]["learning_rate"] == pytest.approx(exact, rel=1e-12)
    assert meta["config"]["learning_rate"] == dataset.stable_learning_rate(0.0)
    assert meta["fit"]["stop_reason"] != "diverged"
    assert assert_consistent(out) == meta["run_id"]
    assert "wrote " + str(out / MANIFEST_NAME) in capsys.readouterr().out

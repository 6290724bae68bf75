"""The CLI contract end to end: flags, outputs, scikit-learn parity, and clean failures."""

import contextlib
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from flows.cli import heartbeat_not_awaited, main
from flows.dataset import held_out
from flows.outputs import read_metadata
from flows.store import latest
from tests.conftest import real_binary_dataset, write_parquet

OUTPUT_FILES = [
    "_SUCCESS",
    "cost_history.parquet",
    "cost_history.png",
    "metrics.parquet",
    "params.parquet",
]


def run_cli(*args):
    """Run `lrflow ...` in-process; returns the exit status."""
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def test_help_lists_the_contracted_flags(capsys):
    assert run_cli("--help") == 0
    assert "train" in capsys.readouterr().out
    assert run_cli("train", "--help") == 0
    text = capsys.readouterr().out
    for flag in [
        "--data", "--output", "--label", "--features", "--iterations", "--learning-rate",
        "--l2", "--tol", "--no-standardize", "--dtype", "--positive-label", "--optimizer",
        "--threads", "--engine",
    ]:  # fmt: skip
        assert flag in text


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run(
        [sys.executable, "-m", "flows.train", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--learning-rate" in done.stdout


def test_train_writes_the_contracted_outputs(prefect_api, sample_file, tmp_path, capsys):
    out = tmp_path / "out"
    status = run_cli(
        "train", "--data", sample_file, "--output", out, "--iterations", "500", "--l2", "0.1",
        "--exclude", "id",
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "runs", "runs.parquet"]
    run = latest(out)
    assert sorted(p.name for p in run.iterdir()) == OUTPUT_FILES
    params = pl.read_parquet(run / "params.parquet")
    assert params.columns == [
        "term", "estimate", "std_error", "z_value", "p_value", "ci_lower", "ci_upper",
    ]  # fmt: skip
    assert params["term"].to_list() == ["x1", "x2", "(Intercept)"]
    history = pl.read_parquet(run / "cost_history.parquet")
    assert history["iteration"].to_list() == list(range(history.height))
    assert history["cost"][0] == pytest.approx(np.log(2))
    assert np.all(np.diff(history["cost"].to_numpy()) <= 1e-15)  # stable step: never rises
    metrics = pl.read_parquet(run / "metrics.parquet")
    assert {"log_loss", "accuracy"} <= set(metrics["metric"].to_list())
    assert metrics.filter(pl.col("metric") == "weighted")["value"].to_list() == [0.0, 0.0]
    meta = read_metadata(run / "params.parquet")
    assert meta["format_version"] == 2
    assert meta["features"] == meta["columns"] == ["x1", "x2"]
    assert meta["feature_plan"]["terms"] == ["x1", "x2"]
    assert meta["feature_plan"]["left_out"] == [
        {"name": "label", "reason": "label"},
        {"name": "id", "reason": "in --exclude"},
    ]
    assert meta["label_mapping"] == {"negative": False, "positive": True, "dtype": "Boolean"}
    assert meta["config"]["l2"] == 0.1
    # The default validation split holds out about 20%: the rows the seed's hash picks.
    n_held_out = int(np.count_nonzero(held_out("split", 0, 40, 0.2, seed=0)))
    assert 0 < n_held_out < 20
    assert meta["n_examples"] == 40 - n_held_out
    assert meta["validation"]["n_examples"] == n_held_out
    assert meta["input_files"] == [str(sample_file)]
    for key in ("feature_mean", "feature_scale", "input_fingerprint", "versions", "started_at"):
        assert key in meta
    printed = capsys.readouterr().out
    assert f"trained on {40 - n_held_out} examples x 2 terms" in printed
    assert "column 'id': left out (in --exclude)" in printed


def _real_dataset(name):
    data, label = real_binary_dataset(name)
    names = [f"f{j}" for j in range(data.shape[1])]
    columns = {name: data[:, j] for j, name in enumerate(names)}
    return columns, label


@pytest.mark.parametrize(
    ("dataset", "optimizer"),
    [("breast_cancer", "gd"), ("wine", "gd"), ("breast_cancer", "nesterov"), ("wine", "lbfgs")],
)
def test_parameters_match_scikit_learn_on_real_data(
    prefect_api, tmp_path, dataset, optimizer, capsys
):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    columns, label = _real_dataset(dataset)
    path = write_parquet(tmp_path / "real.parquet", {**columns, "target": label})
    out = tmp_path / "out"
    l2 = 1.0
    status = run_cli(
        "train", "--data", path, "--output", out, "--label", "target", "--l2", l2,
        "--iterations", 200_000, "--learning-rate", 1.0, "--tol", 1e-15,
        "--optimizer", optimizer,
        "--validation-fraction", 0,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    raw = np.column_stack(list(columns.values()))  # (m, n)
    meta = read_metadata(latest(out) / "params.parquet")
    positive = meta["label_mapping"]["positive"]
    y = (label == positive).astype(int)
    scaler = StandardScaler().fit(raw)
    oracle = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=100_000)
    oracle.fit(scaler.transform(raw), y)
    expected = oracle.predict_proba(scaler.transform(raw))[:, 1]
    estimate = pl.read_parquet(latest(out) / "params.parquet")["estimate"].to_numpy()
    ours = 1 / (1 + np.exp(-(raw @ estimate[:-1] + estimate[-1])))  # raw scale, no state
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_both_kernel_engines_train_the_same_model(prefect_api, sample_file, tmp_path, capsys):
    estimates = {}
    for engine in ("numpy", "numba"):
        out = tmp_path / engine
        status = run_cli(
            "train", "--data", sample_file, "--output", out, "--iterations", "300",
            "--threads", "2", "--engine", engine, "--exclude", "id",
        )  # fmt: skip
        assert status == 0, capsys.readouterr().err
        assert read_metadata(latest(out) / "params.parquet")["config"]["engine"] == engine
        estimates[engine] = pl.read_parquet(latest(out) / "params.parquet")["estimate"].to_numpy()
    np.testing.assert_allclose(estimates["numba"], estimates["numpy"], rtol=1e-9, atol=1e-12)


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("columns", "extra", "message"),
    [
        ({"x": [1.0, 2.0], "label": [1, 1]}, [], "column 'label': label has one value"),
        ({"x": [1.0, None], "label": [0, 1]}, [], "null values in 1 column(s): 'x' (1)"),
        (
            {"x": [date(2020, 1, 1)] * 2, "label": [0, 1]},
            ["--features", "x"],
            "column 'x': feature has type Date",
        ),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--label", "y"], "label column 'y' not found"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--learning-rate", "-1"], "learning_rate"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--iterations", "0"], "iterations"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--dtype", "float16"], "dtype"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--optimizer", "adam"], "optimizer"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--threads", "0"], "threads"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--engine", "cuda"], "engine"),
        ({"x": [1.0, 2.0], "label": [0, 1]}, ["--iterations", "many"], "--iterations"),
    ],
)
def test_bad_input_fails_with_one_line_and_touches_nothing(
    prefect_api, tmp_path, capsys, columns, extra, message
):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.parquet").write_bytes(b"an earlier run's file")
    before = _snapshot(out)
    status = run_cli("train", "--data", path, "--output", out, *extra)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("lrflow: error: ")
    assert message in err
    assert "Traceback" not in err
    assert _snapshot(out) == before


def test_missing_data_fails_before_prefect_starts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--data", tmp_path / "none.parquet",
         "--output", tmp_path / "out"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lrflow: error: {tmp_path / 'none.parquet'}: no such file or directory"
    ]
    assert "prefect" not in done.stdout.lower()
    assert not (tmp_path / "out").exists()


def test_divergence_fails_the_run_and_writes_nothing(prefect_api, tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = write_parquet(
        tmp_path / "d.parquet",
        {"x": rng.normal(size=500) * 100, "label": rng.integers(0, 2, size=500)},
    )
    status = run_cli(
        "train", "--data", path, "--output", tmp_path / "out", "--no-standardize",
        "--learning-rate", "10", "--optimizer", "gd",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert "training diverged" in err and "learning rate 10 is too large" in err
    assert not (tmp_path / "out").exists()


def test_params_parquet_is_readable_by_pyarrow_alone(prefect_api, sample_file, tmp_path):
    out = tmp_path / "out"
    args = ["--iterations", "20", "--exclude", "id"]
    assert run_cli("train", "--data", sample_file, "--output", out, *args) == 0
    table = pq.read_table(latest(out) / "params.parquet")
    assert table.schema.field("estimate").type == "double"
    assert b"lrflow" in table.schema.metadata


def test_cli_flow_runs_end_without_waiting_for_the_heartbeat(
    prefect_api, sample_file, tmp_path, monkeypatch
):
    # Prefect's sync engine would join its heartbeat thread (sleeping in 1 s
    # steps) at the run's end; the command's runs do not. The hook must exist
    # in the installed Prefect, or the change has silently stopped working.
    import prefect.flow_engine as engine

    original = engine._send_heartbeats
    joins = []

    @contextlib.contextmanager
    def recording(run_engine, join_on_exit=True):
        joins.append(join_on_exit)
        with original(run_engine, join_on_exit=join_on_exit):
            yield

    monkeypatch.setattr(engine, "_send_heartbeats", recording)
    assert (
        run_cli("train", "--data", sample_file, "--exclude", "id", "--output", tmp_path / "o") == 0
    )
    assert joins == [False]
    assert engine._send_heartbeats is recording  # put back after the run
    with heartbeat_not_awaited():
        assert engine._send_heartbeats is not recording
    assert engine._send_heartbeats is recording

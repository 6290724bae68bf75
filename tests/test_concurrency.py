"""Concurrent `lrflow train` processes: shared or own Prefect servers, one model store."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.dataset import held_out
from flows.locks import exclusive_lock
from flows.outputs import STAGING_PREFIX, read_metadata, verify_output_set
from flows.store import RUNS_DIR, latest, read_history

ROOT = Path(__file__).resolve().parents[1]
# The sample's 40 rows that the default split (20%, seed 0) holds out.
N_HELD_OUT = int(np.count_nonzero(held_out("split", 0, 40, 0.2, seed=0)))


def _base_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_API_") and key != "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    }
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}


def _run_all(runs, sample_file) -> None:
    """Start every ``(env, output, iterations)`` run at once; all must succeed."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "train", "--exclude", "id",
             "--data", str(sample_file), "--output", str(out), "--iterations", str(iterations),
             "--tol", "0"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for env, out, iterations in runs
    ]  # fmt: skip
    results = [process.communicate(timeout=400) for process in processes]
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert f"trained on {40 - N_HELD_OUT} examples" in stdout  # less the validation split


def _assert_every_run_in_the_store(store: Path, iterations: set[int]) -> None:
    """Each concurrent run has its complete set and its row; latest.json names one of them."""
    history = read_history(store)
    assert history.num_rows == len(iterations)
    runs = sorted(p.name for p in (store / RUNS_DIR).iterdir())
    assert sorted(history.column("run").to_pylist()) == runs
    assert sum(history.column("promoted").to_pylist()) >= 1  # the first of them, at least
    found = set()
    for name in runs:
        found |= _assert_one_complete_set(store / RUNS_DIR / name, iterations)
    assert found == iterations
    assert latest(store).name in runs


def _assert_one_complete_set(out: Path, possible_iterations: set[int]) -> set[int]:
    manifest = verify_output_set(out)
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    iterations = set()
    assert {e.name for e in manifest.files} >= {"params.parquet", "cost_history.png"}
    for entry in manifest.files:
        if not entry.name.endswith(".parquet"):
            continue  # the picture carries no metadata; its checksum is in the manifest
        meta = read_metadata(out / entry.name)
        assert meta["run_id"] == manifest.run_id  # every file from the same run
        iterations.add(meta["config"]["iterations"])
    assert len(iterations) == 1 and iterations <= possible_iterations
    assert pl.read_parquet(out / "cost_history.parquet").height == next(iter(iterations)) + 1
    return iterations


def test_four_runs_on_one_server_three_into_one_directory(prefect_api, sample_file, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = _base_env() | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    same, own = tmp_path / "same", tmp_path / "own"
    _run_all([(env, same, 30), (env, own, 40), (env, same, 50), (env, same, 60)], sample_file)
    _assert_every_run_in_the_store(same, {30, 50, 60})
    _assert_every_run_in_the_store(own, {40})


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LRFLOW_SLOW_TESTS"),
    reason="4 Prefect server start-ups: set LRFLOW_SLOW_TESTS=1",
)
def test_four_runs_with_their_own_ephemeral_servers_on_a_fresh_database(sample_file, tmp_path):
    """The default set-up of four `lrflow train` started at once: each process starts
    an ephemeral server on the same, still empty, SQLite database in PREFECT_HOME.
    Unserialized, they fail on migrations and start-up timeouts (flows.locks)."""
    env = _base_env() | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    same, own = tmp_path / "same", tmp_path / "own"
    _run_all([(env, same, 30), (env, own, 40), (env, same, 50), (env, same, 60)], sample_file)
    _assert_every_run_in_the_store(same, {30, 50, 60})
    _assert_every_run_in_the_store(own, {40})


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.locks import exclusive_lock
    with exclusive_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_the_lock_waits_for_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE, cwd=ROOT, env=_base_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        killer = subprocess.Popen(
            [sys.executable, "-c", f"import os, time; time.sleep(0.5); os.kill({holder.pid}, 9)"]
        )
        with exclusive_lock(tmp_path):  # waits until kill -9 releases the holder's lock
            waited = time.monotonic() - started
        killer.wait(timeout=10)
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert waited >= 0.4  # 0.5 s sleep, less timer slack
        assert list(tmp_path.iterdir()) == []  # a directory lock leaves no lock file
    finally:
        holder.kill()

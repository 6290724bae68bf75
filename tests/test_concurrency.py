"""Concurrent `lrflow train` processes: own ephemeral servers and a shared one, same output dir."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from flows.outputs import STAGING_PREFIX, read_metadata, verify_output_set

ROOT = Path(__file__).resolve().parents[1]


def test_four_concurrent_runs_all_finish_and_never_interleave(prefect_api, sample_file, tmp_path):
    """Two processes start their own ephemeral servers on one SQLite database (the
    harness's, already migrated), two talk to the harness's server; three of them
    write into the same directory. All must succeed, and that directory must hold
    exactly one run's complete set."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL

    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_API_") and key != "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    }
    base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    ephemeral = base | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": PREFECT_SERVER_DATABASE_CONNECTION_URL.value(),
    }
    shared = base | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    same, own = tmp_path / "same", tmp_path / "own"
    runs = [(ephemeral, same, 30), (ephemeral, own, 40), (shared, same, 50), (shared, same, 60)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "train",
                "--data",
                str(sample_file),
                "--output",
                str(out),
                "--iterations",
                str(iterations),
                "--tol",
                "0",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env, out, iterations in runs
    ]
    results = [process.communicate(timeout=240) for process in processes]
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "trained on 40 examples" in stdout
    for out, possible in [(same, {30, 50, 60}), (own, {40})]:
        manifest = verify_output_set(out)
        assert not list(out.glob(f"{STAGING_PREFIX}*"))
        iterations = set()
        for entry in manifest.files:
            meta = read_metadata(out / entry.name)
            assert meta["run_id"] == manifest.run_id  # every file from the same run
            iterations.add(meta["config"]["iterations"])
        assert len(iterations) == 1 and iterations <= possible
        history = pl.read_parquet(out / "cost_history.parquet")
        assert history.height == iterations.pop() + 1

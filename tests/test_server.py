"""`lrflow server start|stop|status`: a kept local Prefect server that later runs reuse."""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.server import (
    HINT,
    ServerState,
    configured_api_url,
    healthy,
    process_alive,
    read_state,
    running_server,
    state_path,
    stop_server,
    use_running_server,
)

ROOT = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    return env | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }


def _train(env, data, output):
    """``lrflow train`` on the sample (its string key left out) into ``output``."""
    return _lrflow(env, "train", "--exclude", "id", "--data", str(data), "--output", str(output))


def _lrflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _api(url: str, path: str, body: dict | None = None) -> Any:
    """GET (or POST ``body`` to) ``url/path`` of a Prefect API; the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_status_without_a_server_says_so_with_exit_status_3(tmp_path):
    done = _lrflow(_env(tmp_path / "home"), "server", "status")
    assert done.returncode == 3
    assert done.stdout.strip() == "not running"


def test_a_dead_record_is_not_a_running_server(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    # A process that has exited: its pid is free (or reused by something that is no server).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = ServerState(url="http://127.0.0.1:9/api", pid=gone.pid, log="x", started_at=0.0)
    state_path(home).write_text(json.dumps(record.__dict__))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert read_state() == record
    assert running_server() is None
    assert not healthy(record.url, timeout=0.5)  # nothing listens on the discard port


def test_stop_forgets_a_record_whose_process_is_no_longer_the_server(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    # The recorded id now belongs to another process, leader of its own group.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)  # fmt: skip
    try:
        record = ServerState(url="http://127.0.0.1:9/api", pid=other.pid, log="x", started_at=0.0)
        state_path(home).write_text(json.dumps(record.__dict__))
        assert stop_server() == record
        assert read_state() is None
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()


def test_a_url_in_the_environment_or_the_active_profile_wins(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert configured_api_url() is None
    # What `prefect config set PREFECT_API_URL=...` writes, in the active profile only.
    (home / "profiles.toml").write_text(
        'active = "team"\n'
        '[profiles.team]\nPREFECT_API_URL = "http://team.example:4200/api"\n'
        '[profiles.other]\nPREFECT_API_URL = "http://other.example:4200/api"\n'
    )
    assert configured_api_url() == "http://team.example:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    assert configured_api_url() == "http://other.example:4200/api"
    assert use_running_server() == "http://other.example:4200/api"  # no kept server asked
    monkeypatch.setenv("PREFECT_API_URL", "http://env.example:4200/api")
    assert use_running_server() == "http://env.example:4200/api"


@pytest.mark.slow
def test_server_start_is_reused_by_train_and_stops(tmp_path, sample_file):
    home = tmp_path / "home"
    env = _env(home)
    started = _lrflow(env, "server", "start", "--port", "0")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        state = read_state(home)
        assert state is not None and state.url in started.stdout
        assert healthy(state.url)

        again = _lrflow(env, "server", "start")  # a second start finds the first
        assert again.returncode == 0 and "already running" in again.stdout
        assert read_state(home) == state

        status = _lrflow(env, "server", "status")
        assert status.returncode == 0 and state.url in status.stdout

        trained = _train(env, sample_file, tmp_path / "out")
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert HINT not in trained.stderr  # no temporary server was started
        # The run is on the kept server: its flow run link names that server, and
        # the server has all of it (the CLI ends without module teardown, after
        # Prefect has drained its queued states, logs and artifacts).
        flow_run_id = trained.stderr.split("/runs/flow-run/")[1].split()[0]
        assert _api(state.url, f"flow_runs/{flow_run_id}")["state_type"] == "COMPLETED"
        of_run = {"any_": [flow_run_id]}
        task_runs = _api(state.url, "task_runs/filter", {"flow_runs": {"id": of_run}})
        assert {t["state_type"] for t in task_runs} == {"COMPLETED"} and len(task_runs) == 6
        logs = _api(state.url, "logs/filter", {"logs": {"flow_run_id": of_run}})
        assert any(log["message"] == "Finished in state Completed()" for log in logs)
        artifacts = _api(state.url, "artifacts/filter", {"artifacts": {"flow_run_id": of_run}})
        assert {"train-report", "train-metrics"} <= {a["key"] for a in artifacts}
    finally:
        stopped = _lrflow(env, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not healthy(state.url, timeout=1.0)
    assert read_state(home) is None
    assert not process_alive(state.pid)  # exited; maybe not yet reaped by its new parent
    assert _lrflow(env, "server", "status").returncode == 3


@pytest.mark.slow
def test_train_without_a_server_hints_and_uses_a_temporary_one(tmp_path, sample_file):
    env = _env(tmp_path / "home")
    trained = _train(env, sample_file, tmp_path / "out")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stderr.splitlines()[0] == HINT
    assert re.search(r"trained on \d+ examples", trained.stdout)

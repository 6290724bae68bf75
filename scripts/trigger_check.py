"""Proof that scoring follows training on a real Prefect server (`make trigger-check`).

Starts a local Prefect server (temporary home, a free port, 127.0.0.1 only), the
process work pool and a worker, deploys this checkout's prefect.yaml (its
deployments and their trigger as written; only the paths point into a temporary
directory and the train cron is dropped), runs `train/nightly` once, and waits:
a `score/nightly` flow run must follow it, with no further command, complete,
and score with the run that the store's latest.json names; and no second score
run may follow (the score run's own completion must not trigger it again).
Exit status 0 when all of that holds; the timings are printed.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
POOL = "lrflow-process"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call of the server's REST API (POST with a body, else GET)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def healthy(url: str) -> bool:
    try:
        return api(url, "/health") is True
    except OSError:
        return False


def deployment_file(source: Path, work: Path) -> Path:
    """``source`` with the paths moved into ``work`` and no cron; the triggers as written."""
    document = yaml.safe_load(source.read_text())
    for entry in document["deployments"]:
        config = entry["parameters"]["config"]
        if entry["entrypoint"] == "flows/train.py:train":
            config |= {"data": str(ROOT / "data" / "sample.parquet"), "output": str(work / "store")}
            config["iterations"] = 100
            entry["schedules"] = []
        else:
            config |= {
                "model": str(work / "store"),
                "data": str(ROOT / "data" / "sample.parquet"),
                "output": str(work / "predictions.parquet"),
            }
    path = work / "prefect.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def flow_runs(url: str, deployment_id: str) -> list[dict[str, Any]]:
    return api(
        url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    )


def wait_for(what: str, condition, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise SystemExit(f"trigger-check: FAILED: {what} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=240, help="seconds for each wait")
    parser.add_argument("--quiet-seconds", type=float, default=20, help="watch for a 2nd run")
    parser.add_argument("--file", type=Path, default=ROOT / "prefect.yaml", help="prefect.yaml")
    arguments = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lrflow-trigger-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The worker's flow runs import this checkout's `flows`, whatever is installed.
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    }
    started: list[subprocess.Popen] = []
    clock = time.monotonic()

    def start(*command: str, log: str) -> None:
        with (work / log).open("wb") as handle:
            started.append(
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=ROOT,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def run(*command: str) -> None:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(
                f"trigger-check: FAILED: {' '.join(command)}\n{done.stdout}{done.stderr}"
            )

    try:
        start(prefect, "server", "start", log="server.log")
        wait_for("the server to answer", lambda: healthy(url), arguments.timeout)
        print(f"server up after {time.monotonic() - clock:.0f} s on {url}")
        run(prefect, "work-pool", "create", POOL, "--type", "process")
        run(
            prefect,
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(deployment_file(arguments.file, work)),
        )
        start(prefect, "worker", "start", "--pool", POOL, log="worker.log")
        train = api(url, "/deployments/name/train/nightly")
        score = api(url, "/deployments/name/score/nightly")
        print(f"deployed, worker started after {time.monotonic() - clock:.0f} s")

        run(prefect, "deployment", "run", "train/nightly")
        ran = time.monotonic()

        def completed(deployment_id: str) -> list[dict[str, Any]]:
            runs = flow_runs(url, deployment_id)
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
            if failed:
                raise SystemExit(f"trigger-check: FAILED: a run ended {failed[0]['state_type']}")
            return [r for r in runs if r["state_type"] == "COMPLETED"]

        [trained] = wait_for(
            "train/nightly to complete", lambda: completed(train["id"]), arguments.timeout
        )
        print(f"train/nightly completed {time.monotonic() - ran:.0f} s after `deployment run`")
        [scored] = wait_for(
            "a score/nightly run to complete", lambda: completed(score["id"]), arguments.timeout
        )
        print(f"score/nightly completed {time.monotonic() - ran:.0f} s after `deployment run`")
        time.sleep(arguments.quiet_seconds)  # a trigger that matched the score run would fire now
        runs = flow_runs(url, score["id"])
        if len(runs) != 1 or len(flow_runs(url, train["id"])) != 1:
            raise SystemExit(f"trigger-check: FAILED: {len(runs)} score runs for one train run")

        latest = json.loads((work / "store" / "latest.json").read_text())
        sys.path.insert(0, str(ROOT))
        from flows.outputs import read_metadata

        metadata = read_metadata(work / "predictions.parquet")
        if metadata["model_run_id"] != trained["id"] or metadata["model"] != str(
            work / "store" / latest["run"]
        ):
            raise SystemExit(
                f"trigger-check: FAILED: scored with {metadata['model']}, not {latest}"
            )
        if metadata["run_id"] != scored["id"]:
            raise SystemExit("trigger-check: FAILED: the predictions are not the score run's")
        print(
            f"trigger-check: OK: train run {trained['name']} -> score run {scored['name']} "
            f"(model {latest['run']}), one score run, {time.monotonic() - clock:.0f} s in all"
        )
    except SystemExit:
        for log in ("server.log", "worker.log"):
            if (work / log).exists():
                print(f"--- {log} (last lines)", file=sys.stderr)
                print("\n".join((work / log).read_text().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        for process in reversed(started):  # the worker first, then the server
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

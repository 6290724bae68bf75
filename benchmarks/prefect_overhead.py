"""What the pipeline costs beyond Prefect's own start-up: an empty flow vs `lrflow train`.

    python benchmarks/prefect_overhead.py [--repeats 5] [--data data/sample.parquet]

Each command runs as a fresh process (what a scheduled run or a user pays),
first with Prefect's ephemeral server (no PREFECT_API_URL: a temporary server
is started per process), then against a running `prefect server start`. The
competitors are interleaved within each repeat; the table gives medians and
the spread of wall-clock seconds, and `lrflow - empty`, the pipeline's share.
"""

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EMPTY_FLOW = (
    "from prefect import flow\n@flow(name='empty')\ndef empty():\n    return None\nempty()\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(env: dict[str, str], data: str, repeats: int, work: Path) -> dict[str, list[float]]:
    commands = {
        "empty flow": [str(BIN / "python"), "-c", EMPTY_FLOW],
        "lrflow train": [
            str(BIN / "lrflow"),
            "train",
            "--data",
            data,
            "--output",
            str(work / "out"),
        ],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            times[name].append(timed(command, env))
    return times


def blas() -> str:
    try:
        from threadpoolctl import threadpool_info

        return (
            ", ".join(
                f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                for i in threadpool_info()
                if i["user_api"] == "blas"
            )
            or "none loaded"
        )
    except ImportError:
        return "threadpoolctl not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(ROOT / "data" / "sample.parquet"))
    args = parser.parse_args()

    import numpy  # noqa: F401  (so that threadpoolctl sees NumPy's BLAS)
    import prefect

    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"Prefect {prefect.__version__}, BLAS: {blas()}")  # fmt: skip
    print(f"# {args.repeats} interleaved repeats per mode, fresh process each; data {args.data}")
    work = Path(tempfile.mkdtemp(prefix="lrflow-overhead-"))
    base = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(work / "home"),
    }
    base.pop("PREFECT_API_URL", None)
    results = {"ephemeral": measure(base, args.data, args.repeats, work)}

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = {
        **base,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start"],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(api_url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        results["running server"] = measure(
            {**base, "PREFECT_API_URL": api_url}, args.data, args.repeats, work
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| server | command | median s | min s | max s | lrflow - empty (median) s |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, times in results.items():
        extra = statistics.median(times["lrflow train"]) - statistics.median(times["empty flow"])
        for name, values in times.items():
            print(
                f"| {mode} | {name} | {statistics.median(values):.2f} | {min(values):.2f} "
                f"| {max(values):.2f} | {f'{extra:+.2f}' if name == 'lrflow train' else ''} |"
            )


if __name__ == "__main__":
    main()

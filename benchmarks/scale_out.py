"""Backends: per-iteration time of memory/stream/dask, Dask's overhead, the stream's peak RSS.

    python data/make_sample.py --rows 4194304 --features 64 --files 8 --output /tmp/big
    python benchmarks/scale_out.py --data /tmp/big --cache-dir /tmp/lrflow-cache

1. `lrflow train` end to end on ``--data`` with ``--backend stream --memory-budget
   256MB``, then ``--backend memory``, each in its own process: peak RSS of the
   lrflow process (getrusage), and of its largest child process (the Prefect
   server it starts; with dask, also the LocalCluster's workers), and the
   largest relative difference of the params.
2. The same for ``--backend dask`` (a 2-worker LocalCluster) against memory on
   ``--dask-data`` (default: the first file of ``--data``).
3. Seconds per loss evaluation of each backend on ``--dask-data``, interleaved
   round-robin, repeated; medians. Dask's overhead per evaluation: on a tiny
   shard (compute ~0), and on the real data as Dask's time minus one shard's
   compute time measured in-process.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

RUN_AND_MEASURE = """
import resource, sys, json
from flows.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as stop:
    code = stop.code
print("RSS " + json.dumps({
    "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "code": code,
}), file=sys.stderr)
"""


def run_cli(args: list[str]) -> dict:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    clock = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_MEASURE, *args], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - clock
    line = next((x for x in done.stderr.splitlines() if x.startswith("RSS ")), None)
    if line is None or json.loads(line[4:])["code"] != 0:
        raise SystemExit(f"lrflow {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(line[4:]), "seconds": seconds}


def params(store: Path) -> np.ndarray:
    from flows.store import latest

    return pl.read_parquet(latest(store) / "params.parquet")["estimate"].to_numpy()


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def end_to_end(data: str, backend: str, extra: list[str], iterations: int, work: Path) -> None:
    common = ["train", "--data", data, "--iterations", str(iterations), "--tol", "0"]
    runs = {}
    for name, flags in (
        (backend, ["--backend", backend, *extra]),
        (
            "memory",
            ["--backend", "memory", "--validation-fraction", "0"],
        ),  # all rows, as the others
    ):
        out = work / f"out-{name}"
        runs[name] = run_cli([*common, "--output", str(out), *flags])
        runs[name]["params"] = params(out)
    print(
        f"\n`lrflow train --backend {backend} {' '.join(extra)}` vs memory on {data}, "
        f"{iterations} iterations of gd\n"
    )
    print("| backend | peak RSS, lrflow process (MB) | largest child process (MB) | wall (s) |")
    print("|---|---:|---:|---:|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['self_mb']:.0f} | {run['children_mb']:.0f} | {run['seconds']:.1f} |"
        )
    diff = relative_difference(runs["memory"]["params"], runs[backend]["params"])
    print(f"\nmax |params_{backend} - params_memory| / max |params_memory| = {diff:.2e}")


def per_iteration(data: str, cache_dir: Path, repeats: int) -> None:
    from distributed import Client, LocalCluster

    from flows.backends.dask_backend import open_dask
    from flows.backends.stream import open_stream
    from flows.dataset import load_dataset, plan_inputs
    from lr_kernel import FusedLoss

    plan = plan_inputs(data)
    memory = load_dataset(plan)
    n, m = memory.X.shape
    w = np.full((n, 1), 0.01)
    stream = open_stream(plan, cache_root=cache_dir, memory_budget=256_000_000)
    half = FusedLoss(memory.X[:, : m // 2], memory.Y[:, : m // 2])  # one Dask shard's work
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
        threadpool_limits(1, "blas"),
        stream.loss() as stream_loss,
    ):
        dask_data = open_dask(plan, client=client)
        tiny_plan = plan_inputs(_tiny_file(cache_dir))
        tiny = open_dask(tiny_plan, client=client)
        tiny_w = np.full((len(tiny.features), 1), 0.01)
        competitors = {  # name -> (loss, w)
            "memory (FusedLoss, 1 thread)": (FusedLoss(memory.X, memory.Y), w),
            "stream (256MB budget, 1 thread)": (stream_loss, w),
            "dask (2 workers x 1 thread)": (dask_data.loss(), w),
            "one shard's compute, in-process": (lambda w, b: half.partial_sums(w, b), w),
            "dask on 2 x 500 examples": (tiny.loss(), tiny_w),
        }
        times: dict[str, list[float]] = {name: [] for name in competitors}
        for loss, weights in competitors.values():  # warm up: page cache, worker imports
            loss(weights, 0.0)
        for _ in range(repeats):
            for name, (loss, weights) in competitors.items():
                clock = time.perf_counter()
                loss(weights, 0.0)
                times[name].append(time.perf_counter() - clock)
        dask_data.close()
        tiny.close()
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nSeconds per loss evaluation on {data} ({n} features x {m} examples, float64), "
        f"median of {repeats} interleaved repeats\n"
    )
    print("| backend | median (ms) | min (ms) |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * medians[name]:.1f} | {1e3 * min(t):.1f} |")
    overhead = medians["dask (2 workers x 1 thread)"] - medians["one shard's compute, in-process"]
    print(
        f"\nDask overhead per iteration: {1e3 * medians['dask on 2 x 500 examples']:.1f} ms "
        f"on tiny shards; {1e3 * overhead:.1f} ms on this data (dask minus one shard's compute)"
    )


def _tiny_file(directory: Path) -> str:
    from data.make_sample import make_frame

    path = directory / "tiny.parquet"
    make_frame(1000, 64, seed=3).write_parquet(path, row_group_size=500)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the ~2 GB (as float64) dataset")
    parser.add_argument("--dask-data", help="data of the dask and per-iteration parts")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lrflow-bench"
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip", nargs="*", default=[], choices=["stream", "dask", "iteration"])
    args = parser.parse_args()
    dask_data = args.dask_data or str(sorted(Path(args.data).glob("*.parquet"))[0])
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"- date: {datetime.date.today().isoformat()}; {platform.node()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}; Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as work:
        if "stream" not in args.skip:
            extra = ["--memory-budget", "256MB", "--cache-dir", str(args.cache_dir)]
            end_to_end(args.data, "stream", extra, args.iterations, Path(work))
        if "dask" not in args.skip:
            end_to_end(dask_data, "dask", ["--dask-workers", "2"], args.iterations, Path(work))
    if "iteration" not in args.skip:
        per_iteration(dask_data, args.cache_dir, args.repeats)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()

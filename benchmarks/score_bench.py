"""Batch scoring vs reading the same Parquet with Polars alone: seconds and peak memory.

Each competitor runs in a fresh process (so peak RSS is its own), interleaved over
the repeats; the table gives medians. Generate the data first, outside the repo:

    .venv/bin/python data/make_sample.py --rows 10000000 --features 50 --files 10 \\
        --output /tmp/score10m/data
    .venv/bin/python benchmarks/score_bench.py --data /tmp/score10m/data --repeats 3
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]

# Each competitor is a small program: argv[1] is the data directory, argv[2] a scratch dir.
COMPETITORS = {
    "polars read (in memory)": """
import sys, polars as pl
from flows.dataset import resolve_files
frame = pl.scan_parquet(list(resolve_files(sys.argv[1]))).collect()
print(frame.height)
""",
    "polars read (streamed batches)": """
import sys, polars as pl
from flows.dataset import resolve_files
rows = 0
for path in resolve_files(sys.argv[1]):
    for batch in pl.scan_parquet(path).collect_batches(chunk_size=131072):
        rows += batch.height
print(rows)
""",
    "score_to_parquet (no Prefect)": """
import sys
from pathlib import Path
from flows.scoring import load_model, plan_scoring, score_to_parquet
model = load_model(Path(sys.argv[2]) / "model")
plan = plan_scoring(model, sys.argv[1])
result = score_to_parquet(plan, model, Path(sys.argv[2]) / "predictions.parquet")
print(result.n_rows)
""",
    "lrflow score (CLI + Prefect)": """
import sys
from pathlib import Path
from flows.cli import main
scratch = Path(sys.argv[2])
main(["score", "--model", str(scratch / "model"), "--data", sys.argv[1],
      "--output", str(scratch / "predictions.parquet")])
""",
}


def write_model(directory: Path, features: list[str]) -> None:
    """A params.parquet as `lrflow train` writes it, with random coefficients."""
    sys.path.insert(0, str(ROOT))
    from flows.outputs import params_table, with_metadata, write_table_atomic

    rng = np.random.default_rng(0)
    w = rng.normal(size=len(features)) / 100
    metadata = {
        "features": features,
        "label": "label",
        "label_mapping": {"negative": False, "positive": True, "dtype": "Boolean"},
    }
    table = with_metadata(params_table(tuple(features), w, 0.1), metadata)
    write_table_atomic(table, directory / "params.parquet")


def run(code: str, data: str, scratch: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one fresh process running ``code``."""
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, data, str(scratch)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(process.stderr.read().decode() if process.stderr else "failed")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/score10m/data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], help="competitor to leave out")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows.dataset import resolve_files

    files = resolve_files(args.data)
    schema = pl.read_parquet_schema(files[0])
    features = [name for name in schema if name.startswith("x")]
    rows = sum(pl.scan_parquet(path).select(pl.len()).collect().item() for path in files)
    competitors = {k: v for k, v in COMPETITORS.items() if k not in args.skip}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in competitors}
    with tempfile.TemporaryDirectory(prefix="score-bench-") as scratch_name:
        scratch = Path(scratch_name)
        write_model(scratch / "model", features)
        for _ in range(args.repeats):
            for name, code in competitors.items():  # interleaved: drift hits all alike
                results[name].append(run(code, args.data, scratch))
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, {date.today()}, numpy {np.__version__}")
    print(f"# {rows:,} rows x {len(features)} features, {len(files)} files, {args.repeats} repeats")
    print(
        f"{'competitor':32} {'median s':>9} {'rows/s':>12} {'CPU s':>7} {'peak MB':>8} "
        f"{'speed vs fastest read':>22}"
    )
    reads = [statistics.median(r[0] for r in results[n]) for n in results if "polars" in n]
    fastest_read = min(reads) if reads else float("nan")
    table = {}
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        peak = max(r[2] for r in runs)
        table[name] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak}
        print(
            f"{name:32} {seconds:9.2f} {rows / seconds:12,.0f} {cpu:7.1f} {peak:8.0f} "
            f"{fastest_read / seconds:22.0%}"
        )
    print(json.dumps(table))


if __name__ == "__main__":
    main()

"""Rows into X: the feature plan (two passes, X filled batch by batch) against Polars' own
``to_dummies`` + ``to_numpy`` on the same file. Prints a table: time and peak memory.

``plan`` holds ``X`` as the ``(n, m)`` ndarray (the NumPy engine's layout),
``plan-tiles`` as tiles (:class:`lr_kernel.tiles.TiledMatrix`, the compiled
engine's: each block filled in one scratch block, then copied into its tiles).

Each measurement runs in a fresh process (peak RSS is per process), the
methods alternate round by round, and the table gives medians and the ratios
of pairs of one round. ``X`` is float64 in all: ours ``(n_terms, m)`` C order (or tiles),
Polars' ``(m, n_terms)`` F order (the same bytes in memory).

    python benchmarks/features_bench.py --rows 10000000 --rounds 3
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_NUMERIC = 45
N_CATEGORICAL = 5
N_LEVELS = 20


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    """45 float64 and 5 string columns (20 levels each), a 0/1 label; row groups of 1M."""
    import polars as pl
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, 1_000_000):
        k = min(1_000_000, rows - start)
        columns: dict[str, object] = {f"x{j}": rng.standard_normal(k) for j in range(N_NUMERIC)}
        levels = np.array([f"level_{v:02d}" for v in range(N_LEVELS)])
        for j in range(N_CATEGORICAL):
            columns[f"c{j}"] = levels[rng.integers(0, N_LEVELS, k)]
        columns["label"] = rng.integers(0, 2, k)
        table = pl.DataFrame(columns).to_arrow()
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def run_ours(path: str, tiled: bool) -> dict[str, float]:
    from flows.backends.memory import open_memory
    from flows.backends.passes import settings_of
    from flows.config import TrainConfig
    from flows.dataset import plan_inputs

    config = TrainConfig(data=path, output="unused", validation_fraction=0)
    plan = plan_inputs(path)
    clock = time.perf_counter()
    engine = "numba" if tiled else "numpy"  # the layout of X follows the engine
    data = open_memory(plan, None, settings_of(config, plan), threads=2, engine=engine)
    seconds = time.perf_counter() - clock
    X = data.train.X
    return {"seconds": seconds, "x_bytes": X.nbytes, "shape": list(X.shape)}


def run_polars(path: str) -> dict[str, float]:
    import polars as pl

    clock = time.perf_counter()
    frame = pl.read_parquet(path)
    categorical = [f"c{j}" for j in range(N_CATEGORICAL)]
    design = frame.drop("label").to_dummies(columns=categorical, drop_first=True)
    X = design.to_numpy().astype(np.float64, copy=False)
    seconds = time.perf_counter() - clock
    return {"seconds": seconds, "x_bytes": X.nbytes, "shape": list(X.shape)}


def child(method: str, path: str) -> None:
    found = run_polars(path) if method == "polars" else run_ours(path, method == "plan-tiles")
    found["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        make_file(path, args.rows)
        results: dict[str, list[dict[str, float]]] = {"plan": [], "plan-tiles": [], "polars": []}
        for _ in range(args.rounds):
            for method in results:  # alternate: the same load on each
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))

        def ratios(a: str, b: str, key: str = "seconds") -> str:
            pairs = [x[key] / y[key] for x, y in zip(results[a], results[b], strict=True)]
            rounds = ", ".join(f"{r:.2f}" for r in pairs)
            return f"median {statistics.median(pairs):.2f} (rounds: {rounds})"

        shape = f"{N_NUMERIC} numeric + {N_CATEGORICAL} categorical x {N_LEVELS} levels"
        print(f"rows {args.rows:,}: {shape}")
        print("| method | X shape | X GB | median s | min s | peak RSS GB | peak - X GB |")
        print("|---|---|---|---|---|---|---|")
        for method, runs in results.items():
            times = [r["seconds"] for r in runs]
            peak = max(r["peak_rss"] for r in runs)
            print(
                f"| {method} | {runs[0]['shape']} | {runs[0]['x_bytes'] / 1e9:.2f} | "
                f"{statistics.median(times):.2f} | {min(times):.2f} | {peak / 1e9:.2f} | "
                f"{(peak - runs[0]['x_bytes']) / 1e9:.2f} |"
            )
        print(f"plan / polars time, pairwise: {ratios('plan', 'polars')}")
        print(f"plan-tiles / plan time, pairwise: {ratios('plan-tiles', 'plan')}")
        print(f"plan-tiles / plan peak RSS, pairwise: {ratios('plan-tiles', 'plan', 'peak_rss')}")


if __name__ == "__main__":
    main()

"""Benchmark of K models in one pass (FusedLossMany) against K separate single-model passes.

    python benchmarks/grid.py            # 1M x 100 float64 (a few minutes); paste into RESULTS.md
    python benchmarks/grid.py --quick    # 200k x 100, one minute

One iteration of every solver is one loss+gradient call; the update is O(n K).
Competitors are timed interleaved (round-robin) in one process on the same data
and repeated; tables give medians and minimums. "K separate fits" is K times
the single-model call (the median), which is what K runs of today's kernel pay
per iteration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import interleaved, machine_lines, make_data

from lr_kernel import FusedLoss, FusedLossMany, fit

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
KS = (1, 2, 4, 8, 16, 32)


def loss_calls(
    X: np.ndarray, Y: np.ndarray, n_threads: int, block_size: int | None = None
) -> dict[int, Callable[[], object]]:
    """One loss+gradient call per K: FusedLoss for K = 1 (what fit uses), else FusedLossMany."""
    n = X.shape[0]
    w = np.full((n, 1), 0.01)
    single = FusedLoss(X, Y, n_threads=n_threads)
    calls: dict[int, Callable[[], object]] = {1: lambda: single(w, 0.1, 1.0)}
    for K in KS[1:]:
        many = FusedLossMany(X, Y, n_models=K, n_threads=n_threads, block_size=block_size)
        W = np.full((n, K), 0.01)
        b = np.full(K, 0.1)
        l2 = np.logspace(-2, 1, K)
        calls[K] = lambda many=many, W=W, b=b, l2=l2: many(W, b, l2)
    return calls


def section_per_iteration(n: int, m: int, repeats: int) -> list[str]:
    X, Y = make_data(n, m, correlated=False)
    configurations = {
        f"BLAS limited to 1 thread, n_threads={CORES} (the flow's)": (CORES, 1),
        f"BLAS threads ({CORES}), n_threads=1": (1, None),
    }
    candidates: dict[str, Callable[[], object]] = {}
    for label, (n_threads, blas) in configurations.items():
        for K, call in loss_calls(X, Y, n_threads).items():

            def limited(call: Callable[[], object] = call, blas: int | None = blas) -> object:
                with threadpool_limits(blas, "blas"):
                    return call()

            candidates[f"{label}|{K}"] = limited
    times = interleaved(candidates, repeats)
    lines = [
        f"### Per iteration (one loss+gradient of K models), n = {n}, m = {m:,}, float64, "
        f"{repeats} interleaved repeats",
        "",
        "K = 1 is today's `FusedLoss` (what `fit` runs for one candidate); K >= 2 is "
        "`FusedLossMany` at its default block size. 'K separate' = K x the K = 1 median.",
        "",
        "| configuration | K | one pass, median | min | per model | K separate | "
        "speed-up vs separate | vs K = 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in configurations:
        one = statistics.median(times[f"{label}|1"])
        for K in KS:
            values = times[f"{label}|{K}"]
            med = statistics.median(values)
            lines.append(
                f"| {label} | {K} | {med * 1e3:.0f} ms | {min(values) * 1e3:.0f} ms | "
                f"{med / K * 1e3:.1f} ms | {K * one * 1e3:.0f} ms | {K * one / med:.1f}x | "
                f"{med / one:.2f}x |"
            )
    return lines


def section_block_size(n: int, m: int, repeats: int, K: int) -> list[str]:
    X, Y = make_data(n, m, correlated=False)
    W, b, l2 = np.full((n, K), 0.01), np.full(K, 0.1), np.ones(K)
    candidates: dict[str, Callable[[], object]] = {}
    for block in (None, 1024, 2048, 10240, 32768):
        many = FusedLossMany(X, Y, n_models=K, n_threads=CORES, block_size=block)

        def call(many: FusedLossMany = many) -> object:
            with threadpool_limits(1, "blas"):
                return many(W, b, l2)

        name = f"{many.block_size}{' (default)' if block is None else ''}"
        candidates[name] = call
    times = interleaved(candidates, repeats)
    lines = [
        f"### Block size, K = {K}, n = {n}, m = {m:,}, float64, BLAS limited to 1 thread, "
        f"n_threads={CORES}, {repeats} interleaved repeats",
        "",
        "| examples per block | median | min |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(
            f"| {name} | {statistics.median(values) * 1e3:.0f} ms | {min(values) * 1e3:.0f} ms |"
        )
    return lines


def section_end_to_end(n: int, m: int, repeats: int, iterations: int) -> list[str]:
    """Whole fits (workspace, updates, stop rules, histories) per iteration, K = 1 and 8."""
    X, Y = make_data(n, m, correlated=False)
    grids = {1: [0.1], 8: list(np.logspace(-2, 1, 8))}

    def run(l2: list[float]) -> Callable[[], object]:
        def go() -> object:
            with threadpool_limits(1, "blas"):
                value: object = l2[0] if len(l2) == 1 else l2
                return fit(
                    X, Y, learning_rate=0.5, l2=value, iterations=iterations, n_threads=CORES
                )  # type: ignore[call-overload]

        return go

    times = interleaved({K: run(l2) for K, l2 in grids.items()}, repeats)
    one = statistics.median(times[1])
    lines = [
        f"### Whole fit, {iterations} gd updates ({iterations + 1} loss calls), n = {n}, "
        f"m = {m:,}, float64, BLAS limited to 1, n_threads={CORES}, {repeats} repeats",
        "",
        "| K | fit, median | per iteration | K separate fits | vs K = 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for K, values in times.items():
        med = statistics.median(values)
        lines.append(
            f"| {K} | {med:.2f} s | {med / (iterations + 1) * 1e3:.0f} ms | {K * one:.2f} s | "
            f"{med / one:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="m = 200,000 and fewer repeats")
    args = parser.parse_args()
    n, m = 100, (200_000 if args.quick else 1_000_000)
    repeats = 3 if args.quick else 9
    start = time.perf_counter()
    lines = ["## grid (issue 8): K models in one pass", "", *machine_lines(), ""]
    lines += [*section_per_iteration(n, m, repeats), ""]
    lines += [*section_block_size(n, m, max(3, repeats // 2), K=8), ""]
    lines += [*section_end_to_end(n, m, max(3, repeats // 3), iterations=10), ""]
    lines.append(f"- load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    lines.append(f"- wall time: {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

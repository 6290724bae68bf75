"""What tracking the validation cost costs: fit alone vs fit + held-out log-loss every k-th update.

Decides how often `lrflow train` records `validation_cost` (the issue allows every
iteration only if that adds < 10% to the fit). The held-out set is a quarter of the
training set's size, as a 0.2 validation fraction leaves it.

    .venv/bin/python benchmarks/validation_bench.py [--repeats 5] [--iterations 200]
"""

import argparse
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info

from lr_kernel import fit
from lr_kernel.metrics import HeldOutCost

SHAPES = [(10, 20_000), (50, 100_000), (50, 400_000), (200, 100_000)]  # (n_features, m_train)
EVERY = [None, 1, 5, 10, 25]


def make(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m))  # (n, m), C order as the pipeline builds it
    w = rng.normal(size=(n, 1)) / np.sqrt(n)
    Y = (rng.random((1, m)) < 1 / (1 + np.exp(-(w.T @ X)))).astype(np.float64)
    return X, Y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, BLAS {blas}")
    print(f"# {args.iterations} iterations, {args.repeats} interleaved repeats, median seconds")
    print(f"{'n x m_train':>14} {'every':>6} {'seconds':>9} {'overhead':>9}")
    for n, m in SHAPES:
        X, Y = make(n, m)
        X_val, Y_val = make(n, m // 4, seed=1)
        times: dict[int | None, list[float]] = {every: [] for every in EVERY}
        for _ in range(args.repeats):
            for every in EVERY:  # interleaved, so drift on a noisy machine hits all alike
                monitor = None if every is None else HeldOutCost(X_val, Y_val, every)
                start = time.perf_counter()
                result = fit(
                    X, Y, learning_rate=0.1, iterations=args.iterations, tol=0.0, monitor=monitor
                )
                if monitor is not None:
                    monitor.history(result.n_iterations, result.w, result.b)
                times[every].append(time.perf_counter() - start)
        base = statistics.median(times[None])
        for every in EVERY:
            seconds = statistics.median(times[every])
            label = "none" if every is None else str(every)
            print(f"{f'{n} x {m}':>14} {label:>6} {seconds:9.4f} {seconds / base - 1:9.1%}")


if __name__ == "__main__":
    main()

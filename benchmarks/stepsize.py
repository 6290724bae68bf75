"""The stable step estimate: its value, the updates it needs, and what it costs.

Prints two tables: (1) for the bundled sample and two scikit-learn datasets
(standardized), the estimated 1/L, the exact 1/L from numpy.linalg.eigvalsh, and
gradient-descent updates to reach tol=1e-10 at 0.5 (the default) and at 1/L;
(2) the time of stable_learning_rate against one loss_and_gradients call
(median of repeats, competitors interleaved), with the BLAS in use.

    .venv/bin/python benchmarks/stepsize.py
"""

import platform
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

from lr_kernel import fit, loss_and_gradients
from lr_kernel.stepsize import stable_learning_rate

ROOT = Path(__file__).resolve().parents[1]


def standardized(data: np.ndarray) -> np.ndarray:
    X = data.T.astype(np.float64)  # (n, m)
    return np.ascontiguousarray((X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True))


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn import datasets as sk

    from flows.dataset import load_dataset, plan_inputs

    sample = load_dataset(plan_inputs(ROOT / "data" / "sample.parquet"))
    found = {"sample.parquet": (sample.X, sample.Y)}
    for name, loader in [("breast_cancer", sk.load_breast_cancer), ("wine", sk.load_wine)]:
        bunch = loader()
        found[name] = (standardized(bunch.data), (bunch.target == 0).astype(float)[None, :])
    return found


def main() -> None:
    print(
        f"# {platform.processor() or platform.machine()}, {platform.python_version()}, "
        f"BLAS {[(i['internal_api'], i['num_threads']) for i in threadpool_info()]}"
    )
    print("\n| data | n | m | 1/L estimate | 1/L exact | updates at 0.5 | updates at 1/L |")
    print("|---|---|---|---|---|---|---|")
    for name, (X, Y) in datasets().items():
        estimate = stable_learning_rate(X)
        Xa = np.vstack([X, np.ones((1, X.shape[1]))])
        exact = 4.0 / np.linalg.eigvalsh(Xa @ Xa.T / X.shape[1])[-1]
        runs = [fit(X, Y, learning_rate=a, iterations=100_000, tol=1e-10) for a in (0.5, estimate)]
        cells = [f"{r.n_iterations}" + ("" if r.converged else " (cap)") for r in runs]
        print(
            f"| {name} | {X.shape[0]} | {X.shape[1]} | {estimate:.4g} | {exact:.4g} | "
            f"{cells[0]} | {cells[1]} |"
        )

    print("\n| n x m | stable_learning_rate (s) | one loss_and_gradients (s) | ratio |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, m in [(10, 100_000), (100, 100_000), (100, 1_000_000)]:
        X = rng.normal(size=(n, m))
        Y = (rng.random((1, m)) < 0.5).astype(float)
        w = np.zeros((n, 1))
        times: dict[str, list[float]] = {"estimate": [], "gradient": []}
        for _ in range(5):  # interleaved
            start = time.perf_counter()
            stable_learning_rate(X)
            times["estimate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loss_and_gradients(X, Y, w, 0.0)
            times["gradient"].append(time.perf_counter() - start)
        estimate, gradient = (float(np.median(times[k])) for k in ("estimate", "gradient"))
        print(f"| {n} x {m} | {estimate:.3f} | {gradient:.3f} | {estimate / gradient:.1f} |")


if __name__ == "__main__":
    main()

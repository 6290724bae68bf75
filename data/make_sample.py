"""Deterministic synthetic data for lrflow: any size, written as Parquet.

The features are correlated Gaussians on different scales and offsets (so
standardization matters), plus a binary flag; the label is drawn from a known
logistic model, so the true parameters are recorded and recoverable.

    python data/make_sample.py --rows 4000 --features 6 --output data/sample.parquet
    python data/make_sample.py --rows 1000000 --features 100 --files 8 --output /tmp/big/
"""

import argparse
from pathlib import Path

import numpy as np
import polars as pl


def make_frame(rows: int, features: int, seed: int = 0, correlation: float = 0.3) -> pl.DataFrame:
    """A frame with ``id`` (string), ``x0..x{features-1}`` (float64) and ``label`` (bool)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=rows)
    raw = (
        np.sqrt(1 - correlation) * rng.normal(size=(features, rows)) + np.sqrt(correlation) * common
    )
    scales = 10.0 ** rng.uniform(-1, 2, size=features)
    offsets = rng.normal(scale=50, size=features)
    X = raw * scales[:, None] + offsets[:, None]  # (n, m)
    w_true = rng.normal(size=features) / scales
    b_true = -float(w_true @ offsets) + 0.3
    p = 1 / (1 + np.exp(-(w_true @ X + b_true)))
    label = rng.random(rows) < p
    columns = {"id": [f"ex-{seed}-{i:08d}" for i in range(rows)]}
    columns |= {f"x{j}": X[j] for j in range(features)}
    columns["label"] = label
    return pl.DataFrame(columns)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--features", type=int, default=6)
    parser.add_argument("--files", type=int, default=1, help="split into this many files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("data/sample.parquet"))
    args = parser.parse_args()
    frame = make_frame(args.rows, args.features, seed=args.seed)
    if args.files == 1 and args.output.suffix == ".parquet":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(args.output)
        print(f"wrote {args.output}: {frame.height} rows")
        return
    args.output.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, frame.height, args.files + 1).astype(int)
    for k in range(args.files):
        part = frame.slice(bounds[k], bounds[k + 1] - bounds[k])
        part.write_parquet(args.output / f"part-{k:04d}.parquet")
    print(f"wrote {args.files} files under {args.output}: {frame.height} rows")


if __name__ == "__main__":
    main()

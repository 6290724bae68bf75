"""Results -> Parquet: the output contract's schemas, metadata, and atomic writes."""

import importlib.metadata
import json
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.config import TrainConfig
from flows.dataset import Dataset
from lr_kernel import FitResult
from lr_kernel.metrics import binary_metrics

INTERCEPT_TERM = "(Intercept)"
METADATA_KEY = b"lrflow"

PARAMS_SCHEMA = pa.schema([("term", pa.string()), ("estimate", pa.float64())])
COST_HISTORY_SCHEMA = pa.schema(
    [("iteration", pa.int64()), ("cost", pa.float64()), ("gradient_norm", pa.float64())]
)
METRICS_SCHEMA = pa.schema(
    [("split", pa.string()), ("metric", pa.string()), ("value", pa.float64())]
)


def raw_scale_parameters(
    w: np.ndarray, b: float, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, float]:
    """Fold standardization into the parameters: ``w·(x - mean)/scale + b == w_raw·x + b_raw``.

    Parameters
    ----------
    w : ndarray of shape (n_features, 1) or (n_features,), trained on standardized data
    b : float
    mean, scale : ndarray of shape (n_features,)

    Returns
    -------
    w_raw : ndarray of shape (n_features,), float64
    b_raw : float
    """
    w_std = np.asarray(w, dtype=np.float64).ravel()
    w_raw = w_std / scale
    return w_raw, float(b) - float(np.dot(w_raw, mean))


def params_table(features: tuple[str, ...], w_raw: np.ndarray, b_raw: float) -> pa.Table:
    """One row per feature in feature order, then the intercept."""
    return pa.table(
        {"term": [*features, INTERCEPT_TERM], "estimate": [*map(float, w_raw), float(b_raw)]},
        schema=PARAMS_SCHEMA,
    )


def cost_history_table(cost_history: np.ndarray, gradient_norm: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "iteration": np.arange(len(cost_history), dtype=np.int64),
            "cost": np.asarray(cost_history, dtype=np.float64),
            "gradient_norm": np.asarray(gradient_norm, dtype=np.float64),
        },
        schema=COST_HISTORY_SCHEMA,
    )


def metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> pa.Table:
    """Long format: one row per (split, metric)."""
    rows = [
        (split, name, float(value))
        for split, values in metrics.items()
        for name, value in values.items()
    ]
    return pa.table(
        {
            "split": [r[0] for r in rows],
            "metric": [r[1] for r in rows],
            "value": [r[2] for r in rows],
        },
        schema=METRICS_SCHEMA,
    )


def with_metadata(table: pa.Table, metadata: Mapping[str, Any]) -> pa.Table:
    """Attach the run's JSON metadata under the Parquet key ``lrflow``."""
    encoded = json.dumps(metadata, default=str, sort_keys=True).encode()
    return table.replace_schema_metadata({METADATA_KEY: encoded})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``lrflow`` JSON metadata of a file written by :func:`write_table_atomic`."""
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw[METADATA_KEY])


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` so that readers see the whole file or none of it.

    The data goes to a hidden temporary name in the same directory (same file
    system, so the rename is atomic), is flushed to disk, then renamed over ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def run_metadata(
    dataset: Dataset,
    result: FitResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str | None,
) -> dict[str, Any]:
    """Everything a consumer needs to trust and reproduce the run (the ``lrflow`` key)."""
    return {
        "format_version": 1,
        "run_id": run_id,
        "config": config.model_dump(mode="json"),
        "features": list(dataset.features),
        "label": dataset.label,
        "label_mapping": dataset.label_mapping.to_json(),
        "standardized": dataset.standardized,
        "feature_mean": dataset.mean.tolist(),
        "feature_scale": dataset.scale.tolist(),
        "input_files": [str(p) for p in dataset.files],
        "input_fingerprint": dataset.fingerprint,
        "n_examples": dataset.n_examples,
        "fit": {
            "n_iterations": result.n_iterations,
            "stop_reason": result.stop_reason,
            "converged": result.converged,
            "final_cost": float(result.cost_history[-1]),
        },
        "versions": _versions(),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def write_run_outputs(
    output: Path,
    dataset: Dataset,
    result: FitResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str | None = None,
    train_metrics: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write params, cost history and metrics of a finished fit; returns the paths.

    ``train_metrics`` comes from backends that hold no ``dataset.X`` (stream, dask).
    """
    w_raw, b_raw = raw_scale_parameters(result.w, result.b, dataset.mean, dataset.scale)
    if train_metrics is None:
        Z = result.w.T @ dataset.X + result.b  # (1, m), one pass for the metrics
        train_metrics = binary_metrics(Z, dataset.Y)
    metrics = {"train": train_metrics}
    metadata = run_metadata(dataset, result, config, started_at=started_at, run_id=run_id)
    tables = {
        "params.parquet": params_table(dataset.features, w_raw, b_raw),
        "cost_history.parquet": cost_history_table(
            result.cost_history, result.gradient_norm_history
        ),
        "metrics.parquet": metrics_table(metrics),
    }
    return [
        write_table_atomic(with_metadata(table, metadata), output / name)
        for name, table in tables.items()
    ]


def _versions() -> dict[str, str]:
    names = ("lrflow", "numpy", "polars", "pyarrow", "prefect")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found

"""Pieces of the input read in bounded memory: their checks and moments, merged in a fixed order.

The stream backend runs these over record batches of every file, a Dask worker
over its own row groups; both merge the per-piece :class:`ValueSummary` values
in input order, then :func:`finish_summary` reports bad values as
:func:`flows.dataset.validate_values` does and gives the label mapping and the
standardization statistics.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from flows.dataset import InputPlan, LabelMapping, _where, label_mapping
from flows.errors import DataError

# Distinct label values each summary keeps: enough to report a bad label.
LABEL_VALUES_KEPT = 5
# Buffered column-chunk reads: pyarrow then holds each column's current page as
# it decodes instead of the whole row group at once (measured: a 64-feature row
# group of 131072 rows read whole took ~330 MB of Arrow memory, buffered ~70 MB).
READ_BUFFER_BYTES = 1 << 16
# Rows per batch at most: a batch's Arrow arrays and their float64 copies.
MAX_BATCH_ROWS = 8192


@dataclass
class ValueSummary:
    """What one pass over some rows found; :meth:`merge` adds another piece's.

    ``mean`` and ``m2`` (sum of squared deviations from the mean) are float64
    of shape ``(n_features,)``, merged with Chan et al.'s pairwise formula, which
    keeps the variance accurate where the naive sum of squares cancels.
    """

    rows: int
    mean: np.ndarray
    m2: np.ndarray
    # column -> (count, first file with such values)
    nulls: dict[str, tuple[int, str]] = field(default_factory=dict)
    nonfinite: dict[str, tuple[int, str]] = field(default_factory=dict)
    labels: list[Any] = field(default_factory=list)

    @classmethod
    def empty(cls, n_features: int) -> "ValueSummary":
        return cls(rows=0, mean=np.zeros(n_features), m2=np.zeros(n_features))

    def merge(self, other: "ValueSummary") -> None:
        if other.rows:
            total = self.rows + other.rows
            delta = other.mean - self.mean
            self.m2 = self.m2 + other.m2 + delta * delta * (self.rows * other.rows / total)
            self.mean = self.mean + delta * (other.rows / total)
            self.rows = total
        for mine, theirs in ((self.nulls, other.nulls), (self.nonfinite, other.nonfinite)):
            for name, (count, path) in theirs.items():
                before = mine.get(name, (0, path))
                mine[name] = (before[0] + count, before[1])
        self.labels = sorted(set(self.labels) | set(other.labels))[: LABEL_VALUES_KEPT + 1]


def summarize(frame: pl.DataFrame, plan: InputPlan, path: Path) -> ValueSummary:
    """Checks and moments of one batch of rows (all planned columns) read from ``path``."""
    raw = feature_matrix(frame, plan)  # (n, k) float64
    k = raw.shape[1]
    mean = raw.mean(axis=1) if k else np.zeros(raw.shape[0])
    deviations = raw - mean[:, None]
    m2 = np.einsum("ij,ij->i", deviations, deviations)
    summary = ValueSummary(rows=k, mean=mean, m2=m2)
    for name in [*plan.features, plan.label]:
        count = frame.get_column(name).null_count()
        if count:
            summary.nulls[name] = (count, str(path))
    for j, name in enumerate(plan.features):
        if plan.schema[name].is_float():
            count = int(k - np.count_nonzero(np.isfinite(raw[j])))
            if count:
                summary.nonfinite[name] = (count, str(path))
    values = frame.get_column(plan.label).drop_nulls().unique().sort().head(LABEL_VALUES_KEPT + 1)
    summary.labels = values.to_list()
    return summary


def finish_summary(
    plan: InputPlan, summary: ValueSummary, positive_label: str | None, standardize: bool
) -> tuple[LabelMapping, np.ndarray, np.ndarray]:
    """Raise for bad values as :func:`~flows.dataset.validate_values` does; else the
    label mapping and the feature ``mean`` and ``scale`` (float64, ``(n_features,)``)."""
    if summary.rows == 0:
        raise DataError("no rows", path=_where(plan))
    for name, (count, path) in summary.nulls.items():
        raise DataError(f"{count} null values", path=path, column=name)
    for name, (count, path) in summary.nonfinite.items():
        raise DataError(f"{count} NaN or infinite values", path=path, column=name)
    mapping = label_mapping(
        plan, summary.labels[:LABEL_VALUES_KEPT], len(summary.labels), positive_label
    )
    n = len(plan.features)
    if not standardize:
        return mapping, np.zeros(n), np.ones(n)
    mean = summary.mean
    std = np.sqrt(summary.m2 / summary.rows)
    for j, name in enumerate(plan.features):
        if not (math.isfinite(mean[j]) and math.isfinite(std[j])):
            raise DataError("values too large to standardize", path=_where(plan), column=name)
    # The in-memory rule (flows.dataset._statistics): a (near-)constant feature
    # is centered and left unscaled, as StandardScaler does.
    constant = std <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
    return mapping, mean, np.where(constant, 1.0, std)


def feature_matrix(frame: pl.DataFrame, plan: InputPlan) -> np.ndarray:
    """The batch's features as float64 ``(n_features, k)``, cast as the in-memory path does."""
    X = np.empty((len(plan.features), frame.height))  # (n, k)
    for j, name in enumerate(plan.features):
        X[j] = frame.get_column(name).cast(pl.Float64).to_numpy()
    return X


def kernel_arrays(
    frame: pl.DataFrame,
    plan: InputPlan,
    mapping: LabelMapping,
    mean: np.ndarray,
    scale: np.ndarray,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """``X`` ``(n, k)`` standardized and ``Y`` ``(1, k)`` in ``dtype``, value for value
    what :func:`flows.dataset.load_dataset` puts in those columns."""
    X = np.empty((len(plan.features), frame.height), dtype=dtype)  # (n, k)
    for j, name in enumerate(plan.features):
        values = frame.get_column(name).cast(pl.Float64).to_numpy()
        with np.errstate(over="ignore"):
            # The same float64 arithmetic as load_dataset, so the bits match.
            X[j] = (values - mean[j]) / scale[j]
        if dtype != np.float64 and not np.all(np.isfinite(X[j])):
            raise DataError(f"values exceed the {dtype} range", path=_where(plan), column=name)
    labels = frame.get_column(plan.label)
    Y = (labels == mapping.positive).to_numpy().astype(dtype).reshape(1, -1)  # (1, k)
    return X, Y


def iter_batches(
    plan: InputPlan, path: Path, batch_rows: int, row_groups: list[int] | None = None
) -> Iterator[pl.DataFrame]:
    """The planned columns of ``path`` (or of its ``row_groups``) in batches of ``batch_rows``."""
    columns = [*plan.features, plan.label]
    try:
        parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        for batch in parquet.iter_batches(
            batch_size=min(batch_rows, MAX_BATCH_ROWS),
            row_groups=row_groups,
            columns=columns,
            use_threads=False,
        ):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            yield frame
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read data ({error})", path=path) from None


# Over pieces, every metric merges exactly from sums and counts except ROC AUC, a
# rank statistic: exactly it needs every score in one place (16 bytes per
# example, more than a stream run's memory budget allows at the sizes that
# backend exists for). It is computed from per-piece histograms of the scores,
# AUC_BINS bins over log-odds in [-AUC_RANGE, AUC_RANGE] (clamped beyond): pairs
# in one bin count one half, so the error is below half the share of
# positive/negative pairs that share a bin (~1e-5 for spread-out scores).
AUC_BINS = 1 << 16
AUC_RANGE = 20.0


def piece_sums(Z: np.ndarray, Y: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """What :func:`merge_metrics` needs of one piece: counts, sums and score histograms.

    ``Z`` and ``Y`` are the piece's scores and 0/1 labels, both ``(1, k)``.
    """
    Z64 = Z.astype(np.float64, copy=False).ravel()
    actual = Y.ravel() == 1.0
    predicted = Z64 >= math.log(threshold) - math.log1p(-threshold)
    losses = np.maximum(Z64, 0.0) + np.log1p(np.exp(-np.abs(Z64))) - actual * Z64
    bins = np.clip(
        ((Z64 + AUC_RANGE) * (AUC_BINS / (2 * AUC_RANGE))).astype(np.int64), 0, AUC_BINS - 1
    )
    return {
        "n": int(Z64.size),
        "positives": int(np.count_nonzero(actual)),
        "predicted": int(np.count_nonzero(predicted)),
        "true_positives": int(np.count_nonzero(predicted & actual)),
        "correct": int(np.count_nonzero(predicted == actual)),
        "loss_sum": float(np.sum(losses)),
        "positive_histogram": np.bincount(bins[actual], minlength=AUC_BINS),
        "negative_histogram": np.bincount(bins[~actual], minlength=AUC_BINS),
    }


def merge_metrics(pieces: list[dict[str, Any]]) -> dict[str, float]:
    """:func:`lr_kernel.metrics.binary_metrics` of the union of disjoint pieces.

    ``pieces`` come from :func:`piece_sums`, in a fixed order. Every metric is
    exact (to rounding) but ``roc_auc``, which is within a histogram bin's
    ties of the exact value (see ``AUC_BINS``).
    """
    n = sum(p["n"] for p in pieces)
    positives = sum(p["positives"] for p in pieces)
    predicted = sum(p["predicted"] for p in pieces)
    true_positives = sum(p["true_positives"] for p in pieces)
    positive_histogram = np.sum([p["positive_histogram"] for p in pieces], axis=0)
    negative_histogram = np.sum([p["negative_histogram"] for p in pieces], axis=0)
    negatives = n - positives
    if positives and negatives:
        negatives_below = np.cumsum(negative_histogram) - negative_histogram
        twice_wins = int(
            np.sum(
                2 * positive_histogram * negatives_below + positive_histogram * negative_histogram
            )
        )
        auc = twice_wins / (2 * positives * negatives)
    else:
        auc = math.nan
    return {
        "log_loss": math.fsum(p["loss_sum"] for p in pieces) / n,
        "accuracy": sum(p["correct"] for p in pieces) / n,
        "precision": true_positives / predicted if predicted else 0.0,
        "recall": true_positives / positives if positives else 0.0,
        "f1": 2 * true_positives / (predicted + positives) if true_positives else 0.0,
        "roc_auc": auc,
        "n_examples": float(n),
        "positive_rate": positives / n,
    }

"""Metrics over pieces of the data (stream chunks, Dask shards): partial sums merged exactly.

Every metric merges exactly from sums and counts except ROC AUC, a rank
statistic, which merges from per-piece score histograms (see ``AUC_BINS``).
"""

import math
from typing import Any

import numpy as np

# Over pieces, every metric merges exactly from sums and counts except ROC AUC, a
# rank statistic: exactly it needs every score in one place (16 bytes per
# example, more than a stream run's memory budget allows at the sizes that
# backend exists for). It is computed from per-piece histograms of the scores,
# AUC_BINS bins over log-odds in [-AUC_RANGE, AUC_RANGE] (clamped beyond): pairs
# in one bin count one half, so the error is below half the share of
# positive/negative pairs that share a bin (~1e-5 for spread-out scores).
AUC_BINS = 1 << 16
AUC_RANGE = 20.0


def piece_sums(
    Z: np.ndarray, Y: np.ndarray, weight: np.ndarray | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """What :func:`merge_metrics` needs of one piece: counts, sums and score histograms.

    ``Z`` and ``Y`` are the piece's scores and 0/1 labels, both ``(1, k)``;
    ``weight`` (``(1, k)``, optional) weights every sum but the row count ``n``.
    """
    Z64 = Z.astype(np.float64, copy=False).ravel()
    s = np.ones(Z64.size) if weight is None else weight.astype(np.float64, copy=False).ravel()
    actual = Y.ravel() == 1.0
    predicted = Z64 >= math.log(threshold) - math.log1p(-threshold)
    losses = np.maximum(Z64, 0.0) + np.log1p(np.exp(-np.abs(Z64))) - actual * Z64
    bins = np.clip(
        ((Z64 + AUC_RANGE) * (AUC_BINS / (2 * AUC_RANGE))).astype(np.int64), 0, AUC_BINS - 1
    )
    return {
        "n": int(Z64.size),
        "total": float(np.sum(s)),
        "positives": float(np.sum(s[actual])),
        "predicted": float(np.sum(s[predicted])),
        "true_positives": float(np.sum(s[predicted & actual])),
        "correct": float(np.sum(s[predicted == actual])),
        "loss_sum": float(np.dot(s, losses)),
        "positive_histogram": np.bincount(bins[actual], s[actual], minlength=AUC_BINS),
        "negative_histogram": np.bincount(bins[~actual], s[~actual], minlength=AUC_BINS),
    }


def merge_metrics(pieces: list[dict[str, Any]]) -> dict[str, float]:
    """:func:`lr_kernel.metrics.binary_metrics` of the union of disjoint pieces.

    ``pieces`` come from :func:`piece_sums`, in a fixed order. Every metric is
    exact (to rounding) but ``roc_auc``, which is within a histogram bin's
    ties of the exact value (see ``AUC_BINS``).
    """
    n = sum(p["n"] for p in pieces)
    total = math.fsum(p["total"] for p in pieces)
    positives = math.fsum(p["positives"] for p in pieces)
    predicted = math.fsum(p["predicted"] for p in pieces)
    true_positives = math.fsum(p["true_positives"] for p in pieces)
    positive_histogram = np.sum([p["positive_histogram"] for p in pieces], axis=0)
    negative_histogram = np.sum([p["negative_histogram"] for p in pieces], axis=0)
    negatives = total - positives
    if positives and negatives:
        negatives_below = np.cumsum(negative_histogram) - negative_histogram
        twice_wins = float(
            np.sum(
                2 * positive_histogram * negatives_below + positive_histogram * negative_histogram
            )
        )
        auc = twice_wins / (2 * positives * negatives)
    else:
        auc = math.nan
    return {
        "log_loss": math.fsum(p["loss_sum"] for p in pieces) / total,
        "accuracy": math.fsum(p["correct"] for p in pieces) / total,
        "precision": true_positives / predicted if predicted else 0.0,
        "recall": true_positives / positives if positives else 0.0,
        "f1": 2 * true_positives / (predicted + positives) if true_positives else 0.0,
        "roc_auc": auc,
        "n_examples": float(n),
        "positive_rate": positives / total,
    }

"""The l2 / learning-rate search: a held-out split, every candidate in one fit, the choice, Parquet.

Until the shared validation split of issue 5 (``--validation-fraction``,
``--seed``) lands, :func:`stratified_split` is this module's own, with a fixed
fraction and seed; it is to be replaced by that split, and then the search
uses the run's validation split.
"""

import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from flows.config import TrainConfig
from flows.dataset import Dataset
from flows.errors import DataError, DivergedError
from flows.outputs import run_metadata, with_metadata, write_table_atomic
from lr_kernel import FitResult, GridFitResult, fit
from lr_kernel.metrics import binary_metrics

VALIDATION_FRACTION = 0.2
SEED = 0

SEARCH_SCHEMA = pa.schema(
    [
        ("candidate", pa.int64()),
        ("l2", pa.float64()),
        ("learning_rate", pa.float64()),
        ("iterations", pa.int64()),
        ("stop_reason", pa.string()),
        ("train_cost", pa.float64()),
        ("validation_log_loss", pa.float64()),
        ("selected", pa.bool_()),
    ]
)
SEARCH_COST_HISTORY_SCHEMA = pa.schema(
    [("candidate", pa.int64()), ("iteration", pa.int64()), ("cost", pa.float64())]
)


def is_search(config: TrainConfig) -> bool:
    """True when the config names more than one candidate (a list of l2s or learning rates)."""
    return isinstance(config.l2, list) or isinstance(config.learning_rate, list)


@dataclass(frozen=True)
class SearchResult:
    """Every candidate trained on the training rows, scored on the held-out rows.

    Attributes
    ----------
    train : Dataset
        The training rows, standardized with their own statistics; the selected
        model's parameters are on its scale.
    n_validation : int
        Held-out rows.
    grid : GridFitResult
        ``w`` of shape ``(n_features, K)``: column ``k`` is candidate ``k``.
    validation_log_loss : ndarray of shape (K,)
        Mean log-loss on the held-out rows; NaN for a diverged candidate.
    selected : int
        The candidate with the lowest validation log-loss (the first on a tie).
    """

    train: Dataset
    n_validation: int
    grid: GridFitResult
    validation_log_loss: np.ndarray
    selected: int

    @property
    def selected_result(self) -> FitResult:
        return self.grid.candidate(self.selected)

    def selected_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the selected candidate's values: what ``params.parquet`` holds."""
        update: dict[str, float] = {"l2": float(self.grid.l2[self.selected])}
        rate = float(self.grid.learning_rate[self.selected])
        update["learning_rate"] = rate if math.isfinite(rate) else _first(config.learning_rate)
        return config.model_copy(update=update)

    def summary(self, config: TrainConfig) -> dict[str, float]:
        """The selected values, their validation log-loss and the number of candidates."""
        chosen = self.selected_config(config)
        return {
            "l2": _first(chosen.l2),
            "learning_rate": _first(chosen.learning_rate),
            "validation_log_loss": float(self.validation_log_loss[self.selected]),
            "candidates": float(len(self.grid)),
        }


def stratified_split(
    Y: np.ndarray, fraction: float = VALIDATION_FRACTION, seed: int = SEED, *, where: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split holding out ``fraction`` of each label's examples.

    Parameters
    ----------
    Y : ndarray of shape (1, n_examples), 0.0/1.0
    fraction : float in (0, 1)
    seed : int
        The same seed and labels give the same split.
    where : path or text, optional
        Named in the error when a label has fewer than two examples.

    Returns
    -------
    train, validation : sorted int64 index arrays into the examples; each label
    has at least one example on each side.
    """
    y = Y.ravel()
    rng = np.random.default_rng(seed)
    held_out = []
    for value in (0.0, 1.0):
        members = np.flatnonzero(y == value)
        if members.size < 2:
            raise DataError(
                "a search over several l2 / learning-rate values holds out part of each label "
                f"for validation, and the label {'positive' if value else 'negative'} class "
                f"has {members.size} example(s); it needs at least 2",
                path=where,
            )
        count = min(max(round(fraction * members.size), 1), members.size - 1)
        held_out.append(rng.choice(members, size=count, replace=False))
    validation = np.sort(np.concatenate(held_out)).astype(np.int64)
    train = np.setdiff1d(np.arange(y.size, dtype=np.int64), validation, assume_unique=True)
    return train, validation


def split_dataset(
    dataset: Dataset, train: np.ndarray, validation: np.ndarray
) -> tuple[Dataset, Dataset]:
    """Copy the two sides out of ``dataset``, standardized with the training rows' statistics.

    ``dataset.X`` was standardized with every row's mean and standard deviation;
    the training side's own are folded in (``x' = (x - mean') / scale'``), so no
    statistic of the held-out rows reaches the model. The copies double ``X``'s
    memory while the search runs.
    """
    X_train = dataset.X[:, train]  # (n, m_train), a copy
    X_validation = dataset.X[:, validation]  # (n, m_validation), a copy
    mean, scale = dataset.mean, dataset.scale
    if dataset.standardized:
        shift = X_train.mean(axis=1, dtype=np.float64)  # (n,), in standardized units
        spread = X_train.std(axis=1, dtype=np.float64)  # (n,), population (ddof=0)
        mean = dataset.mean + dataset.scale * shift
        raw_spread = dataset.scale * spread
        # The same constant-feature rule as flows.dataset: centered, left unscaled.
        constant = raw_spread <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
        scale = np.where(constant, 1.0, raw_spread)
        factor = (dataset.scale / scale)[:, None]  # (n, 1)
        for X in (X_train, X_validation):
            X -= shift[:, None].astype(X.dtype)
            X *= factor.astype(X.dtype)
    sides = []
    for X, rows in ((X_train, train), (X_validation, validation)):
        sides.append(
            replace(
                dataset, X=np.ascontiguousarray(X), Y=dataset.Y[:, rows], mean=mean, scale=scale
            )
        )
    return sides[0], sides[1]


def run_search(dataset: Dataset, config: TrainConfig, n_threads: int) -> SearchResult:
    """Split, train every candidate together on the training rows, select on the held-out rows."""
    where = dataset.files[0] if len(dataset.files) == 1 else dataset.files[0].parent
    train_rows, validation_rows = stratified_split(dataset.Y, where=where)
    train, validation = split_dataset(dataset, train_rows, validation_rows)
    rates = None if config.optimizer == "lbfgs" else _listed(config.learning_rate)
    # As for a single fit: the kernel's own threads, BLAS on one thread under them.
    with threadpool_limits(limits=1, user_api="blas"):
        grid = fit(
            train.X,
            train.Y,
            l2=_listed(config.l2),
            learning_rate=rates,
            iterations=config.iterations,
            tol=config.tol,
            optimizer=config.optimizer,
            n_threads=n_threads,
        )
    Z = grid.w.T.astype(np.float64) @ validation.X + grid.b[:, None]  # (K, m_validation)
    losses = np.array(
        [
            math.nan
            if reason == "diverged"
            else binary_metrics(Z[k : k + 1], validation.Y)["log_loss"]
            for k, reason in enumerate(grid.stop_reason)
        ]
    )
    if np.isnan(losses).all():
        raise DivergedError(
            f"training diverged for all {len(grid)} candidates: the learning rates "
            f"{', '.join(f'{r:g}' for r in rates or [])} are too large for this data; "
            "try smaller ones"
        )
    return SearchResult(
        train=train,
        n_validation=validation.n_examples,
        grid=grid,
        validation_log_loss=losses,
        selected=int(np.nanargmin(losses)),
    )


def search_rows(search: SearchResult) -> list[dict[str, Any]]:
    """One row per candidate (JSON-friendly: missing values are None), as in ``search.parquet``."""
    grid = search.grid
    return [
        {
            "candidate": k,
            "l2": float(grid.l2[k]),
            "learning_rate": _or_none(grid.learning_rate[k]),
            "iterations": int(grid.n_iterations[k]),
            "stop_reason": grid.stop_reason[k],
            "train_cost": float(grid.cost_history[k][-1]),
            "validation_log_loss": _or_none(search.validation_log_loss[k]),
            "selected": k == search.selected,
        }
        for k in range(len(grid))
    ]


def search_table(search: SearchResult) -> pa.Table:
    return pa.Table.from_pylist(search_rows(search), schema=SEARCH_SCHEMA)


def search_cost_history_table(search: SearchResult) -> pa.Table:
    """Long format: one row per (candidate, iteration)."""
    histories = search.grid.cost_history
    return pa.table(
        {
            "candidate": np.repeat(
                np.arange(len(histories), dtype=np.int64), [h.size for h in histories]
            ),
            "iteration": np.concatenate([np.arange(h.size, dtype=np.int64) for h in histories]),
            "cost": np.concatenate(histories).astype(np.float64),
        },
        schema=SEARCH_COST_HISTORY_SCHEMA,
    )


def write_search_outputs(
    output: Path,
    search: SearchResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str | None = None,
) -> list[Path]:
    """Write ``search.parquet`` and ``search_cost_history.parquet``, each atomically."""
    metadata = run_metadata(
        search.train, search.selected_result, config, started_at=started_at, run_id=run_id
    )
    metadata["search"] = {
        "validation": "stratified by label, held out before standardizing",
        "validation_fraction": VALIDATION_FRACTION,
        "seed": SEED,
        "n_validation": search.n_validation,
        "selected": search.selected,
    }
    tables = {
        "search.parquet": search_table(search),
        "search_cost_history.parquet": search_cost_history_table(search),
    }
    return [
        write_table_atomic(with_metadata(table, metadata), output / name)
        for name, table in tables.items()
    ]


def _or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _first(value: float | list[float]) -> float:
    return value[0] if isinstance(value, list) else value


def _listed(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]

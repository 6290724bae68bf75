"""The l2 / learning-rate search: every candidate in one fit, the choice, and its Parquet.

Candidates train together on the run's training rows and are compared on its
validation rows (``--validation-fraction`` / ``--validation-data``), whose
standardization statistics came from the training rows alone.
"""

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from flows import arrow
from flows.backends import Grid, TrainingData
from flows.config import TrainConfig
from flows.errors import DataError, DivergedError
from flows.outputs import run_metadata, with_metadata
from flows.threads import kernel_threads
from lr_kernel import FitResult, GridFitResult

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
    train : TrainingData
        The run's data; the selected model's parameters are on its plan's scale.
    n_validation : int
        Held-out rows.
    grid : GridFitResult
        ``w`` of shape ``(n_features, K)``: column ``k`` is candidate ``k``.
    validation_log_loss : ndarray of shape (K,)
        Mean log-loss on the held-out rows; NaN for a diverged candidate.
    selected : int
        The candidate with the lowest validation log-loss (the first on a tie).
    """

    train: TrainingData
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


def run_search(data: TrainingData, config: TrainConfig, n_threads: int) -> SearchResult:
    """Train every candidate on the training rows, select on the held-out rows."""
    validation = data.validation_loss()
    if validation is None:
        raise DataError(
            "a search over several l2 / learning-rate values selects on validation data: "
            "give --validation-fraction > 0 or --validation-data"
        )
    rates = None if config.optimizer == "lbfgs" else _listed(config.learning_rate)
    # As for a single fit: the kernel's own threads, BLAS on one thread under them.
    with kernel_threads(n_threads):
        grid = data.fit_candidates(
            Grid(
                l2=tuple(_listed(config.l2)),
                learning_rate=None if rates is None else tuple(rates),
                iterations=config.iterations,
                tol=config.tol,
                optimizer=config.optimizer,
                n_threads=n_threads,
            )
        )
    # The held-out rows' (weighted) mean log-loss: the validation loss without penalty.
    losses = np.array(
        [
            math.nan
            if reason == "diverged"
            else float(validation(grid.w[:, k : k + 1], float(grid.b[k]), 0.0)[0])
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
        train=data,
        n_validation=data.n_validation,
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
    return arrow.table_from_rows(search_rows(search), SEARCH_SCHEMA)


def search_cost_history_table(search: SearchResult) -> pa.Table:
    """Long format: one row per (candidate, iteration)."""
    histories = search.grid.cost_history
    return arrow.table(
        {
            "candidate": np.repeat(
                np.arange(len(histories), dtype=np.int64), [h.size for h in histories]
            ),
            "iteration": np.concatenate([np.arange(h.size, dtype=np.int64) for h in histories]),
            "cost": np.concatenate(histories).astype(np.float64),
        },
        SEARCH_COST_HISTORY_SCHEMA,
    )


def search_tables(
    search: SearchResult, config: TrainConfig, *, started_at: datetime, run_id: str | None
) -> dict[str, pa.Table]:
    """``search.parquet`` and ``search_cost_history.parquet``, with the run's metadata.

    They join the run's output set (one ``_SUCCESS`` for all files).
    """
    metadata = run_metadata(
        search.train, search.selected_result, config, started_at=started_at, run_id=run_id
    )
    metadata["search"] = {
        "validation_fraction": config.effective_validation_fraction,
        "validation_data": config.validation_data,
        "seed": config.seed,
        "n_validation": search.n_validation,
        "selected": search.selected,
    }
    tables = {
        "search.parquet": search_table(search),
        "search_cost_history.parquet": search_cost_history_table(search),
    }
    return {name: with_metadata(table, metadata) for name, table in tables.items()}


def _or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _first(value: float | list[float] | str) -> float:
    # A learning rate of "auto" is resolved to a number before any search.
    return float(value[0] if isinstance(value, list) else value)


def _listed(value: float | list[float] | str) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]

"""The train flow: Parquet -> Dataset -> lr_kernel.fit -> Parquet, as three coarse tasks."""

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import TrainConfig
from flows.dataset import Dataset, load_dataset, plan_inputs
from flows.errors import DivergedError, LrflowError
from flows.outputs import evaluate, metrics_rows, write_run_outputs
from lr_kernel import FitResult, fit
from lr_kernel.metrics import HeldOutCost


class _ExpectedErrorsWithoutTraceback(logging.Filter):
    """Our errors carry a complete one-line reason; a traceback under it only adds noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LrflowError):
            record.exc_info = None
            record.exc_text = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_ExpectedErrorsWithoutTraceback())


class TrainSummary(BaseModel):
    """What a train run returns (and the CLI prints)."""

    output: str
    files: list[str]
    n_examples: int
    n_features: int
    n_iterations: int
    final_cost: float
    stop_reason: str
    seconds: float
    n_validation_examples: int = 0
    metrics: dict[str, dict[str, float]] = {}


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry I/O failures; bad input or a diverged fit will not fix itself."""
    return not isinstance(state.data, LrflowError)


def fit_dataset(dataset: Dataset, config: TrainConfig, monitor=None) -> FitResult:
    """Train on a loaded dataset; a diverged run raises instead of returning garbage."""
    result = fit(
        dataset.X,
        dataset.Y,
        learning_rate=config.learning_rate,
        iterations=config.iterations,
        l2=config.l2,
        tol=config.tol,
        monitor=monitor,
    )
    if result.stop_reason == "diverged":
        raise DivergedError(
            f"training diverged at iteration {result.n_iterations} "
            f"(cost {result.cost_history[-1]:.6g}, started at {result.cost_history[0]:.6g}): "
            f"learning rate {config.learning_rate:g} is too large for this data; try a smaller one"
        )
    return result


def fit_with_validation_cost(
    dataset: Dataset, config: TrainConfig
) -> tuple[FitResult, np.ndarray | None]:
    """:func:`fit_dataset`, plus the validation log-loss every ``validation_every`` updates.

    Returns the result and the validation cost per iteration, ``(n_iterations + 1,)``
    with NaN where not evaluated (the final iteration always is), or None.
    """
    held_out = dataset.validation
    if held_out is None:
        return fit_dataset(dataset, config), None
    monitor = HeldOutCost(held_out.X, held_out.Y, every=config.validation_every)
    result = fit_dataset(dataset, config, monitor)
    return result, monitor.history(result.n_iterations, result.w, result.b)


def publish_metrics(metrics: dict[str, dict[str, float]], key: str) -> None:
    """The metrics as a small table artifact in the Prefect UI."""
    create_table_artifact(
        table=metrics_rows(metrics), key=key, description="Metrics per split (metrics.parquet)"
    )


# Large arrays pass between these tasks: hashing them for a cache key would cost a
# pass over X for nothing, so none of them caches.
@task(
    name="load-data",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def load_data(config: TrainConfig) -> Dataset:
    plan = plan_inputs(config.data, config.label, config.features)
    validation_plan = None
    if config.validation_data is not None:
        validation_plan = plan_inputs(config.validation_data, config.label, plan.features)
    return load_dataset(
        plan,
        standardize=config.standardize,
        dtype=config.dtype,
        positive_label=config.positive_label,
        validation_fraction=config.effective_validation_fraction,
        seed=config.seed,
        validation_plan=validation_plan,
    )


@task(name="fit", cache_policy=NO_CACHE)
def fit_model(dataset: Dataset, config: TrainConfig) -> tuple[FitResult, np.ndarray | None]:
    return fit_with_validation_cost(dataset, config)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(dataset: Dataset, result: FitResult) -> dict[str, dict[str, float]]:
    return evaluate(dataset, result)


@task(
    name="write-outputs",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def write_outputs(
    dataset: Dataset,
    result: FitResult,
    config: TrainConfig,
    started_at: datetime,
    validation_cost: np.ndarray | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
) -> list[Path]:
    return write_run_outputs(
        Path(config.output),
        dataset,
        result,
        config,
        started_at=started_at,
        run_id=flow_run.id,
        validation_cost=validation_cost,
        metrics=metrics,
    )


@flow(name="train", validate_parameters=True)
def train(config: TrainConfig) -> TrainSummary:
    """Train logistic regression on Parquet data and write params, cost history and metrics."""
    logger = get_run_logger()
    logger.info("config: %s", config.model_dump_json())
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    dataset = load_data(config)
    logger.info(
        "loaded %d examples x %d features from %d file(s)",
        dataset.n_examples,
        len(dataset.features),
        len(dataset.files),
    )
    if dataset.validation is not None:
        logger.info("holding out %d examples for validation", dataset.validation.n_examples)
    result, validation_cost = fit_model(dataset, config)
    logger.info(
        "fit stopped after %d iterations (%s), cost %.6g",
        result.n_iterations,
        result.stop_reason,
        result.cost_history[-1],
    )
    metrics = evaluate_model(dataset, result)
    files = write_outputs(dataset, result, config, started_at, validation_cost, metrics)
    publish_metrics(metrics, "train-metrics")
    return TrainSummary(
        output=config.output,
        files=[str(p) for p in files],
        n_examples=dataset.n_examples,
        n_features=len(dataset.features),
        n_iterations=result.n_iterations,
        final_cost=float(result.cost_history[-1]),
        stop_reason=result.stop_reason,
        seconds=time.perf_counter() - clock,
        n_validation_examples=0 if dataset.validation is None else dataset.validation.n_examples,
        metrics=metrics,
    )


if __name__ == "__main__":
    from flows.cli import main

    main(["train", *__import__("sys").argv[1:]])

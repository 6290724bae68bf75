"""The train flow: Parquet -> Dataset -> lr_kernel.fit -> Parquet, as three coarse tasks."""

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.artifacts import (
    publish_run_artifacts,
    start_importing_matplotlib,
    training_progress,
    write_cost_curve,
)
from flows.config import TrainConfig
from flows.dataset import Dataset, load_dataset, plan_inputs
from flows.errors import DivergedError, LrflowError
from flows.outputs import write_run_outputs
from lr_kernel import FitResult, fit


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


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry I/O failures; bad input or a diverged fit will not fix itself."""
    return not isinstance(state.data, LrflowError)


def fit_dataset(
    dataset: Dataset, config: TrainConfig, callback: Callable[[int, float], None] | None = None
) -> FitResult:
    """Train on a loaded dataset; a diverged run raises instead of returning garbage."""
    result = fit(
        dataset.X,
        dataset.Y,
        learning_rate=config.learning_rate,
        iterations=config.iterations,
        l2=config.l2,
        tol=config.tol,
        callback=callback,
    )
    if result.stop_reason == "diverged":
        raise DivergedError(
            f"training diverged at iteration {result.n_iterations} "
            f"(cost {result.cost_history[-1]:.6g}, started at {result.cost_history[0]:.6g}): "
            f"learning rate {config.learning_rate:g} is too large for this data; try a smaller one"
        )
    return result


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
    return load_dataset(
        plan,
        standardize=config.standardize,
        dtype=config.dtype,
        positive_label=config.positive_label,
    )


@task(name="fit", cache_policy=NO_CACHE)
def fit_model(dataset: Dataset, config: TrainConfig) -> FitResult:
    with training_progress(config.iterations) as on_update:
        return fit_dataset(dataset, config, callback=on_update)


@task(
    name="write-outputs",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def write_outputs(
    dataset: Dataset, result: FitResult, config: TrainConfig, started_at: datetime
) -> list[Path]:
    files = write_run_outputs(
        Path(config.output), dataset, result, config, started_at=started_at, run_id=flow_run.id
    )
    return [*files, write_cost_curve(result.cost_history, Path(config.output))]


@task(name="publish-artifacts", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def publish_artifacts(
    dataset: Dataset, result: FitResult, config: TrainConfig, files: list[Path], seconds: float
) -> None:
    publish_run_artifacts(
        config=config,
        files=dataset.files,
        n_examples=dataset.n_examples,
        features=dataset.features,
        cost_history=result.cost_history,
        n_iterations=result.n_iterations,
        stop_reason=result.stop_reason,
        seconds=seconds,
        outputs=files,
    )


@flow(name="train", validate_parameters=True)
def train(config: TrainConfig) -> TrainSummary:
    """Train logistic regression on Parquet data and write params, cost history and metrics."""
    logger = get_run_logger()
    logger.info("config: %s", config.model_dump_json())
    start_importing_matplotlib()  # for cost_history.png, overlapping the work below
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    dataset = load_data(config)
    logger.info(
        "loaded %d examples x %d features from %d file(s)",
        dataset.n_examples,
        len(dataset.features),
        len(dataset.files),
    )
    result = fit_model(dataset, config)
    logger.info(
        "fit stopped after %d iterations (%s), cost %.6g",
        result.n_iterations,
        result.stop_reason,
        result.cost_history[-1],
    )
    files = write_outputs(dataset, result, config, started_at)
    publish_artifacts(dataset, result, config, files, time.perf_counter() - clock)
    return TrainSummary(
        output=config.output,
        files=[str(p) for p in files],
        n_examples=dataset.n_examples,
        n_features=len(dataset.features),
        n_iterations=result.n_iterations,
        final_cost=float(result.cost_history[-1]),
        stop_reason=result.stop_reason,
        seconds=time.perf_counter() - clock,
    )


if __name__ == "__main__":
    from flows.cli import main

    main(["train", *__import__("sys").argv[1:]])

"""The train flow: Parquet -> Dataset -> lr_kernel.fit -> Parquet, as three coarse tasks."""

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import TrainConfig
from flows.dataset import Dataset, check_output_location, load_dataset, plan_inputs
from flows.errors import DivergedError, LrflowError
from flows.outputs import write_run_outputs
from lr_kernel import FitResult, fit
from lr_kernel.stepsize import stable_learning_rate


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


def fit_dataset(dataset: Dataset, config: TrainConfig) -> FitResult:
    """Train on a loaded dataset; a diverged run raises instead of returning garbage."""
    learning_rate = resolve_learning_rate(dataset, config)
    result = fit(
        dataset.X,
        dataset.Y,
        learning_rate=learning_rate,
        iterations=config.iterations,
        l2=config.l2,
        tol=config.tol,
    )
    if result.stop_reason == "diverged":
        stable = stable_learning_rate(dataset.X, config.l2)
        raise DivergedError(
            f"training diverged at iteration {result.n_iterations} "
            f"(cost {result.cost_history[-1]:.6g}, started at {result.cost_history[0]:.6g}): "
            f"learning rate {learning_rate:g} is too large for this data; "
            f"{stable:.3g} is stable for it (or use --learning-rate auto)"
        )
    return result


def resolve_learning_rate(dataset: Dataset, config: TrainConfig) -> float:
    """The configured step, or for ``auto`` 1/L from the data (see lr_kernel.stepsize)."""
    if config.learning_rate == "auto":
        return stable_learning_rate(dataset.X, config.l2)
    return config.learning_rate


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
    check_output_location(config.data, config.output)
    return load_dataset(
        plan,
        standardize=config.standardize,
        dtype=config.dtype,
        positive_label=config.positive_label,
    )


@task(name="fit", cache_policy=NO_CACHE)
def fit_model(dataset: Dataset, config: TrainConfig) -> FitResult:
    return fit_dataset(dataset, config)


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
    return write_run_outputs(
        Path(config.output), dataset, result, config, started_at=started_at, run_id=flow_run.id
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
    if config.learning_rate == "auto":  # resolved once, so the outputs record the number
        config = config.model_copy(update={"learning_rate": resolve_learning_rate(dataset, config)})
        logger.info("learning rate auto: %.6g (1/L of the data)", config.learning_rate)
    result = fit_model(dataset, config)
    logger.info(
        "fit stopped after %d iterations (%s), cost %.6g",
        result.n_iterations,
        result.stop_reason,
        result.cost_history[-1],
    )
    files = write_outputs(dataset, result, config, started_at)
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

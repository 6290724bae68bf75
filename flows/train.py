"""The train flow: Parquet -> Dataset -> lr_kernel.fit -> Parquet, as three coarse tasks."""

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel
from threadpoolctl import threadpool_limits

from flows.config import TrainConfig
from flows.dataset import Dataset, load_dataset, plan_inputs
from flows.errors import DivergedError, LrflowError
from flows.outputs import write_run_outputs
from flows.search import SearchResult, is_search, run_search, search_rows, write_search_outputs
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
    # With several l2 / learning-rate candidates: the chosen one's values, its
    # validation log-loss and the number of candidates.
    selected: dict[str, float] | None = None


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry I/O failures; bad input or a diverged fit will not fix itself."""
    return not isinstance(state.data, LrflowError)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fit_dataset(dataset: Dataset, config: TrainConfig) -> FitResult:
    """Train on a loaded dataset; a diverged run raises instead of returning garbage."""
    # The kernel splits X's blocks over its own threads, each calling BLAS on
    # cache-sized blocks; a multi-threaded BLAS under them would oversubscribe
    # the cores and stall on every small call (benchmarks/RESULTS.md).
    with threadpool_limits(limits=1, user_api="blas"):
        result = fit(
            dataset.X,
            dataset.Y,
            learning_rate=config.learning_rate,
            iterations=config.iterations,
            l2=config.l2,
            tol=config.tol,
            optimizer=config.optimizer,
            n_threads=config.threads or available_cores(),
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


@task(name="search", cache_policy=NO_CACHE)
def search_model(dataset: Dataset, config: TrainConfig) -> SearchResult:
    return run_search(dataset, config, n_threads=config.threads or available_cores())


@task(
    name="write-search",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def write_search(search: SearchResult, config: TrainConfig, started_at: datetime) -> list[Path]:
    paths = write_search_outputs(
        Path(config.output), search, config, started_at=started_at, run_id=flow_run.id
    )
    create_table_artifact(
        table=search_rows(search),
        key="train-search",
        description=f"l2 / learning-rate search: {len(search.grid)} candidates trained together, "
        f"selected by log-loss on {search.n_validation} held-out examples",
    )
    return paths


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
    search = search_model(dataset, config) if is_search(config) else None
    if search is None:
        result = fit_model(dataset, config)
    else:
        dataset, result = search.train, search.selected_result
        logger.info(
            "search over %d candidates: selected %s (validation log-loss %.6g)",
            len(search.grid),
            search_rows(search)[search.selected],
            search.validation_log_loss[search.selected],
        )
    logger.info(
        "fit stopped after %d iterations (%s), cost %.6g",
        result.n_iterations,
        result.stop_reason,
        result.cost_history[-1],
    )
    files = write_outputs(
        dataset, result, config if search is None else search.selected_config(config), started_at
    )
    if search is not None:
        files += write_search(search, config, started_at)
    return TrainSummary(
        output=config.output,
        files=[str(p) for p in files],
        n_examples=dataset.n_examples,
        n_features=len(dataset.features),
        n_iterations=result.n_iterations,
        final_cost=float(result.cost_history[-1]),
        stop_reason=result.stop_reason,
        seconds=time.perf_counter() - clock,
        selected=None if search is None else search.summary(config),
    )


if __name__ == "__main__":
    from flows.cli import main

    main(["train", *__import__("sys").argv[1:]])

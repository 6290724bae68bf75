"""The train flow: Parquet -> TrainingData -> lr_kernel solvers -> Parquet, as coarse tasks."""

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows import storage
from flows.artifacts import (
    COST_CURVE_FILE,
    cost_curve_png,
    publish_history,
    publish_run_artifacts,
    training_progress,
)
from flows.backends import TrainingData, open_training_data, plan_run, requested_kernel
from flows.checkpoint import checkpoint_key, checkpoint_path, save_checkpoint, state_to_resume
from flows.config import TrainConfig
from flows.errors import DataError, DivergedError, LrflowError
from flows.inference import FitInference, check_fit
from flows.outputs import metrics_rows, run_output_files
from flows.search import SearchResult, is_search, run_search, search_rows, search_tables
from flows.store import (
    HeldOut,
    StoredRun,
    check_store,
    commit_run,
    read_history,
    summary_line,
)
from flows.threads import import_in_background, kernel_threads
from lr_kernel import FitResult, LossFunction, fit_loss
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
    # With several l2 / learning-rate candidates: the chosen one's values, its
    # validation log-loss and the number of candidates.
    selected: dict[str, float] | None = None
    # (column, role, detail) of every column, and the warnings about the data.
    columns: list[list[str]] = []
    warnings: list[str] = []
    # The model store: this run's directory, whether latest.json now names it, and why.
    run: str | None = None
    promoted: bool | None = None
    promotion: str | None = None
    # The fit's own warnings (not converged, aliased terms dropped, separation).
    diagnostics: list[str] = []


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures; bad input or a diverged fit will not fix itself."""
    return not isinstance(state.data, LrflowError)


def fit_dataset(
    data: TrainingData,
    config: TrainConfig,
    run_id: str | None = None,
    callback: Callable[[int, float], None] | None = None,
    monitor: Callable[[int, np.ndarray, float], None] | None = None,
) -> FitResult:
    """Train on a run's data; a diverged run raises instead of returning garbage.

    Checkpoints go to the output directory every ``config.checkpoint_every``
    iterations; a matching one is continued when ``config.resume`` is set or when
    this same run (``run_id``) wrote it, as when Prefect retries the fit task.
    """
    path = checkpoint_path(config)
    key = checkpoint_key(data, config)
    resume = state_to_resume(path, key, resume=config.resume, run_id=run_id)
    learning_rate = resolve_learning_rate(data, config)
    n_threads, engine = kernel_setting(data, config)
    with kernel_threads(n_threads):
        result = fit_loss(
            data.loss(n_threads=n_threads, engine=engine),
            learning_rate=learning_rate,
            iterations=config.iterations,
            l2=config.l2,  # type: ignore[arg-type]  # one value: a list is a search
            tol=config.tol,
            callback=callback,
            monitor=monitor,
            optimizer=config.optimizer,
            resume=resume,
            checkpoint_every=config.checkpoint_every,
            on_checkpoint=lambda state: save_checkpoint(path, state, key, run_id),
        )
    if result.stop_reason == "diverged":
        path.unlink(missing_ok=True)  # continuing a diverging run would only diverge again
        try:
            stable = data.stable_learning_rate(config.l2)  # type: ignore[arg-type]
            hint = f"{stable:.3g} is stable for it (or use --learning-rate auto)"
        except DataError:
            hint = "try a smaller one"
        raise DivergedError(
            f"training diverged at iteration {result.n_iterations} "
            f"(cost {result.cost_history[-1]:.6g}, started at {result.cost_history[0]:.6g}): "
            f"learning rate {learning_rate:g} is too large for this data; {hint}"
        )
    return result


def kernel_setting(data: TrainingData, config: TrainConfig) -> tuple[int, str]:
    """The kernel's threads and engine (``"auto"`` resolved where the data allows)."""
    return data.kernel_setting(*requested_kernel(config))


def resolve_learning_rate(data: TrainingData, config: TrainConfig) -> float | None:
    """The configured step, or for ``auto`` 1/L from the data (see lr_kernel.stepsize)."""
    if config.learning_rate == "auto":
        return data.stable_learning_rate(config.l2)  # type: ignore[arg-type]
    return config.learning_rate  # type: ignore[return-value]  # one value: a list is a search


class ValidationCost(HeldOutCost):
    """:class:`lr_kernel.metrics.HeldOutCost` on any backend's held-out rows: their (weighted)
    mean log-loss from the data's validation loss, every ``every``-th update."""

    def __init__(self, loss: LossFunction, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._costs: dict[int, float] = {}
        self._loss = loss

    def cost(self, w: np.ndarray, b: float) -> float:
        return float(self._loss(w, b, 0.0)[0])


def fit_with_validation_cost(
    data: TrainingData,
    config: TrainConfig,
    run_id: str | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[FitResult, np.ndarray | None]:
    """:func:`fit_dataset`, plus the validation log-loss every ``validation_every`` updates.

    Returns the result and the validation cost per iteration, ``(n_iterations + 1,)``
    with NaN where not evaluated (the final iteration always is), or None.
    """
    held_out = data.validation_loss()
    if held_out is None:
        return fit_dataset(data, config, run_id, callback), None
    monitor = ValidationCost(held_out, every=config.validation_every)
    result = fit_dataset(data, config, run_id, callback, monitor)
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
def load_data(config: TrainConfig) -> TrainingData:
    return open_training_data(config, *plan_run(config))


# A retry continues from this run's last checkpoint; divergence is never retried.
@task(
    name="fit",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def fit_model(data: TrainingData, config: TrainConfig) -> tuple[FitResult, np.ndarray | None]:
    run_id = str(flow_run.id) if flow_run.id else None
    n_threads, engine = kernel_setting(data, config)
    get_run_logger().info("kernel: %s engine, %d thread(s)", engine, n_threads)
    with training_progress(config.iterations) as on_update:
        return fit_with_validation_cost(data, config, run_id=run_id, callback=on_update)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(data: TrainingData, result: FitResult) -> dict[str, dict[str, float]]:
    """Every metric per split; ``weighted`` (1 or 0) says whether they weigh the rows."""
    weighted = float(data.plan.weighted)
    return {
        split: values | {"weighted": weighted}
        for split, values in data.metrics(result.w, result.b).items()
    }


@task(name="check-fit", retry_condition_fn=retry_unless_bad_input, cache_policy=NO_CACHE)
def check_model(
    data: TrainingData, result: FitResult, validation_cost: np.ndarray | None, config: TrainConfig
) -> tuple[FitResult, np.ndarray | None, FitInference]:
    """One Hessian pass at the fit: aliased terms (refit without them if asked), the Wald
    table, separation and convergence (flows.inference.check_fit)."""
    n_threads, engine = kernel_setting(data, config)
    with kernel_threads(n_threads):
        return check_fit(
            data,
            result,
            validation_cost,
            config,
            refit=fit_with_validation_cost,
            n_threads=n_threads,
            engine=engine,
        )


@task(
    name="write-outputs",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def write_outputs(
    data: TrainingData,
    result: FitResult,
    config: TrainConfig,
    started_at: datetime,
    validation_cost: np.ndarray | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    search: SearchResult | None = None,
    search_config: TrainConfig | None = None,
    inference: FitInference | None = None,
) -> StoredRun:
    run_id = str(flow_run.id or uuid.uuid4())
    extra: dict[str, bytes | pa.Table] = {
        COST_CURVE_FILE: cost_curve_png(
            result.cost_history, result.gradient_norm_history, validation_cost, config.tol
        )
    }
    if search is not None:  # the search's files join the same output set
        search_config = search_config or config
        extra |= search_tables(search, search_config, started_at=started_at, run_id=run_id)
    files = run_output_files(
        data,
        result,
        config,
        started_at=started_at,
        run_id=run_id,
        validation_cost=validation_cost,
        metrics=metrics,
        extra_files=extra,
        inference=inference,
    )
    return commit_run(
        storage.location(config.output),
        files,
        run_id=run_id,
        started_at=started_at,
        data_fingerprint=data.fingerprint,
        n_examples=data.n_examples,
        held_out=held_out_rows(data, result, metrics),
        promote=config.promote,
        tolerance=config.promote_tolerance,
        keep_runs=config.keep_runs,
    )


def held_out_rows(
    data: TrainingData, result: FitResult, metrics: dict[str, dict[str, float]] | None = None
) -> HeldOut | None:
    """The run's validation rows as the store compares models on them (None without any):
    the new model's validation log-loss (from ``metrics`` when given), and the same pass
    for the current model, on every backend."""
    if not data.n_validation:
        return None

    def log_loss(w: np.ndarray, b: float) -> float:
        loss = data.validation_log_loss(w, b)
        assert loss is not None  # the data has held-out rows
        return loss

    if metrics is not None and "validation" in metrics:
        challenger_loss = metrics["validation"]["log_loss"]
    else:
        challenger_loss = log_loss(result.w, result.b)
    plan, mapping = data.plan, data.plan.label_mapping
    mean, scale = plan.term_mean_scale()
    return HeldOut(
        terms=plan.terms,
        mean=mean,
        scale=scale,
        label=plan.label,
        negative=mapping.negative,
        positive=mapping.positive,
        challenger_log_loss=float(challenger_loss),
        log_loss=log_loss,
    )


@task(name="publish-artifacts", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def publish_artifacts(
    data: TrainingData,
    result: FitResult,
    config: TrainConfig,
    stored: StoredRun,
    seconds: float,
    diagnostics: tuple[str, ...] = (),
) -> None:
    publish_run_artifacts(
        config=config,
        files=data.files,
        n_examples=data.n_examples,
        features=data.plan.terms,
        cost_history=result.cost_history,
        n_iterations=result.n_iterations,
        stop_reason=result.stop_reason,
        seconds=seconds,
        outputs=list(stored.files),
        n_validation=data.n_validation,
        columns=data.plan.describe(),
        notes=data.plan.warnings,
        promotion=stored.comparison.rows(),
        diagnostics=diagnostics,
        gradient_norm=result.gradient_norm_history,
    )
    publish_history(read_history(stored.store))


@task(name="search", cache_policy=NO_CACHE)
def search_model(data: TrainingData, config: TrainConfig) -> SearchResult:
    return run_search(data, config, n_threads=requested_kernel(config)[0])


def publish_search(search: SearchResult) -> None:
    """The search as a table artifact: one row per candidate, the selected one marked."""
    create_table_artifact(
        table=search_rows(search),
        key="train-search",
        description=f"l2 / learning-rate search: {len(search.grid)} candidates trained together, "
        f"selected by log-loss on {search.n_validation} held-out examples",
    )


@flow(name="train", validate_parameters=True)
def train(config: TrainConfig) -> TrainSummary:
    """Train logistic regression on Parquet data and write params, cost history and metrics."""
    logger = get_run_logger()
    logger.info("config: %s", config.model_dump_json())
    check_store(storage.location(config.output))
    # For Newton's Cholesky solves and the statistics, then cost_history.png.
    import_in_background(
        "scipy.linalg", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"
    )
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    data = load_data(config)
    plan = data.plan
    logger.info(
        "loaded %d examples x %d terms from %d file(s) (%s backend)",
        data.n_examples,
        plan.n_terms,
        len(data.files),
        data.backend,
    )
    for column, role, detail in plan.describe():
        logger.info("column %r: %s (%s)", column, role, detail)
    for warning in plan.warnings:
        logger.warning(warning)
    try:
        if config.learning_rate == "auto":  # resolved once, so the outputs record the number
            learning_rate = resolve_learning_rate(data, config)
            config = config.model_copy(update={"learning_rate": learning_rate})
            logger.info("learning rate auto: %.6g (1/L of the data)", config.learning_rate)
        if data.n_validation:
            logger.info("holding out %d examples for validation", data.n_validation)
        search = search_model(data, config) if is_search(config) else None
        if search is None:
            result, validation_cost = fit_model(data, config)
            written_config = config
        else:
            result, validation_cost = search.selected_result, None
            written_config = search.selected_config(config)
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
        result, validation_cost, inference = check_model(
            data, result, validation_cost, written_config
        )
        for line in inference.warnings:
            logger.warning(line)
        metrics = evaluate_model(data, result)
        stored = write_outputs(
            data,
            result,
            written_config,
            started_at,
            validation_cost,
            metrics,
            search,
            config,
            inference,
        )
        logger.info(summary_line(stored))
    finally:
        data.close()  # stop a Dask cluster, drop a stream cache if asked
    checkpoint_path(config).unlink(missing_ok=True)  # the outputs supersede it
    publish_artifacts(
        data, result, written_config, stored, time.perf_counter() - clock, inference.warnings
    )
    publish_metrics(metrics, "train-metrics")
    if search is not None:
        publish_search(search)
    return TrainSummary(
        output=config.output,
        files=[str(p) for p in stored.files],
        n_examples=data.n_examples,
        n_features=plan.n_terms,
        n_iterations=result.n_iterations,
        final_cost=float(result.cost_history[-1]),
        stop_reason=result.stop_reason,
        seconds=time.perf_counter() - clock,
        n_validation_examples=data.n_validation,
        columns=[list(row) for row in plan.describe()],
        warnings=list(plan.warnings),
        diagnostics=list(inference.warnings),
        metrics=metrics,
        selected=None if search is None else search.summary(config),
        run=str(stored.run_dir),
        promoted=stored.comparison.promoted,
        promotion=stored.comparison.reason,
    )


if __name__ == "__main__":
    from flows.cli import main

    main(["train", *__import__("sys").argv[1:]])

"""The score flow: a trained model applied to new Parquet data, in batches of bounded memory."""

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import ScoreConfig
from flows.scoring import (
    Model,
    ProgressLog,
    ScoreResult,
    check_output_file,
    load_model,
    plan_scoring,
    score_metadata,
    score_to_parquet,
)
from flows.store import model_origin, resolve_model


class ScoreSummary(BaseModel):
    """What a score run returns (and the CLI prints)."""

    output: str
    n_rows: int
    n_positive: int
    mean_probability: float
    seconds: float
    # Rows per column whose level was not seen in training (coded as the reference).
    unseen: dict[str, int] = {}
    imputed: dict[str, int] = {}
    # When the data held the label: the model's metrics on it, and where they went.
    metrics: dict[str, float] | None = None
    metrics_file: str | None = None
    model: str = ""  # the run directory that scored (a store's promoted run)


@task(name="load-model", cache_policy=NO_CACHE)
def load_model_task(config: ScoreConfig) -> Model:
    return load_model(resolve_model(config.model))


@task(name="score-data", cache_policy=NO_CACHE)
def score_data(model: Model, config: ScoreConfig) -> ScoreResult:
    plan = plan_scoring(model, config.data, unseen=config.unseen)
    metadata = score_metadata(model, plan, config) | {"run_id": flow_run.id}
    metadata |= model_origin(model.path)  # which run of which store scored
    return score_to_parquet(
        plan,
        model,
        check_output_file(config.output),
        threshold=config.threshold,
        batch_rows=config.batch_rows,
        metadata=metadata,
        progress=ProgressLog(get_run_logger()),
    )


@flow(name="score", validate_parameters=True)
def score(config: ScoreConfig) -> ScoreSummary:
    """Apply a trained model to Parquet data; write keys, probability and prediction."""
    logger = get_run_logger()
    logger.info("config: %s", config.model_dump_json())
    clock = time.perf_counter()
    model = load_model_task(config)
    logger.info("model: %s", model.path)
    result = score_data(model, config)
    for column, count in result.unseen.items():
        logger.warning(
            "column %r: %d rows of levels not seen in training, scored as the reference level",
            column,
            count,
        )
    for column, count in result.imputed.items():
        logger.info("column %r: %d nulls imputed with the training mean", column, count)
    rows: list[dict[str, object]] = [
        {"metric": "n_rows", "value": result.n_rows},
        {"metric": "n_positive", "value": result.n_positive},
        {"metric": "mean_probability", "value": round(result.mean_probability, 6)},
    ]
    rows += [{"metric": f"unseen:{c}", "value": n} for c, n in result.unseen.items()]
    rows += [{"metric": f"imputed:{c}", "value": n} for c, n in result.imputed.items()]
    rows += [
        {"metric": name, "value": round(value, 6)} for name, value in (result.metrics or {}).items()
    ]
    create_table_artifact(
        table=rows,
        key="score-metrics",
        description=f"Predictions written to {result.output}",
    )
    return ScoreSummary(
        output=str(result.output),
        n_rows=result.n_rows,
        n_positive=result.n_positive,
        mean_probability=result.mean_probability,
        seconds=time.perf_counter() - clock,
        unseen=result.unseen,
        imputed=result.imputed,
        metrics=result.metrics,
        metrics_file=None if result.metrics_file is None else str(result.metrics_file),
        model=str(model.path),
    )


if __name__ == "__main__":
    from flows.cli import main

    main(["score", *__import__("sys").argv[1:]])

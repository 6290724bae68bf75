"""Scoring as plain functions: load a model, check new data, write predictions in batches."""

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from queue import Full, Queue
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from flows import arrow, durable, storage
from flows.backends.partial_metrics import merge_metrics, piece_sums
from flows.config import ScoreConfig
from flows.dataset import check_convertible, common_schema, resolve_files
from flows.errors import DataError
from flows.features import (
    Feature,
    FeaturePlan,
    LabelMapping,
    UnseenPolicy,
    apply_plan,
    column_kind,
)
from flows.outputs import (
    INTERCEPT_TERM,
    METADATA_KEY,
    PARAMS_SCHEMA,
    metrics_table,
    with_metadata,
    write_table_atomic,
)
from lr_kernel import sigmoid

OUTPUT_COLUMNS = ("probability", "prediction")

# Polars dtype names of labels whose values have one obvious Arrow type.
_LABEL_ARROW_TYPES = {
    "Boolean": pa.bool_(),
    "String": pa.string(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
}


@dataclass(frozen=True)
class Model:
    """A trained model as a consumer needs it: its feature plan and parameters.

    Attributes
    ----------
    plan : FeaturePlan
        How rows become terms (levels, reference, means, scales, imputation).
    w : ndarray of shape (n_terms,), float64
        Coefficients on the plan's scale (standardized terms standardized), so
        ``probability = sigmoid(w · x + b)`` for ``x`` a column of
        :func:`flows.features.apply_plan`'s ``X``. ``params.parquet`` holds them
        on the raw scale.
    b : float
    negative, positive : the label's two values; ``label_type`` their Arrow type.
    """

    path: PurePath  # a local Path, or a storage.ObjectPath
    plan: FeaturePlan
    w: np.ndarray
    b: float
    label: str
    negative: Any
    positive: Any
    label_type: pa.DataType
    metadata: dict[str, Any]

    @property
    def features(self) -> tuple[str, ...]:
        """The columns the model reads."""
        return self.plan.columns


@dataclass(frozen=True)
class ScorePlan:
    """What a scoring run will read, known from the file footers alone.

    ``keys`` are the columns passed through (every column that is not a
    feature); ``has_label`` says whether the label is among them, so that the
    run can also measure the model.
    """

    files: tuple[PurePath, ...]
    features: tuple[str, ...]
    keys: tuple[str, ...]
    n_rows: int
    output_schema: pa.Schema
    has_label: bool = False
    unseen: UnseenPolicy = "reference"


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_to_parquet` wrote.

    ``unseen``: rows per column whose level was not seen in training (coded as
    the reference level); ``imputed``: nulls filled per column; ``metrics``
    (and ``metrics_file``) when the data held the label.
    """

    output: PurePath
    n_rows: int
    n_positive: int
    mean_probability: float
    unseen: dict[str, int]
    imputed: dict[str, int]
    metrics: dict[str, float] | None = None
    metrics_file: PurePath | None = None


def load_model(model: str | PurePath) -> Model:
    """Read ``params.parquet`` of a train run and the label mapping in its metadata."""
    directory = storage.location(model)
    path = directory / "params.parquet"
    if isinstance(directory, storage.ObjectPath):
        if not storage.exists(directory / "params.parquet"):
            raise DataError("no params.parquet here: not a run of `lrflow train`", path=directory)
    elif not directory.is_dir():
        raise DataError("no such model directory", path=directory)
    elif not Path(path).is_file():
        raise DataError("no params.parquet here: not the output of `lrflow train`", path=directory)
    fs, where = storage.filesystem(path)
    try:
        table = arrow.read_parquet(where, filesystem=fs)
    except Exception as error:
        raise DataError(f"not a readable Parquet file ({error})", path=path) from None
    # term and estimate are what scoring reads; models from before the statistics
    # columns have those two alone.
    found = table.schema.remove_metadata()
    if not any(found.equals(s) for s in (PARAMS_SCHEMA, pa.schema(list(PARAMS_SCHEMA)[:2]))):
        raise DataError(f"columns are not {PARAMS_SCHEMA.names}", path=path)
    try:
        metadata = json.loads((table.schema.metadata or {})[METADATA_KEY])
        mapping = metadata["label_mapping"]
        label = metadata["label"]
    except (KeyError, ValueError, TypeError):
        raise DataError("no lrflow label mapping in the file metadata", path=path) from None
    terms = table.column("term").to_pylist()
    # A null estimate is a term dropped as aliased (--drop-aliased): it adds nothing.
    # (Through Polars: pyarrow's to_numpy and fill_null import pandas.)
    frame = pl.from_arrow(table.select(["estimate"]))
    assert isinstance(frame, pl.DataFrame)
    estimates = frame.to_series().fill_null(0.0).to_numpy()
    if not terms or terms[-1] != INTERCEPT_TERM or INTERCEPT_TERM in terms[:-1]:
        raise DataError(f"the last term must be the only {INTERCEPT_TERM!r}", path=path)
    if not np.all(np.isfinite(estimates)):
        raise DataError("estimates are not all finite", path=path, column="estimate")
    label_type = _LABEL_ARROW_TYPES.get(mapping.get("dtype"), pa.string())
    negative, positive = mapping["negative"], mapping["positive"]
    if label_type == pa.string():  # also the fallback for label types JSON cannot carry
        negative, positive = str(negative), str(positive)
    plan = _stored_plan(metadata, path)
    if tuple(terms[:-1]) != plan.terms:
        raise DataError("terms differ from the feature plan in the metadata", path=path)
    # params.parquet is on the raw scale: back onto the plan's, where X is built.
    mean, scale = plan.term_mean_scale()
    w_raw = estimates[:-1]
    return Model(
        path=directory,
        plan=plan,
        w=w_raw * scale,
        b=float(estimates[-1]) + float(np.dot(w_raw, mean)),
        label=label,
        negative=negative,
        positive=positive,
        label_type=label_type,
        metadata=metadata,
    )


def _stored_plan(metadata: dict[str, Any], path: PurePath) -> FeaturePlan:
    """The feature plan of the metadata; a model from before plans had numeric features only."""
    try:
        if "feature_plan" in metadata:
            return FeaturePlan.from_json(metadata["feature_plan"])
        features = tuple(
            Feature(name, "numeric", mean=float(mean), scale=float(scale))
            for name, mean, scale in zip(
                metadata["features"],
                metadata["feature_mean"],
                metadata["feature_scale"],
                strict=True,
            )
        )
        return FeaturePlan(
            label=metadata["label"],
            label_mapping=LabelMapping(**metadata["label_mapping"]),
            features=features,
            standardized=bool(metadata.get("standardized", True)),
            missing="error",
        )
    except (KeyError, ValueError, TypeError) as error:
        problem = f"no usable lrflow feature plan in the metadata ({error})"
        raise DataError(problem, path=path) from None


def plan_scoring(
    model: Model, data: str | PurePath, unseen: UnseenPolicy = "reference"
) -> ScorePlan:
    """Check the data against the model from the footers alone (no data read).

    Every column the model reads must be present, of the kind it was trained
    on; nulls that the footers' statistics record are reported here unless the
    model imputes them. Other columns are keys, passed through.
    """
    files = resolve_files(data)
    schema = common_schema(files)
    where = files[0] if len(files) == 1 else str(data)
    for feature in model.plan.features:
        name = feature.name
        if name not in schema:
            raise DataError("model feature missing from the data", path=where, column=name)
        kind = column_kind(schema[name])
        if kind != feature.kind:
            raise DataError(
                f"feature has type {schema[name]}, but the model was trained on a "
                f"{feature.kind} column",
                path=where,
                column=name,
            )
    keys = tuple(name for name in schema if name not in model.features)
    for name in keys:
        if name in OUTPUT_COLUMNS:
            raise DataError("name is taken by an output column; rename it", path=where, column=name)
    n_rows = 0
    arrow_schema = None
    for path in files:
        metadata = read_footer(path)
        n_rows += metadata.num_rows
        arrow_schema = arrow_schema or metadata.schema.to_arrow_schema()
        check_convertible(metadata.schema.to_arrow_schema(), model.features, path)
        if model.plan.missing == "error":
            _check_footer_nulls(path, metadata, model.features)
    assert arrow_schema is not None  # resolve_files never returns no files
    output_schema = pa.schema(
        [arrow_schema.field(name) for name in keys]
        + [pa.field("probability", pa.float64()), pa.field("prediction", model.label_type)]
    )
    return ScorePlan(
        files=files,
        features=model.features,
        keys=keys,
        n_rows=n_rows,
        output_schema=output_schema,
        has_label=model.plan.label in keys,
        unseen=unseen,
    )


def _check_footer_nulls(
    path: PurePath, metadata: pq.FileMetaData, features: tuple[str, ...]
) -> None:
    """Nulls a writer counted in the row-group statistics: found before any data is read."""
    positions = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    for name in features:
        nulls = 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(positions[name]).statistics
            if statistics is not None and statistics.has_null_count:
                nulls += statistics.null_count
        if nulls:
            raise DataError(
                f"{nulls} null values; the model was trained with --missing error",
                path=path,
                column=name,
            )


@dataclass
class Scored:
    """One scored batch: the output rows, and what the plan met on the way."""

    batch: pa.RecordBatch
    unseen: dict[str, int]
    imputed: dict[str, int]
    metric_sums: dict[str, Any] | None


def read_footer(path: PurePath) -> pq.FileMetaData:
    """A file's or object's Parquet footer."""
    fs, where = storage.filesystem(path)
    if fs is None:
        return pq.read_metadata(where)
    with storage.translated(path, "cannot read the Parquet footer"):
        return pq.read_metadata(where, filesystem=fs)


def score_batches(
    plan: ScorePlan, model: Model, threshold: float = 0.5, batch_rows: int = 131_072
) -> Iterator[Scored]:
    """The predictions, one record batch per batch of input rows, in file order.

    Memory is bounded by a few row groups, whatever the data's size. A value the
    model's plan cannot take raises DataError naming the file and the column.
    """
    for path, batches in _read_ahead(plan, batch_rows):
        for batch in batches:
            yield score_batch(batch, plan, model, threshold, path)


_DONE = object()


def _read_ahead(
    plan: ScorePlan, batch_rows: int, depth: int = 2
) -> Iterator[tuple[PurePath, list[pa.RecordBatch]]]:
    """Row groups read by a background thread, at most ``depth`` ahead of the consumer.

    Decoding Parquet and scoring/writing then overlap (both release the GIL):
    measured, this is what brings scoring to the speed of a plain read.
    """
    columns = [*plan.keys, *plan.features]
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for path in plan.files:
                for batches in _row_groups(path, columns, batch_rows):
                    if not put((path, batches)):
                        return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=produce, name="lrflow-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _row_groups(
    path: PurePath, columns: list[str], batch_rows: int
) -> Iterator[list[pa.RecordBatch]]:
    """One row group at a time (iter_batches over a whole file holds several at once)."""
    fs, where = storage.filesystem(path)
    try:
        parquet = pq.ParquetFile(where, filesystem=fs)
        for group in range(parquet.num_row_groups):
            yield list(
                parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            )
    except OSError as error:
        if fs is not None:
            raise storage.object_error(error, path, "cannot read data") from None
        raise DataError(f"cannot read data ({error})", path=path) from None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"not a readable Parquet file ({error})", path=path) from None


def score_batch(
    batch: pa.RecordBatch, plan: ScorePlan, model: Model, threshold: float, path: PurePath
) -> Scored:
    """Keys, ``probability = sigmoid(w · x + b)`` and ``prediction`` for one batch.

    The rows become terms through the model's feature plan
    (:func:`flows.features.apply_plan`), the same function training used.
    """
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    block = apply_plan(
        model.plan,
        frame,
        path=path,
        unseen=plan.unseen,
        label=plan.has_label,
        weights=False,
    )
    Z = model.w @ block.X + model.b  # (rows,), the scores w · x + b
    if not np.all(np.isfinite(Z)):
        raise DataError("feature values so large that the score overflows", path=path)
    probability = sigmoid(Z)
    positive = probability >= threshold
    prediction = pa.array([model.negative, model.positive], type=model.label_type).take(
        pa.array(positive.astype(np.int8))
    )
    # Keys keep the first file's Arrow type (writers differ: string vs large_string).
    keys = [batch.column(name).cast(plan.output_schema.field(name).type) for name in plan.keys]
    arrays = [*keys, pa.array(probability), prediction]
    sums = None
    if block.Y is not None:
        sums = piece_sums(Z.reshape(1, -1), block.Y, threshold=threshold)
    return Scored(
        batch=pa.RecordBatch.from_arrays(arrays, schema=plan.output_schema),
        unseen=block.unseen,
        imputed=block.imputed,
        metric_sums=sums,
    )


def metrics_path(output: PurePath) -> PurePath:
    """Where the metrics of a scored, labelled file go: ``preds.parquet`` ->
    ``preds.metrics.parquet`` beside it."""
    return output.with_name(f"{output.stem}.metrics{output.suffix or '.parquet'}")


def score_to_parquet(
    plan: ScorePlan,
    model: Model,
    output: PurePath,
    *,
    threshold: float = 0.5,
    batch_rows: int = 131_072,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Score every row into ``output``, which appears whole or not at all.

    Batches are written to a hidden temporary file in the same directory as they
    are scored, then the file is flushed and renamed. ``progress(rows_done,
    rows_total)`` is called after each batch. An ``s3://`` output is scored into a
    local temporary file, then uploaded (the metrics first), each in one upload.
    """
    if isinstance(output, storage.ObjectPath):
        from flows.object_store import score_to_object

        return score_to_object(
            plan, model, output, threshold=threshold, batch_rows=batch_rows,
            metadata=metadata, progress=progress,
        )  # fmt: skip
    output = Path(output)
    schema = plan.output_schema
    if metadata is not None:
        schema = schema.with_metadata(
            {METADATA_KEY: json.dumps(metadata, default=str, sort_keys=True).encode()}
        )
    n_rows = n_positive = 0
    probability_sum = 0.0
    unseen: dict[str, int] = {}
    imputed: dict[str, int] = {}
    metric_sums: list[dict[str, Any]] = []
    metrics, written_metrics = None, None
    with durable.replacing(output) as handle:
        # Dictionary-encoding random float64 probabilities only costs time; the
        # keys and the two-valued prediction keep it.
        dictionary = [name for name in schema.names if name != "probability"]
        with pq.ParquetWriter(handle, schema, use_dictionary=dictionary) as writer:
            for scored in score_batches(plan, model, threshold, batch_rows):
                batch = scored.batch
                writer.write_batch(batch.replace_schema_metadata(schema.metadata))
                probability = batch.column("probability").to_numpy()
                n_rows += batch.num_rows
                n_positive += int(np.count_nonzero(probability >= threshold))
                probability_sum += float(np.sum(probability))
                for total, found in ((unseen, scored.unseen), (imputed, scored.imputed)):
                    for name, count in found.items():
                        total[name] = total.get(name, 0) + count
                if scored.metric_sums is not None:
                    metric_sums.append(scored.metric_sums)
                if progress is not None:
                    progress(n_rows, plan.n_rows)
        if metric_sums:
            # Before the predictions appear: a consumer who sees them finds these too.
            metrics = merge_metrics(metric_sums)
            table = metrics_table({"scored": metrics})
            if metadata is not None:
                table = with_metadata(table, metadata)
            written_metrics = write_table_atomic(table, Path(metrics_path(output)))
    mean = probability_sum / n_rows if n_rows else math.nan
    return ScoreResult(
        output=output,
        n_rows=n_rows,
        n_positive=n_positive,
        mean_probability=mean,
        unseen=unseen,
        imputed=imputed,
        metrics=metrics,
        metrics_file=written_metrics,
    )


def check_output_file(output: str | PurePath) -> PurePath:
    """The predictions file may be created or replaced: not a directory, parent usable."""
    path = storage.location(output)
    if isinstance(path, storage.ObjectPath):
        from flows.object_store import check_output_object

        return check_output_object(path)
    if path.is_dir():
        raise DataError("output is a directory; give a file name", path=path)
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise DataError("output's parent is not a directory", path=parent)
    return path


def score_metadata(model: Model, plan: ScorePlan, config: ScoreConfig) -> dict[str, Any]:
    """The predictions file's ``lrflow`` metadata: which model scored which data."""
    return {
        "format_version": 1,
        "kind": "predictions",
        "run_id": None,
        "config": config.model_dump(mode="json"),
        "model": str(model.path),
        "model_run_id": model.metadata.get("run_id"),
        "model_input_fingerprint": model.metadata.get("input_fingerprint"),
        "features": list(model.plan.terms),
        "columns": list(model.features),
        "unseen": config.unseen,
        "label_mapping": {"negative": model.negative, "positive": model.positive},
        "input_files": [str(p) for p in plan.files],
        "n_rows": plan.n_rows,
        "scored_at": datetime.now(timezone.utc).isoformat(),
    }


class ProgressLog:
    """Logs progress at most every ``seconds``, and at the end."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, seconds: float = 10.0):
        self.logger = logger
        self.seconds = seconds
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.seconds:
            self.last = now
            self.logger.info("scored %d of %d rows (%.0f%%)", done, total, 100 * done / total)

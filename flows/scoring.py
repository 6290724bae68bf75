"""Scoring as plain functions: load a model, check new data, write predictions in batches."""

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from queue import Full, Queue
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import durable
from flows.config import ScoreConfig
from flows.dataset import FEATURE_DTYPES, common_schema, is_feature_dtype, resolve_files
from flows.errors import DataError
from flows.outputs import INTERCEPT_TERM, METADATA_KEY, PARAMS_SCHEMA
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
    """A trained model as a consumer needs it: raw-scale parameters and the label's values.

    Attributes
    ----------
    w : ndarray of shape (n_features,), float64
        Coefficients on the raw feature scale, in ``features`` order.
    b : float
        Intercept: ``probability = sigmoid(w · x + b)``.
    negative, positive : the label's two values; ``label_type`` their Arrow type.
    """

    path: Path
    features: tuple[str, ...]
    w: np.ndarray
    b: float
    label: str
    negative: Any
    positive: Any
    label_type: pa.DataType
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ScorePlan:
    """What a scoring run will read, known from the file footers alone."""

    files: tuple[Path, ...]
    features: tuple[str, ...]
    keys: tuple[str, ...]
    n_rows: int
    output_schema: pa.Schema


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_to_parquet` wrote."""

    output: Path
    n_rows: int
    n_positive: int
    mean_probability: float


def load_model(model: str | Path) -> Model:
    """Read ``params.parquet`` of a train run and the label mapping in its metadata."""
    directory = Path(model)
    if not directory.is_dir():
        raise DataError("no such model directory", path=directory)
    path = directory / "params.parquet"
    if not path.is_file():
        raise DataError("no params.parquet here: not the output of `lrflow train`", path=directory)
    try:
        table = pq.read_table(path)
    except Exception as error:
        raise DataError(f"not a readable Parquet file ({error})", path=path) from None
    if not table.schema.remove_metadata().equals(PARAMS_SCHEMA):
        raise DataError(f"columns are not {PARAMS_SCHEMA.names}", path=path)
    try:
        metadata = json.loads((table.schema.metadata or {})[METADATA_KEY])
        mapping = metadata["label_mapping"]
        label = metadata["label"]
    except (KeyError, ValueError, TypeError):
        raise DataError("no lrflow label mapping in the file metadata", path=path) from None
    terms = table.column("term").to_pylist()
    estimates = np.asarray(table.column("estimate").to_numpy(), dtype=np.float64)
    if not terms or terms[-1] != INTERCEPT_TERM or INTERCEPT_TERM in terms[:-1]:
        raise DataError(f"the last term must be the only {INTERCEPT_TERM!r}", path=path)
    if not np.all(np.isfinite(estimates)):
        raise DataError("estimates are not all finite", path=path, column="estimate")
    label_type = _LABEL_ARROW_TYPES.get(mapping.get("dtype"), pa.string())
    negative, positive = mapping["negative"], mapping["positive"]
    if label_type == pa.string():  # also the fallback for label types JSON cannot carry
        negative, positive = str(negative), str(positive)
    return Model(
        path=directory,
        features=tuple(terms[:-1]),
        w=estimates[:-1],
        b=float(estimates[-1]),
        label=label,
        negative=negative,
        positive=positive,
        label_type=label_type,
        metadata=metadata,
    )


def plan_scoring(model: Model, data: str | Path) -> ScorePlan:
    """Check the data against the model from the footers alone (no data read).

    Every model feature must be present and numeric; nulls that the footers'
    statistics record are reported here. Other columns are keys, passed through.
    """
    files = resolve_files(data)
    schema = common_schema(files)
    where = files[0] if len(files) == 1 else str(data)
    for name in model.features:
        if name not in schema:
            raise DataError("model feature missing from the data", path=where, column=name)
        if not is_feature_dtype(schema[name]):
            raise DataError(
                f"feature has type {schema[name]}, not {FEATURE_DTYPES}", path=where, column=name
            )
    keys = tuple(name for name in schema if name not in model.features)
    for name in keys:
        if name in OUTPUT_COLUMNS:
            raise DataError("name is taken by an output column; rename it", path=where, column=name)
    n_rows = 0
    arrow_schema = None
    for path in files:
        metadata = pq.read_metadata(path)
        n_rows += metadata.num_rows
        arrow_schema = arrow_schema or metadata.schema.to_arrow_schema()
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
    )


def _check_footer_nulls(path: Path, metadata: pq.FileMetaData, features: tuple[str, ...]) -> None:
    """Nulls a writer counted in the row-group statistics: found before any data is read."""
    positions = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    for name in features:
        nulls = 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(positions[name]).statistics
            if statistics is not None and statistics.has_null_count:
                nulls += statistics.null_count
        if nulls:
            raise DataError(f"{nulls} null values", path=path, column=name)


def score_batches(
    plan: ScorePlan, model: Model, threshold: float = 0.5, batch_rows: int = 131_072
) -> Iterator[pa.RecordBatch]:
    """The predictions, one record batch per batch of input rows, in file order.

    Memory is bounded by a few row groups, whatever the data's size. A null, NaN
    or infinite feature value raises DataError naming the file and the column.
    """
    for path, batches in _read_ahead(plan, batch_rows):
        for batch in batches:
            yield score_batch(batch, plan, model, threshold, path)


_DONE = object()


def _read_ahead(
    plan: ScorePlan, batch_rows: int, depth: int = 2
) -> Iterator[tuple[Path, list[pa.RecordBatch]]]:
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


def _row_groups(path: Path, columns: list[str], batch_rows: int) -> Iterator[list[pa.RecordBatch]]:
    """One row group at a time (iter_batches over a whole file holds several at once)."""
    try:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield list(
                parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            )
    except OSError as error:
        raise DataError(f"cannot read data ({error})", path=path) from None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"not a readable Parquet file ({error})", path=path) from None


def score_batch(
    batch: pa.RecordBatch, plan: ScorePlan, model: Model, threshold: float, path: Path
) -> pa.RecordBatch:
    """Keys, ``probability = sigmoid(w · x + b)`` and ``prediction`` for one batch."""
    Z = np.full(batch.num_rows, model.b)  # (rows,), the scores w · x + b
    term = np.empty_like(Z)
    for j, name in enumerate(plan.features):
        column = batch.column(name)
        if column.null_count:
            raise DataError(f"{column.null_count} null values", path=path, column=name)
        if not pa.types.is_float64(column.type):
            column = column.cast(pa.float64())
        # One axpy per feature over a batch-sized vector: no (n, rows) copy is built.
        np.multiply(column.to_numpy(zero_copy_only=False), model.w[j], out=term)
        Z += term
    if not np.all(np.isfinite(Z)):
        raise _non_finite(batch, plan, path)
    probability = sigmoid(Z)
    positive = probability >= threshold
    prediction = pa.array([model.negative, model.positive], type=model.label_type).take(
        pa.array(positive.astype(np.int8))
    )
    # Keys keep the first file's Arrow type (writers differ: string vs large_string).
    keys = [batch.column(name).cast(plan.output_schema.field(name).type) for name in plan.keys]
    arrays = [*keys, pa.array(probability), prediction]
    return pa.RecordBatch.from_arrays(arrays, schema=plan.output_schema)


def _non_finite(batch: pa.RecordBatch, plan: ScorePlan, path: Path) -> DataError:
    """Which column made a score NaN or infinite."""
    for name in plan.features:
        values = batch.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            return DataError(
                f"{bad} NaN or infinite values (in this batch)", path=path, column=name
            )
    return DataError("feature values so large that the score overflows", path=path)


def score_to_parquet(
    plan: ScorePlan,
    model: Model,
    output: Path,
    *,
    threshold: float = 0.5,
    batch_rows: int = 131_072,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Score every row into ``output``, which appears whole or not at all.

    Batches are written to a hidden temporary file in the same directory as they
    are scored, then the file is flushed and renamed. ``progress(rows_done,
    rows_total)`` is called after each batch.
    """
    schema = plan.output_schema
    if metadata is not None:
        schema = schema.with_metadata(
            {METADATA_KEY: json.dumps(metadata, default=str, sort_keys=True).encode()}
        )
    n_rows = n_positive = 0
    probability_sum = 0.0
    with durable.replacing(output) as handle:
        # Dictionary-encoding random float64 probabilities only costs time; the
        # keys and the two-valued prediction keep it.
        dictionary = [name for name in schema.names if name != "probability"]
        with pq.ParquetWriter(handle, schema, use_dictionary=dictionary) as writer:
            for batch in score_batches(plan, model, threshold, batch_rows):
                writer.write_batch(batch.replace_schema_metadata(schema.metadata))
                probability = batch.column("probability").to_numpy()
                n_rows += batch.num_rows
                n_positive += int(np.count_nonzero(probability >= threshold))
                probability_sum += float(np.sum(probability))
                if progress is not None:
                    progress(n_rows, plan.n_rows)
    mean = probability_sum / n_rows if n_rows else math.nan
    return ScoreResult(output=output, n_rows=n_rows, n_positive=n_positive, mean_probability=mean)


def check_output_file(output: str | Path) -> Path:
    """The predictions file may be created or replaced: not a directory, parent usable."""
    path = Path(output)
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
        "features": list(model.features),
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

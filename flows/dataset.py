"""Parquet -> Dataset: find the files, validate schema and values, build the (n, m) matrix."""

import dataclasses
import fnmatch
import glob
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import polars as pl

from flows.errors import DataError

FEATURE_DTYPES = "integer or floating-point"


@dataclass(frozen=True)
class LabelMapping:
    """How the label column's two values map onto 0 and 1."""

    negative: Any
    positive: Any
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"negative": self.negative, "positive": self.positive, "dtype": self.dtype}


@dataclass(frozen=True)
class InputPlan:
    """What a run will read, known from the file footers alone (no data read yet)."""

    files: tuple[Path, ...]
    features: tuple[str, ...]
    label: str
    schema: dict[str, pl.DataType]


@dataclass(frozen=True)
class Dataset:
    """Column-stacked training data and what is needed to undo the standardization.

    Attributes
    ----------
    X : ndarray of shape (n_features, n_examples), C-contiguous
        Standardized features when ``standardized`` (``(x - mean) / scale``).
    Y : ndarray of shape (1, n_examples)
        0.0/1.0 in ``X``'s dtype.
    mean, scale : ndarray of shape (n_features,), float64
        Population mean and standard deviation (1.0 for a constant feature);
        zeros and ones when not standardized.
    """

    X: np.ndarray
    Y: np.ndarray
    features: tuple[str, ...]
    label: str
    label_mapping: LabelMapping
    mean: np.ndarray
    scale: np.ndarray
    standardized: bool
    files: tuple[Path, ...]
    fingerprint: str
    # Held-out rows, standardized with this dataset's (the training rows') statistics.
    validation: "Dataset | None" = None

    @property
    def n_examples(self) -> int:
        return int(self.X.shape[1])


def resolve_files(data: str | Path) -> tuple[Path, ...]:
    """The Parquet files that ``data`` names: a file, a directory (recursive) or a glob.

    In a directory, names starting with ``.`` or ``_`` (and everything below such
    a directory) are skipped, as Spark and pyarrow do: they hold other writers'
    in-progress files (``_temporary/``, hidden staging) and metadata (``_SUCCESS``).
    """
    text = str(data)
    if not text.strip():
        raise DataError("empty data path", path=repr(text))
    path = Path(text)
    if path.is_file():
        return (path,)
    if path.is_dir():
        files = _parquet_files_below(path)
        if not files:
            raise DataError("directory holds no *.parquet files", path=path)
        return files
    if path.is_symlink():
        raise DataError("broken symbolic link", path=path)
    if path.exists():
        raise DataError("not a regular file or directory", path=path)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError("no file matches this pattern", path=text)
        return tuple(files)
    raise DataError("no such file or directory", path=path)


def _parquet_files_below(root: Path) -> tuple[Path, ...]:
    """Every ``*.parquet`` regular file below ``root``, sorted; unreadable parts are errors.

    ``os.walk`` rather than ``Path.rglob``: rglob skips a directory it may not
    read without a word, which would train on part of the data.
    """

    def refuse(error: OSError) -> None:
        raise DataError(f"cannot list directory ({error.strerror})", path=error.filename)

    found = []
    seen: set[tuple[int, int]] = set()
    for directory, subdirectories, names in os.walk(root, onerror=refuse, followlinks=True):
        info = os.stat(directory)
        if (info.st_dev, info.st_ino) in seen:  # a symbolic link loop
            subdirectories.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        subdirectories[:] = [d for d in subdirectories if not d.startswith((".", "_"))]
        for name in names:
            if name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue
            path = Path(directory, name)
            if path.is_file():
                found.append(path)
            elif path.is_symlink() and not path.exists():
                raise DataError("broken symbolic link", path=path)
    return tuple(sorted(found))


def read_schema(path: Path) -> dict[str, pl.DataType]:
    """A file's Parquet schema, from its footer; corrupt or non-Parquet files raise DataError."""
    try:
        return dict(pl.read_parquet_schema(path))
    except OSError as error:
        raise DataError(f"cannot read file ({error.strerror or error})", path=path) from None
    except Exception as error:  # Polars raises ComputeError and others for bad footers
        raise DataError(f"not a readable Parquet file ({_first_line(error)})", path=path) from None


def is_feature_dtype(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal)


def common_schema(files: tuple[Path, ...]) -> dict[str, pl.DataType]:
    """The schema every file shares (from the footers); any difference raises DataError."""
    schema = read_schema(files[0])
    for path in files[1:]:
        other = read_schema(path)
        for name, dtype in schema.items():
            if name not in other:
                raise DataError(f"missing here but present in {files[0]}", path=path, column=name)
            if other[name] != dtype:
                raise DataError(
                    f"type {other[name]} differs from {dtype} in {files[0]}",
                    path=path,
                    column=name,
                )
        for name in other.keys() - schema.keys():
            raise DataError(f"present here but missing in {files[0]}", path=path, column=name)
    return schema


def plan_inputs(
    data: str | Path, label: str = "label", features: list[str] | tuple[str, ...] | None = None
) -> InputPlan:
    """Check paths, schemas and column choices from the file footers alone.

    Cheap (no data is read), so it runs before anything slow starts.
    """
    files = resolve_files(data)
    schema = common_schema(files)
    where = files[0] if len(files) == 1 else str(data)
    if not schema:
        raise DataError("file has no columns", path=files[0])
    if label not in schema:
        raise DataError(f"label column not found (columns: {_names(schema)})", path=where)
    if features is None:
        chosen = tuple(n for n, t in schema.items() if n != label and is_feature_dtype(t))
        if not chosen:
            raise DataError(
                f"no {FEATURE_DTYPES} columns besides the label {label!r} to use as features",
                path=where,
            )
    else:
        chosen = tuple(features)
        for name in chosen:
            if name == label:
                raise DataError(
                    "is the label; it cannot also be a feature", path=where, column=name
                )
            if name not in schema:
                raise DataError(
                    f"feature not found (columns: {_names(schema)})", path=where, column=name
                )
            if not is_feature_dtype(schema[name]):
                raise DataError(
                    f"feature has type {schema[name]}, not {FEATURE_DTYPES}",
                    path=where,
                    column=name,
                )
    check_label_dtype(schema[label], label, where)
    check_distinct_features(chosen, where)
    return InputPlan(files=files, features=chosen, label=label, schema=schema)


# Label types with an order and an equality that map two values onto 0/1; nested,
# binary and untyped columns have neither that Polars can use here.
LABEL_DTYPES = "boolean, integer, float, decimal, string, categorical, date or time"


def check_label_dtype(dtype: pl.DataType, label: str, where: Path | str) -> None:
    """Refuse label types that cannot hold a two-valued class (lists, structs, bytes, nulls)."""
    if dtype == pl.Null:
        raise DataError("label holds only null values", path=where, column=label)
    usable = (
        dtype.is_numeric()
        or dtype.is_temporal()
        or dtype in (pl.Boolean, pl.String)
        or isinstance(dtype, (pl.Categorical, pl.Enum))
    )
    if not usable:
        raise DataError(f"label has type {dtype}, not {LABEL_DTYPES}", path=where, column=label)


def check_distinct_features(features: tuple[str, ...], where: Path | str) -> None:
    """Each feature once: a repeated column would be a singular, duplicated row of ``X``."""
    seen: set[str] = set()
    for name in features:
        if name in seen:
            raise DataError("feature is listed twice", path=where, column=name)
        seen.add(name)


def check_output_location(data: str | Path, output: str | Path) -> None:
    """The output directory must not be where ``data`` finds its inputs.

    Results written below a data directory (or where a data glob matches) would
    be read back as training data by the next run.
    """
    text = str(data)
    target = Path(output).absolute()
    source = Path(text)
    if source.is_dir():
        root = source.absolute()
        if target == root or root in target.parents:
            raise DataError(
                f"output directory lies inside the data directory {text}; "
                "the next run would read its results as training data",
                path=output,
            )
    elif glob.has_magic(text) and not source.is_file():
        probe = target / "params.parquet"
        pattern = str(Path(text).absolute())
        matches = (
            fnmatch.fnmatchcase(str(probe), pattern)
            if "**" in text
            else PurePath(probe).match(pattern)
        )
        if matches:
            raise DataError(
                f"data pattern {text} matches this output directory's files; "
                "the next run would read its results as training data",
                path=output,
            )


def validate_values(
    plan: InputPlan,
    frame: pl.LazyFrame,
    positive_label: str | None = None,
    *,
    standardize: bool = True,
    dtype: str = "float64",
) -> LabelMapping:
    """Check the values in one aggregate query; returns the label mapping.

    Zero rows, nulls anywhere, NaN or infinity in a feature or the label, a label
    without exactly two values, features too large to standardize or to hold in
    ``dtype``: each raises DataError naming the file and the column.
    ``frame`` may be a scan of the files (streamed, nothing held) or data already read.
    """
    labels, n_labels, ranges = check_values(plan, frame)
    mapping = label_mapping(plan, labels, n_labels, positive_label)
    check_ranges(plan, ranges, standardize=standardize, dtype=dtype)
    return mapping


def check_values(
    plan: InputPlan, frame: pl.LazyFrame
) -> tuple[list[Any], int, dict[str, float | None]]:
    """The checks of :func:`validate_values` short of the label mapping and ranges.

    Returns the label's first distinct values (sorted), how many there are, and
    each feature's mean, standard deviation and largest magnitude.
    """
    columns = [*plan.features, plan.label]
    checks = [pl.len().alias("rows")]
    checks += [pl.col(name).null_count().alias(f"null:{name}") for name in columns]
    checks += [
        (pl.col(name).is_nan() | pl.col(name).is_infinite()).sum().alias(f"nonfinite:{name}")
        for name in columns
        if plan.schema[name].is_float()
    ]
    label = pl.col(plan.label).drop_nulls()
    checks += [
        label.n_unique().alias("n_labels"),
        label.unique().sort().head(5).implode().alias("labels"),
    ]
    checks += _range_checks(plan)
    try:
        found = frame.select(checks).collect().row(0, named=True)
    except DataError:
        raise
    except Exception as error:
        raise _read_error(plan, error, columns) from None
    if found.pop("rows") == 0:
        raise DataError("no rows", path=_where(plan))
    labels, n_labels = found.pop("labels"), found.pop("n_labels")
    ranges = {key: found.pop(key) for key in list(found) if key.startswith("range:")}
    for key, count in found.items():
        if count:
            kind, name = key.split(":", 1)
            problem = "null values" if kind == "null" else "NaN or infinite values"
            raise DataError(f"{count} {problem}", path=_culprit_file(plan, name, kind), column=name)
    return labels, n_labels, ranges


def _range_checks(plan: InputPlan) -> list[pl.Expr]:
    """Mean, standard deviation and largest magnitude of each feature, as load_dataset
    computes them (float64, ddof=0), so the checks agree with the load."""
    checks = []
    for name in plan.features:
        values = pl.col(name).cast(pl.Float64)
        checks += [
            values.mean().alias(f"range:mean:{name}"),
            values.std(ddof=0).alias(f"range:std:{name}"),
            values.abs().max().alias(f"range:absmax:{name}"),
        ]
    return checks


def check_ranges(
    plan: InputPlan, ranges: dict[str, float | None], *, standardize: bool, dtype: str
) -> None:
    """Refuse features whose statistics overflow float64, or values beyond ``dtype``."""
    largest = float(np.finfo(np.dtype(dtype)).max)
    for name in plan.features:
        mean, std = ranges[f"range:mean:{name}"], ranges[f"range:std:{name}"]
        absmax = ranges[f"range:absmax:{name}"]
        if standardize and not all(v is not None and math.isfinite(v) for v in (mean, std)):
            raise DataError("values too large to standardize", path=_where(plan), column=name)
        if not standardize and absmax is not None and absmax > largest:
            raise DataError(f"values exceed the {dtype} range", path=_where(plan), column=name)


def scan(plan: InputPlan) -> pl.LazyFrame:
    """A lazy scan of the planned columns of every file, in file order."""
    return pl.scan_parquet(list(plan.files), hive_partitioning=False).select(
        [*plan.features, plan.label]
    )


def load_dataset(
    plan: InputPlan,
    *,
    standardize: bool = True,
    dtype: str = "float64",
    positive_label: str | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
    validation_plan: InputPlan | None = None,
) -> Dataset:
    """Read the planned columns, validate their values and build the column-stacked matrices.

    With ``validation_fraction > 0`` that share of the rows (per label value, chosen
    by ``seed``) is held out; with ``validation_plan`` those files are. Either way the
    held-out rows are in ``Dataset.validation`` and the standardization statistics
    come from the training rows alone.
    """
    frame = _read(plan)
    mapping = validate_values(
        plan, frame.lazy(), positive_label, standardize=standardize, dtype=dtype
    )
    positive = (frame.get_column(plan.label) == mapping.positive).to_numpy()  # (m,) bool
    train_rows = held_out_rows = None
    if validation_fraction > 0:
        held_out = stratified_holdout(positive, validation_fraction, seed)
        if not held_out.any():
            raise DataError(
                f"too few rows to hold out a validation fraction of {validation_fraction:g}; "
                "use 0 to disable validation",
                path=_where(plan),
            )
        train_rows, held_out_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if not standardize:
        mean, scale = _identity(len(plan.features))
    elif train_rows is None:
        mean, scale = _statistics(plan, frame)
    else:
        mean, scale = _row_statistics(plan, frame, train_rows)

    def build(plan: InputPlan, frame: pl.DataFrame, rows: Any, positive: np.ndarray) -> Dataset:
        X = _matrix(plan, frame, rows, mean, scale, standardize, np.dtype(dtype))
        Y = (positive if rows is None else positive[rows]).astype(dtype).reshape(1, -1)  # (1, m)
        return Dataset(
            X=X,
            Y=Y,
            features=plan.features,
            label=plan.label,
            label_mapping=mapping,
            mean=mean,
            scale=scale,
            standardized=standardize,
            files=plan.files,
            fingerprint=fingerprint(plan.files),
        )

    validation = None
    if held_out_rows is not None:
        validation = build(plan, frame, held_out_rows, positive)
    elif validation_plan is not None:
        validation_frame = _read(validation_plan)
        check_held_out_labels(plan, validation_plan, validation_frame.lazy(), mapping)
        held_out_positive = (validation_frame.get_column(plan.label) == mapping.positive).to_numpy()
        validation = build(validation_plan, validation_frame, None, held_out_positive)
    training = build(plan, frame, train_rows, positive)
    return dataclasses.replace(training, validation=validation)


def stratified_holdout(positive: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows to hold out: ``round(fraction * count)`` of each label value, by ``seed``.

    Deterministic for a given seed and row order. At least one row of each value
    stays in training, so the fit always sees both classes.

    Parameters
    ----------
    positive : ndarray of shape (n_examples,), bool
    fraction : float in [0, 1)
    seed : int

    Returns
    -------
    held_out : ndarray of shape (n_examples,), bool
    """
    rng = np.random.default_rng(seed)
    held_out = np.zeros(positive.shape, dtype=bool)
    for value in (False, True):
        rows = np.flatnonzero(positive == value)
        count = min(math.floor(fraction * rows.size + 0.5), rows.size - 1)
        if count > 0:
            held_out[rng.choice(rows, size=count, replace=False)] = True
    return held_out


def _read(plan: InputPlan) -> pl.DataFrame:
    columns = [*plan.features, plan.label]
    try:
        return scan(plan).collect()
    except Exception as error:
        raise _read_error(plan, error, columns) from None


def _matrix(
    plan: InputPlan,
    frame: pl.DataFrame,
    rows: np.ndarray | None,
    mean: np.ndarray,
    scale: np.ndarray,
    standardize: bool,
    target: np.dtype,
) -> np.ndarray:
    """The ``(n_features, len(rows))`` C-ordered matrix of the chosen rows (all when None)."""
    m = frame.height if rows is None else rows.size
    X = np.empty((len(plan.features), m), dtype=target)  # (n, m), C order
    for j, name in enumerate(plan.features):
        values = frame.get_column(name).cast(pl.Float64).to_numpy()  # zero-copy for f64
        if rows is not None:
            values = values[rows]
        with np.errstate(over="ignore"):  # out-of-range float32 values are reported below
            if standardize:
                # Standardize in float64 while filling the one row, so float32 loses
                # nothing to cancellation and no other (n, m) copy is made.
                X[j] = (values - mean[j]) / scale[j]
            else:
                X[j] = values
        if target != np.float64 and not np.all(np.isfinite(X[j])):
            raise DataError(f"values exceed the {target} range", path=_where(plan), column=name)
    return X


def check_held_out_labels(
    plan: InputPlan, held_out: InputPlan, frame: pl.LazyFrame, mapping: LabelMapping
) -> None:
    """Separate validation data: valid values, and only the training label's two values."""
    if held_out.schema[plan.label] != plan.schema[plan.label]:
        raise DataError(
            f"label has type {held_out.schema[plan.label]}, but {plan.schema[plan.label]} "
            "in the training data",
            path=_where(held_out),
            column=plan.label,
        )
    labels, n_labels, _ = check_values(held_out, frame)
    unknown = [v for v in labels if v not in (mapping.negative, mapping.positive)]
    if unknown or n_labels > 2:
        raise DataError(
            f"label value {(unknown or labels)[0]!r} is not one of the training labels "
            f"({mapping.negative!r}, {mapping.positive!r})",
            path=_where(held_out),
            column=plan.label,
        )


def label_mapping(
    plan: InputPlan, values: list[Any], n_distinct: int, positive_label: str | None
) -> LabelMapping:
    """Map a binary label onto 0/1: sorted order, negative first, unless told the positive.

    ``values`` are the label's first distinct values in sorted order (all of them
    when there are two); ``n_distinct`` counts them all.
    """
    label_dtype = plan.schema[plan.label]
    dtype = str(label_dtype)
    if n_distinct != 2:
        shown = ", ".join(repr(v) for v in values) + (", ..." if n_distinct > len(values) else "")
        problem = "one value" if n_distinct == 1 else f"{n_distinct} distinct values"
        raise DataError(
            f"label has {problem} ({shown}); it must have exactly two",
            path=_where(plan),
            column=plan.label,
        )
    if positive_label is None:
        # Sorted order puts False before True: a boolean label maps onto itself.
        return LabelMapping(negative=values[0], positive=values[1], dtype=dtype)
    matches = [v for v in values if str(v) == positive_label]
    if not matches:
        raise DataError(
            f"positive label {positive_label!r} is not one of its values "
            f"({values[0]!r}, {values[1]!r})",
            path=_where(plan),
            column=plan.label,
        )
    positive = matches[0]
    negative = values[0] if positive == values[1] else values[1]
    return LabelMapping(negative=negative, positive=positive, dtype=dtype)


def fingerprint(files: tuple[Path, ...]) -> str:
    """BLAKE2b of the files' names and contents: equal exactly when the input is."""
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_error(plan: InputPlan, error: Exception, columns: list[str]) -> DataError:
    """Translate a read failure; a footer can be fine while a data page is damaged."""
    for path in plan.files:
        try:
            pl.scan_parquet(path, hive_partitioning=False).select(columns).collect()
        except Exception as file_error:
            return DataError(f"cannot read data ({_first_line(file_error)})", path=path)
    return DataError(f"cannot read data ({_first_line(error)})", path=_where(plan))


def _culprit_file(plan: InputPlan, name: str, kind: str) -> Path | str:
    if len(plan.files) == 1:
        return plan.files[0]
    for path in plan.files:
        column = pl.read_parquet(path, columns=[name]).get_column(name)
        bad = (
            column.null_count()
            if kind == "null"
            else (column.is_nan() | column.is_infinite()).sum()
        )
        if bad:
            return path
    return _where(plan)


def _statistics(plan: InputPlan, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and standard deviation (ddof=0) of each feature, in float64."""
    stats = frame.select(
        [pl.col(n).cast(pl.Float64).mean().alias(f"mean:{n}") for n in plan.features]
        + [pl.col(n).cast(pl.Float64).std(ddof=0).alias(f"std:{n}") for n in plan.features]
    ).row(0)
    n = len(plan.features)
    return _checked_scale(
        plan, np.array(stats[:n], dtype=np.float64), np.array(stats[n:], dtype=np.float64)
    )


def _checked_scale(
    plan: InputPlan, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    for j, name in enumerate(plan.features):
        if not (math.isfinite(mean[j]) and math.isfinite(std[j])):
            raise DataError("values too large to standardize", path=_where(plan), column=name)
    # A (near-)constant feature is centered and left unscaled, as StandardScaler does.
    constant = std <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
    return mean, np.where(constant, 1.0, std)


def _row_statistics(
    plan: InputPlan, frame: pl.DataFrame, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_statistics`, over the given rows only (the training split)."""
    n = len(plan.features)
    mean, std = np.empty(n), np.empty(n)
    for j, name in enumerate(plan.features):
        values = frame.get_column(name).cast(pl.Float64).to_numpy()[rows]
        with np.errstate(over="ignore", invalid="ignore"):
            mean[j], std[j] = np.mean(values), np.std(values)
    return _checked_scale(plan, mean, std)


def _identity(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n), np.ones(n)


def _where(plan: InputPlan) -> Path | str:
    return (
        plan.files[0]
        if len(plan.files) == 1
        else f"{plan.files[0].parent} ({len(plan.files)} files)"
    )


def _names(schema: dict[str, pl.DataType]) -> str:
    names = list(schema)
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

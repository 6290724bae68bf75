"""Parquet inputs: find the files, check their schemas from the footers, read them in batches,
and decide per row whether it is held out for validation."""

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flows import arrow, storage
from flows.errors import DataError
from flows.features import ColumnChoice, choose_columns

# Buffered column-chunk reads: pyarrow then holds each column's current page as
# it decodes instead of the whole row group at once (measured: a 64-feature row
# group of 131072 rows read whole took ~330 MB of Arrow memory, buffered ~70 MB).
READ_BUFFER_BYTES = 1 << 16
# An object in S3 is read by range requests, one per buffer fill: 64 KiB would cost a
# request (~10-50 ms) per 64 KiB (measured against moto's server: 1M rows x 20 columns
# loaded in 79 s with 64 KiB, 35 s with 1 or 4 MiB). Memory stays bounded by the
# columns read times 4 MiB, not the row group.
OBJECT_READ_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class InputPlan:
    """What a run will read, known from the file footers alone (no data read yet)."""

    files: tuple[PurePath, ...]  # local Paths, or storage.ObjectPaths
    schema: dict[str, pl.DataType]
    choice: ColumnChoice

    @property
    def label(self) -> str:
        return self.choice.label

    @property
    def where(self) -> PurePath | str:
        """How errors about the whole input name it: the file, or the directory and count."""
        if len(self.files) == 1:
            return self.files[0]
        return f"{self.files[0].parent} ({len(self.files)} files)"

    @property
    def label_dtype(self) -> str:
        return str(self.schema[self.choice.label])


def resolve_files(data: str | PurePath) -> tuple[PurePath, ...]:
    """The Parquet files that ``data`` names: a file, a directory (recursive) or a glob.

    In a directory, names starting with ``.`` or ``_`` (and everything below such
    a directory) are skipped, as Spark and pyarrow do: they hold other writers'
    in-progress files (``_temporary/``, hidden staging) and metadata (``_SUCCESS``).
    ``s3://bucket/...`` names an object, a prefix or a glob alike.
    """
    text = str(data)
    if not text.strip():
        raise DataError("empty data path", path=repr(text))
    if storage.is_remote(text):
        return _resolve_objects(storage.location(text))
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
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError("no file matches this pattern", path=text)
        return tuple(matches)
    raise DataError("no such file or directory", path=path)


def _resolve_objects(data: PurePath) -> tuple[PurePath, ...]:
    """:func:`resolve_files` in object storage: an object, every ``*.parquet`` below a
    prefix (hidden and ``_`` levels skipped, as locally), or the objects a glob matches."""
    assert isinstance(data, storage.ObjectPath)
    if any(c in data.key for c in "*?["):
        matches = storage.glob_objects(data)
        if not matches:
            raise DataError("no object matches this pattern", path=data)
        return tuple(matches)
    if data.key:
        found = storage.info(data)  # a missing bucket is an error here
        if found.is_file:
            return (data,)
        if found.type == pafs.FileType.NotFound:
            raise DataError("no such object or prefix", path=data)
    else:
        storage.check_bucket(data)
    files = tuple(
        path
        for path in storage.list_objects(data)
        if path.name.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in path.relative_to(data).parts)
    )
    if not files:
        raise DataError("prefix holds no *.parquet objects", path=data)
    return files


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


def read_schema(path: PurePath) -> dict[str, pl.DataType]:
    """A file's Parquet schema, from its footer; corrupt or non-Parquet files raise DataError."""
    if storage.is_remote(path):
        return _object_schema(path)
    try:
        return dict(pl.read_parquet_schema(Path(path)))
    except OSError as error:
        raise DataError(f"cannot read file ({error.strerror or error})", path=path) from None
    except Exception as error:  # Polars raises ComputeError and others for bad footers
        raise DataError(f"not a readable Parquet file ({_first_line(error)})", path=path) from None


def _object_schema(path: PurePath) -> dict[str, pl.DataType]:
    """:func:`read_schema` of an object: the footer's Arrow schema as Polars types."""
    fs, where = storage.filesystem(path)
    with storage.translated(path, "cannot read object"):
        try:
            schema = pq.read_schema(where, filesystem=fs)
        except (OSError, pa.ArrowException) as error:
            if "AWS Error" in str(error) or storage.is_not_found(error):
                raise
            raise DataError(
                f"not a readable Parquet file ({_first_line(error)})", path=path
            ) from None
    try:
        return dict(pl.DataFrame(arrow.empty(schema)).schema)
    except Exception as error:
        raise DataError(f"not a readable Parquet file ({_first_line(error)})", path=path) from None


def common_schema(files: tuple[PurePath, ...]) -> dict[str, pl.DataType]:
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
    data: str | PurePath,
    label: str = "label",
    features: Sequence[str] | None = None,
    *,
    exclude: Sequence[str] = (),
    weight: str | None = None,
) -> InputPlan:
    """Check paths, schemas and column roles from the file footers alone.

    Cheap (no data is read), so it runs before anything slow starts.
    """
    files = resolve_files(data)
    schema = common_schema(files)
    where = files[0] if len(files) == 1 else str(data)
    if not schema:
        raise DataError("file has no columns", path=files[0])
    choice = choose_columns(
        schema, label=label, features=features, exclude=exclude, weight=weight, where=where
    )
    check_label_dtype(schema[label], label, where)
    return InputPlan(files=files, schema=schema, choice=choice)


def plan_held_out(data: str | PurePath, training: InputPlan) -> InputPlan:
    """Separate validation data: the training columns, with the training types."""
    files = resolve_files(data)
    schema = common_schema(files)
    where = files[0] if len(files) == 1 else str(data)
    for name in training.choice.read:
        if name not in schema:
            raise DataError("column of the training data not found", path=where, column=name)
        if schema[name] != training.schema[name]:
            raise DataError(
                f"type {schema[name]} differs from {training.schema[name]} in the training data",
                path=where,
                column=name,
            )
    return InputPlan(files=files, schema=schema, choice=training.choice)


# Label types with an order and an equality that map two values onto 0/1; nested,
# binary and untyped columns have neither that Polars can use here.
LABEL_DTYPES = "boolean, integer, float, decimal, string, categorical, date or time"


def check_label_dtype(dtype: pl.DataType, label: str, where: PurePath | str) -> None:
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


def check_output_location(data: str | Path, output: str | Path) -> None:
    """The output directory must not be where ``data`` finds its inputs.

    Results written below a data directory (or where a data glob matches) would
    be read back as training data by the next run.
    """
    text = str(data)
    if storage.is_remote(text) or storage.is_remote(output):
        _check_object_output_location(text, str(output))
        return
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


def _check_object_output_location(data: str, output: str) -> None:
    """:func:`check_output_location` in object storage: the store's prefix must not lie
    below the data's prefix (nor be matched by its glob)."""
    if storage.is_remote(data) != storage.is_remote(output):
        return  # one local, one in object storage: they cannot overlap
    source, target = data.rstrip("/"), output.rstrip("/")
    if any(c in source for c in "*?["):
        probe = storage.location(target + "/runs/r/params.parquet")
        fixed = storage.location(source)
        assert isinstance(probe, storage.ObjectPath) and isinstance(fixed, storage.ObjectPath)
        if re.fullmatch(storage._translate(fixed.key_path), probe.key_path):
            raise DataError(
                f"data pattern {data} matches this output's objects; "
                "the next run would read its results as training data",
                path=output,
            )
    elif target == source or target.startswith(source + "/"):
        raise DataError(
            f"output lies inside the data prefix {data}; "
            "the next run would read its results as training data",
            path=output,
        )


# ---------------------------------------------------------------------------------------
# Reading rows: pieces of files, batches, and the validation split.
# ---------------------------------------------------------------------------------------

Role = Literal["split", "train", "validation"]


@dataclass(frozen=True)
class Piece:
    """Some row groups of one file (all when ``row_groups`` is None), read in order.

    ``first_row`` is the position of its first row within its input, so that the
    split of a row depends on the data alone, never on how it was divided.
    ``role``: ``split`` (training data, rows held out by the seed), ``train``
    (training data, nothing held out), ``validation`` (separate validation data).
    """

    path: PurePath  # a local Path, or a storage.ObjectPath
    first_row: int
    n_rows: int
    role: Role
    row_groups: tuple[int, ...] | None = None


def file_pieces(plan: InputPlan, role: Role) -> list[Piece]:
    """One piece per file, with the row positions from the footers."""
    pieces, first = [], 0
    for path in plan.files:
        rows = _metadata(path).num_rows
        pieces.append(Piece(path, first, rows, role))
        first += rows
    return pieces


def row_group_pieces(plan: InputPlan, role: Role) -> list[Piece]:
    """One piece per row group, in input order, with its row position."""
    pieces, first = [], 0
    for path in plan.files:
        metadata = _metadata(path)
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            pieces.append(Piece(path, first, rows, role, (group,)))
            first += rows
    return pieces


def count_rows(files: Sequence[PurePath]) -> int:
    """Rows of every file, from the footers alone."""
    return sum(_metadata(path).num_rows for path in files)


def _metadata(path: PurePath) -> pq.FileMetaData:
    fs, where = storage.filesystem(path)
    try:
        return pq.read_metadata(where, filesystem=fs)
    except Exception as error:
        if fs is not None and "AWS Error" in str(error):
            raise storage.object_error(error, path) from None
        raise DataError(
            f"cannot read the Parquet footer ({_first_line(error)})", path=path
        ) from None


def check_convertible(schema: pa.Schema, columns: Sequence[str], path: PurePath) -> None:
    """Refuse columns that Polars cannot take from Arrow: it panics on them (a multi-line
    Rust message, not an exception), so they are found from the footer instead."""
    for field in schema:
        if field.name in columns and pa.types.is_decimal(field.type) and field.type.precision > 38:
            raise DataError(
                f"cannot read data (decimal precision {field.type.precision} "
                "is above the 38 digits Polars holds)",
                path=path,
                column=field.name,
            )


def iter_batches(
    piece: Piece, columns: Sequence[str], batch_rows: int
) -> Iterator[tuple[int, pl.DataFrame]]:
    """``(position of the first row, frame)`` of each batch of at most ``batch_rows`` rows."""
    position = piece.first_row
    fs, where = storage.filesystem(piece.path)
    try:
        buffer = READ_BUFFER_BYTES if fs is None else OBJECT_READ_BUFFER_BYTES
        parquet = pq.ParquetFile(where, buffer_size=buffer, pre_buffer=False, filesystem=fs)
        check_convertible(parquet.schema_arrow, columns, piece.path)
        for batch in parquet.iter_batches(
            batch_size=batch_rows,
            row_groups=None if piece.row_groups is None else list(piece.row_groups),
            columns=list(columns),
            use_threads=True,
        ):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            yield position, frame
            position += frame.height
    except DataError:
        raise
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError) as error:
        if fs is not None and "AWS Error" in str(error):
            raise storage.object_error(error, piece.path, "cannot read data") from None
        raise DataError(f"cannot read data ({_first_line(error)})", path=piece.path) from None


def held_out(role: Role, first_row: int, k: int, fraction: float, seed: int) -> np.ndarray | None:
    """Which of ``k`` rows from position ``first_row`` are held out; None when none can be.

    A row at position ``i`` is held out when a hash of ``(seed, i)`` (splitmix64,
    as uniform as a random draw) falls below ``fraction``: the same data, fraction
    and seed hold out the same rows whatever the backend, batches or shards.
    """
    if role == "validation":
        return np.ones(k, dtype=bool)
    if role == "train" or fraction <= 0:
        return None
    return _uniform(seed, first_row, k) < fraction


_MASK64 = (1 << 64) - 1


def _uniform(seed: int, first_row: int, k: int) -> np.ndarray:
    """``k`` numbers in [0, 1), one per position: splitmix64 of ``seed`` and the position."""
    offset = np.uint64((first_row + seed * 0x9E3779B97F4A7C15) & _MASK64)
    x = np.arange(k, dtype=np.uint64) + offset  # array arithmetic wraps modulo 2**64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def fingerprint(files: tuple[PurePath, ...]) -> str:
    """BLAKE2b of the files' names and contents: equal exactly when the input is.

    Objects in S3 are hashed by their content too (streamed, 1 MiB at a time), not
    by ETag: an ETag depends on how the object was uploaded (multipart or not, the
    part size), so the same bytes copied to or from S3 would change it. The same
    data has the same fingerprint locally and in object storage.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with storage.open_input(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

"""Arrow tables from Python and NumPy columns, built by Polars.

pyarrow's own constructors (``pa.table``, ``pa.array``, ``Table.from_pylist``)
import pandas, to ask whether a column is a pandas object: about a quarter of a
second of every run, for a library lrflow does not use. Polars builds the same
columns without it, and the cast to the contract's schema fixes every type.
"""

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def table(
    columns: Mapping[str, Any], schema: pa.Schema, *, nan_as_null: Collection[str] = ()
) -> pa.Table:
    """``columns`` (NumPy arrays or Python sequences) as a table of exactly ``schema``.

    Float NaN in the columns named in ``nan_as_null`` becomes null.
    """
    frame = pl.DataFrame({name: columns[name] for name in schema.names}, strict=False)
    floats = [name for name in nan_as_null if frame.schema[name].is_float()]
    if floats:
        frame = frame.with_columns(pl.col(floats).fill_nan(None))
    return frame.to_arrow().cast(schema)


def table_from_rows(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """One row per mapping, as :func:`table`."""
    return table({name: [row[name] for row in rows] for name in schema.names}, schema)


def empty(schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` with no rows (``schema.empty_table()`` imports pandas)."""
    return pa.Table.from_batches([], schema=schema)


def read_parquet(
    source: Any, *, filesystem: Any = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """One Parquet file, whole or these columns (``pq.read_table`` goes through
    ``pyarrow.dataset``, which imports pandas)."""
    return pq.ParquetFile(source, filesystem=filesystem).read(columns=columns)


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows as dicts (``Table.to_pylist`` imports pandas for time zones)."""
    return pl.from_arrow(table).to_dicts()  # type: ignore[union-attr]

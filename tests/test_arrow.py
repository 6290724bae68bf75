"""flows.arrow: the output tables through Polars, equal to pyarrow's own, and no pandas."""

import json
import math
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import arrow

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = pa.schema(
    [
        ("term", pa.string()),
        ("estimate", pa.float64()),
        ("n", pa.int64()),
        ("flag", pa.bool_()),
        ("at", pa.timestamp("us", tz="UTC")),
    ]
)


def test_a_table_has_exactly_the_schema_and_nan_as_null_where_asked():
    at = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
    columns = {
        "term": ["a", "b", "(Intercept)"],
        "estimate": np.array([1.5, np.nan, -2.0]),
        "n": np.arange(3, dtype=np.int64),
        "flag": [True, False, None],
        "at": [at, at, None],
    }
    table = arrow.table(columns, SCHEMA, nan_as_null=["estimate"])
    assert table.schema == SCHEMA
    assert table.column("estimate").to_pylist() == [1.5, None, -2.0]
    kept = arrow.table(columns, SCHEMA)  # NaN stays NaN unless asked
    assert math.isnan(kept.column("estimate")[1].as_py())
    assert table.column("flag").to_pylist() == [True, False, None]
    rows = arrow.rows(table)
    assert rows == table.to_pylist()  # pyarrow's own listing, time zones included
    assert arrow.table_from_rows(rows, SCHEMA).equals(table)
    assert arrow.empty(SCHEMA).equals(SCHEMA.empty_table())


def test_read_parquet_equals_read_table(tmp_path):
    table = arrow.table(
        {"term": ["x"], "estimate": [0.5], "n": [1], "flag": [True], "at": [None]}, SCHEMA
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    assert arrow.read_parquet(path).equals(pq.read_table(path))
    assert arrow.read_parquet(path, columns=["n"]).equals(pq.read_table(path, columns=["n"]))


def test_training_into_a_store_never_imports_pandas(tmp_path):
    """Two runs into one store (the second compares with the first), as the flow makes them:
    pyarrow imports pandas (~0.25 s) from its constructors and readers; none may be used."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from datetime import datetime, timezone
        from flows.backends import open_training_data, plan_run
        from flows.config import TrainConfig
        from flows.inference import check_fit
        from flows.store import latest
        from flows.train import fit_with_validation_cost, write_outputs

        config = TrainConfig(
            data={str(ROOT / "data" / "sample.parquet")!r},
            output={str(tmp_path / "store")!r},
            exclude=["id"],
        )
        for _ in range(2):
            data = open_training_data(config, *plan_run(config))
            result, cost = fit_with_validation_cost(data, config)
            result, cost, found = check_fit(
                data, result, cost, config, refit=fit_with_validation_cost
            )
            metrics = data.metrics(result.w, result.b)
            write_outputs.fn(
                data, result, config, datetime.now(timezone.utc), cost, metrics,
                inference=found,
            )
            data.close()
        latest({str(tmp_path / "store")!r})
        print(json.dumps("pandas" in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False

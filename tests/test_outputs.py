"""The output contract: schemas, metadata, and files that appear whole or not at all."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import outputs
from flows.inference import STATISTICS
from flows.outputs import (
    COST_HISTORY_SCHEMA,
    METRICS_SCHEMA,
    PARAMS_SCHEMA,
    cost_history_table,
    metrics_table,
    params_table,
    read_metadata,
    with_metadata,
    write_table_atomic,
)


def test_schemas_are_the_contract():
    assert PARAMS_SCHEMA == pa.schema(
        [("term", pa.string())]
        + [
            (name, pa.float64())
            for name in ("estimate", "std_error", "z_value", "p_value", "ci_lower", "ci_upper")
        ]
    )
    assert COST_HISTORY_SCHEMA.names[:2] == ["iteration", "cost"]
    assert COST_HISTORY_SCHEMA.field("iteration").type == pa.int64()
    assert COST_HISTORY_SCHEMA.field("cost").type == pa.float64()
    assert METRICS_SCHEMA == pa.schema(
        [("split", pa.string()), ("metric", pa.string()), ("value", pa.float64())]
    )


def test_tables_follow_the_contract():
    params = params_table(("a", "b"), np.array([1.5, -2.0]), 0.25)
    assert params.select(["term", "estimate"]).to_pydict() == {
        "term": ["a", "b", "(Intercept)"],
        "estimate": [1.5, -2.0, 0.25],
    }
    assert params.column("std_error").null_count == 3  # no statistics given: null
    statistics = {name: np.array([1.0, np.nan, 3.0]) for name in STATISTICS}
    with_statistics = params_table(("a", "b"), np.array([np.nan, -2.0]), 0.25, statistics)
    assert with_statistics.column("estimate").to_pylist() == [None, -2.0, 0.25]
    assert with_statistics.column("p_value").to_pylist() == [1.0, None, 3.0]
    history = cost_history_table(np.array([0.69, 0.5, 0.4]), np.array([1.0, 0.5, 0.1]))
    assert history.column("iteration").to_pylist() == [0, 1, 2]
    metrics = metrics_table({"train": {"log_loss": 0.4, "accuracy": 0.8}})
    assert metrics.to_pylist() == [
        {"split": "train", "metric": "log_loss", "value": 0.4},
        {"split": "train", "metric": "accuracy", "value": 0.8},
    ]


def test_metadata_round_trips_as_json(tmp_path):
    table = with_metadata(params_table(("a",), np.array([1.0]), 0.0), {"n_examples": 3, "x": [1]})
    path = write_table_atomic(table, tmp_path / "out" / "params.parquet")
    assert read_metadata(path) == {"n_examples": 3, "x": [1]}
    raw = pq.read_schema(path).metadata[b"lrflow"]
    assert json.loads(raw)["n_examples"] == 3


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "params.parquet"
    write_table_atomic(params_table(("a",), np.array([1.0]), 0.0), path)
    before = path.read_bytes()

    def write_half_then_fail(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(outputs.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_table_atomic(params_table(("b",), np.array([2.0]), 1.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["params.parquet"]

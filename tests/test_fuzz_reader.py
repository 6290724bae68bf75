"""Fuzzing the reader: any Parquet file either loads the right matrices or raises DataError."""

import datetime
import decimal
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flows.backends import check_values
from flows.errors import DataError
from tests.conftest import load, load_memory, memory_config

HUGE = [0.0, -0.0, 1.0, -1.0, 1e-300, 1e308, -1.7e308, 3.5e38, 1e39, math.nan, math.inf, -math.inf]
NUMERIC = {
    "int8": (pa.int8(), st.integers(-128, 127)),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "uint8": (pa.uint8(), st.integers(0, 255)),
    "float32": (pa.float32(), st.floats(width=32) | st.sampled_from(HUGE[:6] + HUGE[9:])),
    "float64": (pa.float64(), st.floats() | st.sampled_from(HUGE)),
    "decimal": (
        pa.decimal128(12, 3),
        st.decimals(-(10**8), 10**8, places=3, allow_nan=False, allow_infinity=False),
    ),
}
OTHER = {
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.string(), st.text(max_size=3)),
    "binary": (pa.binary(), st.binary(max_size=3)),
    "date": (pa.date32(), st.dates(datetime.date(1900, 1, 1), datetime.date(2100, 1, 1))),
    "list": (pa.list_(pa.float64()), st.lists(st.floats(), max_size=2)),
    "struct": (pa.struct([("a", pa.int32())]), st.fixed_dictionaries({"a": st.integers(0, 9)})),
    "null": (pa.null(), st.none()),
}
LABELS = {
    "bool": (pa.bool_(), st.booleans()),
    "int01": (pa.int64(), st.integers(0, 1)),
    "int012": (pa.int8(), st.integers(0, 2)),
    "float": (pa.float64(), st.sampled_from([0.0, 1.0, 0.5, math.nan, math.inf])),
    "string": (pa.string(), st.sampled_from(["no", "yes", "maybe", ""])),
    "date": (pa.date32(), st.sampled_from([datetime.date(2020, 1, 1), datetime.date(2021, 1, 1)])),
    "list": (pa.list_(pa.int8()), st.lists(st.integers(0, 1), max_size=1)),
    "binary": (pa.binary(), st.sampled_from([b"a", b"b"])),
    "null": (pa.null(), st.none()),
}


CLEAN_NUMERIC = {
    "int32": (pa.int32(), st.integers(-(2**31), 2**31 - 1)),
    "uint16": (pa.uint16(), st.integers(0, 2**16 - 1)),
    "float32": (pa.float32(), st.floats(-(2.0**100), 2.0**100, width=32)),
    "float64": (pa.float64(), st.floats(-1e100, 1e100)),
    "decimal": NUMERIC["decimal"],
}
# Clean features of the other kinds: booleans and strings (treatment-coded categoricals).
CLEAN_FEATURES = {
    **CLEAN_NUMERIC,
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.string(), st.sampled_from(["", "a", "b", "é:", "a\n"])),
}
CLEAN_LABELS = {
    "bool": (pa.bool_(), [False, True]),
    "int01": (pa.int64(), [0, 1]),
    "string": (pa.string(), ["no", "yes"]),
    "date": (pa.date32(), [datetime.date(2020, 1, 1), datetime.date(2021, 1, 1)]),
}


@st.composite
def column(draw, kinds, n_rows, null_rates=(0.0, 0.0, 0.2)):
    """A pyarrow array of ``n_rows`` values of a drawn type, some of them null."""
    name = draw(st.sampled_from(sorted(kinds)))
    arrow_type, values = kinds[name]
    null_rate = draw(st.sampled_from(null_rates))
    items = [None if draw(st.floats(0, 1)) < null_rate else draw(values) for _ in range(n_rows)]
    return pa.array(items, type=arrow_type)


@st.composite
def clean_label(draw, n_rows):
    """Two distinct values, both present: what a valid input has."""
    arrow_type, pair = CLEAN_LABELS[draw(st.sampled_from(sorted(CLEAN_LABELS)))]
    items = [
        pair[0],
        pair[1],
        *draw(st.lists(st.sampled_from(pair), min_size=n_rows - 2, max_size=n_rows - 2)),
    ]
    return pa.array(draw(st.permutations(items)), type=arrow_type)


@st.composite
def parquet_case(draw):
    """One or two Parquet files (same or different schema) and the reader's options.

    Half the cases are "clean" (finite numeric, boolean or string features, a
    two-valued label, one schema) so that loads are common; the rest draw from every
    type, null, NaN, infinity and huge value, so that every error path is exercised.
    """
    clean = draw(st.booleans())
    n_rows = draw(st.integers(2, 12) if clean else st.integers(0, 12))
    n_features = draw(st.integers(1 if clean else 0, 4))
    names = draw(
        st.lists(
            st.text(alphabet="xyzäé:\n ", min_size=1, max_size=3),
            min_size=n_features,
            max_size=n_features,
            unique=True,
        ).filter(lambda ns: "label" not in ns)
    )
    if clean:
        arrays = {name: draw(column(CLEAN_FEATURES, n_rows, (0.0,))) for name in names}
        arrays["label"] = draw(clean_label(n_rows))
    else:
        kinds = st.sampled_from([NUMERIC, NUMERIC, NUMERIC, OTHER])
        arrays = {name: draw(column(draw(kinds), n_rows)) for name in names}
        arrays["label"] = draw(column(LABELS, n_rows))
    table = pa.table(arrays)
    split = draw(st.integers(0, n_rows)) if draw(st.booleans()) else None
    features = None
    if draw(st.booleans()) and names:
        choices = names if clean else [*names, "label", "missing"]
        features = draw(st.lists(st.sampled_from(choices), min_size=1, unique=clean))
    return {
        "table": table,
        "split": split,
        "mismatch": not clean and split is not None and draw(st.booleans()),
        "features": features,
        "standardize": draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float64", "float32"])),
        "positive": draw(st.sampled_from([None, None, None, "yes", "1", "True", "2021-01-01"])),
    }


def write_files(directory: Path, case) -> Path:
    table = case["table"]
    if case["split"] is None:
        pq.write_table(table, directory / "a.parquet")
        return directory / "a.parquet"
    first, second = table.slice(0, case["split"]), table.slice(case["split"])
    if case["mismatch"] and second.num_columns > 1:
        second = second.drop_columns([second.column_names[0]])
    pq.write_table(first, directory / "part-0.parquet")
    pq.write_table(second, directory / "part-1.parquet")
    return directory


# Arrow types that are features: numeric (standardized), boolean (one 0/1 term) and
# string (treatment-coded, the first sorted level the reference).
NUMERIC_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)


def kind_of(arrow_type: pa.DataType) -> str | None:
    if any(check(arrow_type) for check in NUMERIC_TYPES):
        return "numeric"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_string(arrow_type):
        return "categorical"
    return None


def expected_matrices(table: pa.Table, features, label, mapping, standardize, dtype):
    """The oracle: the terms and matrices from pyarrow and NumPy, computed independently."""
    rows, terms = [], []
    for name in features:
        kind = kind_of(table.schema.field(name).type)
        if kind == "categorical":
            values = table.column(name).to_pylist()
            assert None not in values  # validated
            levels = sorted(set(values))
            for level in levels[1:]:  # the first is the reference: no term
                terms.append(f"{name}={level}")
                rows.append(np.array([1.0 if v == level else 0.0 for v in values]))
            continue
        # safe=False: int64 beyond 2**53 rounds to the nearest float, as the loader does.
        values = pc.cast(table.column(name), pa.float64(), safe=False).to_numpy(
            zero_copy_only=False
        )
        assert not np.any(np.isnan(values)) and np.all(np.isfinite(values))  # validated
        if standardize and kind == "numeric":
            mean, std = values.mean(), values.std()
            scale = 1.0 if std <= 10 * np.finfo(float).eps * max(1.0, abs(mean)) else std
            values = (values - mean) / scale
        terms.append(name)
        rows.append(values)
    X = np.array(rows, dtype=np.float64).reshape(len(rows), table.num_rows)
    labels = table.column(label).to_pylist()
    assert None not in labels  # validated
    Y = np.array([[1.0 if v == mapping.positive else 0.0 for v in labels]])
    return tuple(terms), X.astype(dtype), Y.astype(dtype)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=parquet_case())
def test_the_reader_loads_correct_matrices_or_raises_data_error(case):
    with tempfile.TemporaryDirectory() as tmp:
        data = write_files(Path(tmp), case)
        options = {
            "label": "label",
            "features": case["features"],
            "positive_label": case["positive"],
            "standardize": case["standardize"],
            "dtype": case["dtype"],
        }
        try:
            config = memory_config(data, **options)
        except ValidationError as error:
            # The one input the config itself refuses: a feature listed twice.
            assert "features repeats" in str(error)
            assert len(set(case["features"])) < len(case["features"])
            return
        try:
            # The checks the CLI runs first, then the load: the same plan, or an error.
            checked = check_values(config)
            dataset = load_memory(config)
        except DataError as error:
            assert "\n" not in str(error)
            return
    # Loaded: the input must have been valid, and the matrices must be right.
    table = case["table"]
    mapping = dataset.plan.label_mapping
    assert checked == dataset.plan
    assert table.num_rows > 0 and dataset.n_examples == table.num_rows
    assert dataset.held_out is None
    distinct = pc.unique(table.column("label")).to_pylist()
    assert len(distinct) == 2 and None not in distinct
    assert {mapping.negative, mapping.positive} == set(distinct)
    columns = case["features"] or [
        name for name in table.column_names if name != "label" and kind_of(table[name].type)
    ]
    assert dataset.plan.columns == tuple(columns)
    terms, X, Y = expected_matrices(
        table, columns, "label", mapping, case["standardize"], case["dtype"]
    )
    assert dataset.plan.terms == terms
    assert dataset.train.X.shape == X.shape and dataset.train.X.dtype == np.dtype(case["dtype"])
    assert dataset.train.X.flags.c_contiguous
    # Polars and NumPy sum in different orders: agreement to a few ulps of the
    # largest magnitude (the features' range), in the target dtype.
    eps = float(np.finfo(np.dtype(case["dtype"])).eps)
    for j in range(X.shape[0]):
        magnitude = max(1.0, float(np.max(np.abs(X[j].astype(np.float64)), initial=0.0)))
        np.testing.assert_allclose(dataset.train.X[j], X[j], rtol=0, atol=64 * eps * magnitude)
    np.testing.assert_array_equal(dataset.train.Y, Y)


def test_the_generators_reach_both_outcomes():
    """The fuzz test above must see loads as well as errors, or it proves little."""
    outcomes = {"loaded": 0, "error": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(case=parquet_case())
    def probe(case):
        with tempfile.TemporaryDirectory() as tmp:
            data = write_files(Path(tmp), case)
            try:
                load(data, features=case["features"], positive_label=case["positive"])
                outcomes["loaded"] += 1
            except (DataError, ValidationError):
                outcomes["error"] += 1

    probe()
    assert outcomes["loaded"] >= 5 and outcomes["error"] >= 5, outcomes


def test_decimal_values_are_exact_enough():
    """A case the generators rarely hit: many-digit decimals convert to the nearest float."""
    with tempfile.TemporaryDirectory() as tmp:
        values = [decimal.Decimal("12345678.901"), decimal.Decimal("-0.001")]
        pq.write_table(
            pa.table({"x": pa.array(values, pa.decimal128(12, 3)), "label": [0, 1]}),
            Path(tmp) / "a.parquet",
        )
        data = load(Path(tmp) / "a.parquet", standardize=False)
    np.testing.assert_allclose(data.train.X[0], [12345678.901, -0.001], rtol=1e-15)

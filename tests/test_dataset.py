"""Ingestion: file resolution, every bad-input case of design.md section 5, matrices, labels."""

import math
from datetime import date

import numpy as np
import polars as pl
import pytest

from flows.dataset import fingerprint, resolve_files
from flows.errors import DataError
from flows.outputs import raw_scale_parameters
from tests.conftest import load, write_parquet


def test_a_file_a_directory_and_a_glob_name_the_same_rows(tmp_path, small_frame):
    frame = pl.DataFrame(small_frame)
    write_parquet(tmp_path / "parts" / "b.parquet", frame.slice(20, 20).to_dict())
    write_parquet(tmp_path / "parts" / "a.parquet", frame.slice(0, 20).to_dict())
    whole = write_parquet(tmp_path / "whole.parquet", small_frame)
    from_dir = load(tmp_path / "parts")
    from_glob = load(str(tmp_path / "parts" / "*.parquet"))
    from_file = load(whole)
    assert [p.name for p in from_dir.files] == ["a.parquet", "b.parquet"]
    # The string id is a categorical feature: its levels come from every file.
    assert from_dir.plan.terms == from_glob.plan.terms == from_file.plan.terms
    # Same rows in the same order; the statistics may differ in the last bits
    # (per-file summaries are merged).
    np.testing.assert_allclose(from_dir.train.X, from_file.train.X, rtol=0, atol=1e-13)
    np.testing.assert_allclose(from_glob.train.X, from_file.train.X, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(from_dir.train.Y, from_file.train.Y)


def test_matrix_layout_dtype_and_standardization(sample_file, small_frame):
    data = load(sample_file, exclude=["id"])
    assert data.plan.terms == ("x1", "x2")  # the excluded id and the label are not features
    X, Y = data.train.X, data.train.Y
    assert X.shape == (2, 40) and X.flags.c_contiguous
    assert Y.shape == (1, 40) and X.dtype == Y.dtype == np.float64
    assert data.train.weight is None and data.held_out is None
    mean, scale = data.plan.term_mean_scale()
    raw = np.array([small_frame["x1"], small_frame["x2"]], dtype=np.float64)
    np.testing.assert_allclose(mean, raw.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(scale, raw.std(axis=1, ddof=0), rtol=1e-12)
    np.testing.assert_allclose(X, (raw - mean[:, None]) / scale[:, None], atol=1e-13)
    np.testing.assert_array_equal(Y[0], np.asarray(small_frame["label"], dtype=float))
    assert len(data.fingerprint) == 32


def test_float32_and_no_standardization(sample_file, small_frame):
    data = load(sample_file, exclude=["id"], dtype="float32", standardize=False)
    assert data.train.X.dtype == data.train.Y.dtype == np.float32
    np.testing.assert_array_equal(data.train.X[1], np.asarray(small_frame["x2"], dtype=np.float32))
    mean, scale = data.plan.term_mean_scale()
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(scale, 1.0)


def test_a_constant_feature_is_centered_not_scaled(tmp_path, small_frame):
    path = write_parquet(tmp_path / "c.parquet", {**small_frame, "flat": [7.0] * 40})
    data = load(path, exclude=["id"])
    j = data.plan.terms.index("flat")
    mean, scale = data.plan.term_mean_scale()
    assert (mean[j], scale[j]) == (7.0, 1.0)
    np.testing.assert_array_equal(data.train.X[j], 0.0)


def test_folding_the_scaling_into_the_parameters_predicts_the_same(sample_file, small_frame):
    data = load(sample_file, exclude=["id"])
    w = np.array([[0.7], [-1.3]])
    b = 0.2
    w_raw, b_raw = raw_scale_parameters(w, b, *data.plan.term_mean_scale())
    raw = np.array([small_frame["x1"], small_frame["x2"]], dtype=np.float64)
    np.testing.assert_allclose(w_raw @ raw + b_raw, (w.T @ data.train.X + b).ravel(), rtol=1e-12)


def test_string_and_boolean_columns_are_features(tmp_path):
    """A string column is treatment-coded (reference: the first sorted level, no term);
    a boolean column is one 0/1 term, never standardized."""
    columns = {
        "color": ["red", "blue", "green", "blue", "red", "green"],
        "flag": [True, False, False, True, True, False],
        "label": [0, 1, 0, 1, 1, 0],
    }
    data = load(write_parquet(tmp_path / "c.parquet", columns))
    assert data.plan.terms == ("color=green", "color=red", "flag")
    assert data.plan.features[0].levels[0] == "blue"
    expected = [
        [1.0 if c == "green" else 0.0 for c in columns["color"]],
        [1.0 if c == "red" else 0.0 for c in columns["color"]],
        [float(f) for f in columns["flag"]],
    ]
    np.testing.assert_array_equal(data.train.X, expected)
    mean, scale = data.plan.term_mean_scale()
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(scale, 1.0)


@pytest.mark.parametrize(
    ("label", "positive", "expected_negative", "expected_positive"),
    [
        ([True, False, True, False], None, False, True),
        ([1, 0, 1, 0], None, 0, 1),
        ([1.0, 0.0, 1.0, 0.0], None, 0.0, 1.0),
        (["yes", "no", "yes", "no"], None, "no", "yes"),
        (["spam", "ham", "spam", "ham"], "ham", "spam", "ham"),
        ([3, 7, 3, 7], "3", 7, 3),
    ],
)
def test_labels_of_any_two_valued_type(
    tmp_path, label, positive, expected_negative, expected_positive
):
    path = write_parquet(tmp_path / "l.parquet", {"x": [0.0, 1.0, 2.0, 3.0], "label": label})
    data = load(path, positive_label=positive)
    assert data.plan.label_mapping.negative == expected_negative
    assert data.plan.label_mapping.positive == expected_positive
    expected = [1.0 if v == expected_positive else 0.0 for v in label]
    np.testing.assert_array_equal(data.train.Y[0], expected)


def _bad(tmp_path, name, columns):
    return write_parquet(tmp_path / name, columns)


BAD_INPUTS = {
    "missing file": (lambda t: t / "nope.parquet", {}, r"nope\.parquet: no such file"),
    "empty directory": (lambda t: (t / "empty").mkdir() or t / "empty", {}, r"no \*\.parquet"),
    "glob without match": (lambda t: str(t / "*.parquet"), {}, "no file matches"),
    "not parquet": (
        lambda t: (t / "x.parquet").write_text("id,label\n1,0\n") and t / "x.parquet",
        {},
        r"x\.parquet: not a readable Parquet file",
    ),
    "missing label": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0], "y": [0, 1]}),
        {},
        r"a\.parquet: label column 'label' not found \(columns: x, y\)",
    ),
    "missing feature": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0], "label": [0, 1]}),
        {"features": ["x", "z"]},
        r"a\.parquet: column 'z': feature not found",
    ),
    # Strings are categorical features now; a date is of no supported type.
    "date feature": (
        lambda t: _bad(
            t, "a.parquet", {"x": [date(2024, 1, 1), date(2024, 1, 2)], "label": [0, 1]}
        ),
        {"features": ["x"]},
        r"column 'x': feature has type Date, not integer, float, decimal, boolean, string",
    ),
    "no usable features": (
        lambda t: _bad(
            t, "a.parquet", {"x": [date(2024, 1, 1), date(2024, 1, 2)], "label": [0, 1]}
        ),
        {},
        "no feature columns besides the label 'label'",
    ),
    "label as feature": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0], "label": [0, 1]}),
        {"features": ["x", "label"]},
        "column 'label': is the label",
    ),
    "one label value": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0], "label": [1, 1]}),
        {},
        r"column 'label': label has one value \(1\)",
    ),
    "three label values": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0, 3.0], "label": ["a", "b", "c"]}),
        {},
        "column 'label': label has 3 distinct values",
    ),
    "null feature": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, None, 3.0], "label": [0, 1, 0]}),
        {},
        r"a\.parquet: null values in 1 column\(s\): 'x' \(1\); give --missing impute",
    ),
    "nulls in two features": (
        lambda t: _bad(
            t, "a.parquet", {"x": [1.0, None, 3.0], "z": [None, None, 1], "label": [0, 1, 0]}
        ),
        {},
        r"a\.parquet: null values in 2 column\(s\): 'x' \(1\), 'z' \(2\)",
    ),
    "null label": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0, 3.0], "label": [0, None, 1]}),
        {},
        r"column 'label': label has 1 null values",
    ),
    "nan feature": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, math.nan, 3.0], "label": [0, 1, 0]}),
        {},
        r"column 'x': 1 NaN or infinite values",
    ),
    "infinite feature": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, -math.inf, 3.0], "label": [0, 1, 0]}),
        {},
        r"column 'x': 1 NaN or infinite values",
    ),
    "zero rows": (
        lambda t: write_parquet(
            t / "a.parquet", pl.DataFrame(schema={"x": pl.Float64, "label": pl.Int64}).to_dict()
        ),
        {},
        r"a\.parquet: no rows",
    ),
    "positive label not present": (
        lambda t: _bad(t, "a.parquet", {"x": [1.0, 2.0], "label": ["a", "b"]}),
        {"positive_label": "c"},
        "positive label 'c' is not one of its values",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_clear_error(tmp_path, case):
    make, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(DataError, match=message) as raised:
        load(make(tmp_path), **kwargs)
    assert "\n" not in str(raised.value)


def test_multi_file_errors_name_the_culprit_file(tmp_path):
    good = {"x": [1.0, 2.0], "label": [0, 1]}
    write_parquet(tmp_path / "d" / "a.parquet", good)
    write_parquet(tmp_path / "d" / "b.parquet", {"x": [1.0, None], "label": [0, 1]})
    with pytest.raises(DataError, match=r"b\.parquet: null values in 1 column\(s\): 'x' \(1\)"):
        load(tmp_path / "d")
    write_parquet(tmp_path / "e" / "a.parquet", good)
    write_parquet(tmp_path / "e" / "b.parquet", {"x": [1, 2], "label": [0, 1]})
    with pytest.raises(DataError, match=r"b\.parquet: column 'x': type Int64 differs from Float64"):
        load(tmp_path / "e")
    write_parquet(tmp_path / "f" / "a.parquet", good)
    write_parquet(tmp_path / "f" / "b.parquet", {"label": [0, 1]})
    with pytest.raises(DataError, match=r"b\.parquet: column 'x': missing here"):
        load(tmp_path / "f")


def test_a_damaged_data_page_is_reported_against_its_file(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"x": np.arange(1000.0), "label": [0, 1] * 500})
    raw = bytearray(path.read_bytes())
    raw[8:400] = b"\xff" * 392  # the first data pages; the footer stays readable
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.parquet: "):
        load(path)


def test_values_beyond_float32_are_refused_for_float32(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"x": [1e39, 1.0, 2.0], "label": [0, 1, 0]})
    with pytest.raises(DataError, match="column 'x': values exceed the float32 range"):
        load(path, dtype="float32", standardize=False)
    assert load(path, dtype="float64").train.X.dtype == np.float64


def test_fingerprint_changes_with_content(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", {"x": [1.0, 2.0], "label": [0, 1]})
    before = fingerprint((a,))
    assert fingerprint((a,)) == before
    write_parquet(a, {"x": [1.0, 2.5], "label": [0, 1]})
    assert fingerprint((a,)) != before


def test_resolve_files_recurses_and_sorts(tmp_path):
    write_parquet(tmp_path / "z" / "2.parquet", {"x": [1.0], "label": [0]})
    write_parquet(tmp_path / "a" / "1.parquet", {"x": [1.0], "label": [0]})
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_files(tmp_path)] == [
        "a/1.parquet",
        "z/2.parquet",
    ]

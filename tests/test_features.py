"""The feature plan alone: column roles, mergeable summaries, the plan, and applying it."""

import numpy as np
import polars as pl
import pytest

from flows.dataset import held_out
from flows.errors import DataError
from flows.features import (
    MISSING_LEVEL,
    FeaturePlan,
    PlanSettings,
    Summary,
    apply_plan,
    choose_columns,
    learn_plan,
    summarize,
)


def table(m: int = 300, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    age = pl.Series("age", rng.normal(40, 10, m)).scatter(rng.choice(m, 20, replace=False), None)
    city = pl.Series("city", rng.choice(["rome", "oslo", "berlin"], m)).scatter([3, 7], None)
    return pl.DataFrame(
        {
            "id": np.arange(m),
            "age": age,
            "city": city,
            "tier": pl.Series(rng.choice(["b", "a"], m)).cast(pl.Categorical),
            "smoker": rng.random(m) < 0.3,
            "when": pl.date_range(pl.date(2020, 1, 1), pl.date(2020, 1, 1), eager=True).extend(
                pl.Series([None] * (m - 1), dtype=pl.Date)
            ),
            "label": np.where(rng.random(m) < 0.2, "yes", "no"),
        }
    )


def choice_of(frame: pl.DataFrame, **kwargs):
    return choose_columns(frame.schema, label="label", where="t.parquet", **kwargs)


def settings(choice, **kwargs) -> PlanSettings:
    return PlanSettings(choice=choice, label_dtype="String", where="t.parquet", **kwargs)


def plan_of(frame: pl.DataFrame, **kwargs) -> FeaturePlan:
    choice = choice_of(frame, exclude=kwargs.pop("exclude", ()))
    summary = summarize(frame, choice, path="t.parquet", max_levels=100)
    return learn_plan(summary, summary, settings(choice, **kwargs))


def test_roles_name_every_column_used_or_left_out():
    choice = choice_of(table(), exclude=["id"])
    assert [(c.name, c.kind) for c in choice.columns] == [
        ("age", "numeric"),
        ("city", "categorical"),
        ("tier", "categorical"),
        ("smoker", "boolean"),
    ]
    reasons = {c.name: c.reason for c in choice.left_out}
    assert reasons["id"] == "in --exclude"
    assert reasons["label"] == "label"
    assert "type Date" in reasons["when"]


def test_features_names_exactly_and_refuses_unsupported_types():
    choice = choice_of(table(), features=["smoker", "city"])
    assert choice.names == ("smoker", "city")
    with pytest.raises(DataError, match="column 'when': feature has type Date"):
        choice_of(table(), features=["when"])
    with pytest.raises(DataError, match="label column 'y' not found"):
        choose_columns(table().schema, label="y", where="t.parquet")


def test_summaries_of_batches_merge_to_the_summary_of_the_whole():
    frame = table(1000)
    choice = choice_of(frame, exclude=["id"])
    whole = summarize(frame, choice, path="t", max_levels=100)
    parts = Summary.merged(
        [
            summarize(frame.slice(s, 137), choice, path="t", max_levels=100)
            for s in range(0, 1000, 137)
        ],
        max_levels=100,
    )
    for name in ("age", "smoker"):
        a, b = whole.columns[name], parts.columns[name]
        assert (a.rows, a.nulls, a.count, a.minimum, a.maximum) == (
            b.rows,
            b.nulls,
            b.count,
            b.minimum,
            b.maximum,
        )
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-13)
        np.testing.assert_allclose(b.m2, a.m2, rtol=1e-12)
    assert parts.columns["city"].levels == whole.columns["city"].levels
    assert parts.labels == whole.labels


@pytest.mark.parametrize("chunks", [1, 3])
def test_summary_statistics_are_those_of_the_finite_values_bit_for_bit(chunks):
    """Clean columns are summarized whole, the others through a filter of their finite
    values; either way the numbers are the filtered values' own, to the last bit."""
    rng = np.random.default_rng(7)
    m = 5000
    parts = [
        pl.DataFrame(
            {
                "clean": rng.normal(3.0, 1e4, m // chunks),
                "ints": rng.integers(-50, 50, m // chunks),
                "holes": pl.Series(rng.normal(size=m // chunks)).scatter([1, 5], None),
                "nan": pl.Series(rng.normal(size=m // chunks)).scatter([2], np.nan),
                "y": rng.integers(0, 2, m // chunks),
            }
        )
        for _ in range(chunks)
    ]
    frame = pl.concat(parts, rechunk=False)
    assert frame.n_chunks() == chunks
    choice = choose_columns(frame.schema, label="y", where="t")
    summary = summarize(frame, choice, path="t", max_levels=100)
    for name in ("clean", "ints", "holes", "nan"):
        values = pl.col(name).cast(pl.Float64)
        finite = values.filter(values.is_finite())
        statistics = [finite.count(), finite.mean(), finite.var(ddof=0) * finite.count()]
        statistics += [finite.min(), finite.max()]
        expected = frame.select(e.alias(str(i)) for i, e in enumerate(statistics)).row(0)
        got = summary.columns[name]
        assert (got.count, got.mean, got.m2, got.minimum, got.maximum) == expected
    assert summary.columns["holes"].nulls == 2 * chunks
    assert summary.columns["nan"].nonfinite == chunks


def test_treatment_coding_reference_is_first_sorted_level_and_missing_is_last():
    plan = plan_of(table(), exclude=["id"], missing="impute")
    city = next(f for f in plan.features if f.name == "city")
    assert city.levels == ("berlin", "oslo", "rome", MISSING_LEVEL)
    assert plan.terms == (
        "age",
        f"age={MISSING_LEVEL}",
        "city=oslo",
        "city=rome",
        f"city={MISSING_LEVEL}",
        "tier=b",
        "smoker",
    )
    # Indicators are never standardized: their coefficients read as log-odds differences.
    assert plan.standardized_terms.tolist() == [True, False, False, False, False, False, False]
    assert FeaturePlan.from_json(plan.to_json()) == plan


def test_applied_rows_equal_a_hand_built_design():
    frame = table()
    plan = plan_of(frame, exclude=["id"], missing="impute")
    block = apply_plan(plan, frame, path="t")
    age = frame["age"].to_numpy()
    missing = np.isnan(age)
    mean = np.nanmean(age)
    city = frame["city"].to_list()
    expected = np.vstack(
        [
            (np.where(missing, mean, age) - mean) / np.nanstd(age),
            missing,
            [c == "oslo" for c in city],
            [c == "rome" for c in city],
            [c is None for c in city],
            (frame["tier"] == "b").to_numpy(),
            frame["smoker"].to_numpy(),
        ]
    ).astype(float)
    np.testing.assert_allclose(block.X, expected, rtol=1e-12, atol=1e-12)
    assert block.Y is not None
    np.testing.assert_array_equal(block.Y[0], (frame["label"] == "yes").to_numpy())
    assert block.imputed == {"age": 20}


def test_unseen_levels_are_the_reference_or_an_error_and_absent_levels_are_fine():
    frame = table()
    plan = plan_of(frame, exclude=["id"], missing="impute")
    batch = frame.head(6).with_columns(
        pl.Series("city", ["madrid", "rome", "rome", "oslo", "paris", "rome"])
    )
    block = apply_plan(plan, batch, path="new.parquet", label=False)
    assert block.unseen == {"city": 2}
    city_rows = block.X[2:5]  # city=oslo, city=rome, city=(missing)
    np.testing.assert_array_equal(city_rows[:, 0], [0, 0, 0])  # madrid: the reference
    np.testing.assert_array_equal(city_rows[:, 3], [1, 0, 0])
    with pytest.raises(DataError, match=r"new.parquet: column 'city': 2 values of levels not seen"):
        apply_plan(plan, batch, path="new.parquet", unseen="error", label=False)
    # A batch with only one of the levels: the others' terms are zero, no error.
    only_rome = frame.filter(pl.col("city") == "rome").head(3)
    assert apply_plan(plan, only_rome, path="t", label=False).X[2:5].tolist() == [
        [0, 0, 0],
        [1, 1, 1],
        [0, 0, 0],
    ]


def test_nulls_are_listed_at_once_with_the_remedy():
    frame = table()
    frame = frame.with_columns(frame["smoker"].scatter(0, None))
    with pytest.raises(DataError) as error:
        plan_of(frame, exclude=["id"])
    message = str(error.value)
    assert "'age' (20)" in message and "'city' (2)" in message and "'smoker' (1)" in message
    assert "--missing impute" in message


def test_too_many_levels_names_the_column_and_the_remedy():
    frame = table().with_columns(pl.format("k{}", pl.col("id")).alias("key"))
    choice = choice_of(frame)
    summary = summarize(frame, choice, path="t", max_levels=100)
    with pytest.raises(
        DataError, match=r"column 'key': has more than 100 distinct values.*--exclude key"
    ):
        learn_plan(summary, summary, settings(choice, missing="impute"))


def test_an_integer_column_of_distinct_values_is_used_and_warned_about():
    plan = plan_of(table(), missing="impute")
    assert "id" in plan.terms
    assert any("'id'" in w and "likely key" in w for w in plan.warnings)


def test_class_weight_balanced_is_scikit_learns_rule():
    frame = table()
    plan = plan_of(frame, exclude=["id"], missing="impute", class_weight="balanced")
    block = apply_plan(plan, frame, path="t")
    y = (frame["label"] == "yes").to_numpy()
    m, m1 = y.size, y.sum()
    expected = np.where(y, m / (2 * m1), m / (2 * (m - m1)))
    assert block.weight is not None
    np.testing.assert_allclose(block.weight[0], expected, rtol=1e-15)


def test_the_split_depends_on_the_seed_and_position_only():
    whole = held_out("split", 0, 10_000, 0.2, seed=7)
    assert whole is not None
    pieces = [held_out("split", s, 1000, 0.2, seed=7) for s in range(0, 10_000, 1000)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)  # type: ignore[arg-type]
    assert abs(whole.mean() - 0.2) < 0.02
    other = held_out("split", 0, 10_000, 0.2, seed=8)
    assert other is not None and (other != whole).any()
    assert held_out("train", 0, 5, 0.2, seed=7) is None
    assert held_out("validation", 0, 5, 0.0, seed=7).all()  # type: ignore[union-attr]

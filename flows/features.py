"""The feature plan: the one place where rows of a table become ``X``, ``Y`` and weights.

Three steps, each used by every backend and by scoring:

1. :func:`choose_columns` (file footers only): which columns are features, of
   which kind, and which are left out and why.
2. :func:`summarize` one batch of rows into a :class:`Summary` (per column:
   rows, nulls, non-finite values, mean and sum of squared deviations, min,
   max, and each level's count for categorical columns); summaries of
   batches, files and shards :meth:`~Summary.merge` exactly, in any grouping.
   :func:`learn_plan` turns the training rows' summary into a
   :class:`FeaturePlan` (levels and their reference, means and scales,
   imputation), raising :class:`~flows.errors.DataError` for unusable values.
3. :func:`apply_plan` turns any batch of rows (a Polars frame) into its column
   block of ``X`` (``(n_terms, k)``), ``Y`` (``(1, k)``) and row weights.

Terms
-----
- numeric column ``c``: one term ``c``, standardized with the training mean and
  scale unless ``--no-standardize``;
- boolean column ``c``: one 0/1 term ``c`` (never standardized);
- string, categorical or enum column ``c``: treatment coding, as R's ``glm``:
  the first level in sorted order is the reference and has no term, every
  other level ``v`` has a 0/1 term ``c=v``;
- with ``--missing impute``: a numeric or boolean null takes the training mean
  and a column that had nulls in training gets a 0/1 term ``c=(missing)``; a
  categorical null is the level ``(missing)`` (never the reference).
"""

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
import polars as pl

from flows.errors import DataError

MISSING_LEVEL = "(missing)"
PLAN_FORMAT = 1
Kind = Literal["numeric", "boolean", "categorical"]
MissingPolicy = Literal["error", "impute"]
UnseenPolicy = Literal["error", "reference"]
# Distinct label values a summary keeps before the label is plainly not binary.
LABEL_VALUES_KEPT = 5


def column_kind(dtype: pl.DataType) -> Kind | None:
    """How a column of this type enters ``X``; None when it cannot."""
    if dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal):
        return "numeric"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "categorical"
    return None


SUPPORTED_TYPES = "integer, float, decimal, boolean, string, categorical or enum"


@dataclass(frozen=True)
class Column:
    """A feature column and how it enters ``X``."""

    name: str
    kind: Kind
    dtype: str


@dataclass(frozen=True)
class LeftOut:
    """A column that is not a feature, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ColumnChoice:
    """The roles of a table's columns, decided from the schema alone."""

    label: str
    weight: str | None
    columns: tuple[Column, ...]
    left_out: tuple[LeftOut, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def read(self) -> list[str]:
        """Every column a training pass reads: features, label, weight."""
        return [*self.names, self.label, *([self.weight] if self.weight else [])]

    def batch_rows(self, budget: int = 32 << 20) -> int:
        """Rows per batch of a training pass: the batch's float64 values within ``budget`` bytes."""
        per_row = 8 * (len(self.read) + 2)
        return int(max(1024, min(1 << 20, budget // per_row)))


def choose_columns(
    schema: Mapping[str, pl.DataType],
    *,
    label: str,
    features: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    weight: str | None = None,
    where: PurePath | str,
) -> ColumnChoice:
    """Feature columns and left-out columns with their reasons, from the schema.

    ``features`` given: exactly those (each must have a supported type). Else
    every column of a supported type but the label, the weight and ``exclude``.
    """
    names = ", ".join(list(schema)[:10]) + (", ..." if len(schema) > 10 else "")
    if label not in schema:
        raise DataError(f"label column {label!r} not found (columns: {names})", path=where)
    for role, name in (("weight", weight), *(("excluded", e) for e in exclude)):
        if name is not None and name not in schema:
            raise DataError(f"{role} column not found (columns: {names})", path=where, column=name)
    if weight is not None and weight == label:
        raise DataError("is the label; it cannot also be the weight", path=where, column=label)
    left_out = [LeftOut(label, "label")]
    if weight is not None:
        left_out.append(LeftOut(weight, "weight"))
    chosen: list[Column] = []
    if features is not None:
        for name in features:
            if name == label or name == weight:
                role = "label" if name == label else "weight"
                raise DataError(
                    f"is the {role}; it cannot also be a feature", path=where, column=name
                )
            if name not in schema:
                raise DataError(f"feature not found (columns: {names})", path=where, column=name)
            if name in exclude:
                raise DataError("is both in --features and --exclude", path=where, column=name)
            kind = column_kind(schema[name])
            if kind is None:
                raise DataError(
                    f"feature has type {schema[name]}, not {SUPPORTED_TYPES}",
                    path=where,
                    column=name,
                )
            chosen.append(Column(name, kind, str(schema[name])))
        left_out += [
            LeftOut(n, "not in --features")
            for n in schema
            if n not in features and n != label
            if n != weight
        ]
    else:
        for name, dtype in schema.items():
            if name in (label, weight):
                continue
            kind = column_kind(dtype)
            if name in exclude:
                left_out.append(LeftOut(name, "in --exclude"))
            elif kind is None:
                left_out.append(LeftOut(name, f"type {dtype} is not {SUPPORTED_TYPES}"))
            else:
                chosen.append(Column(name, kind, str(dtype)))
        if not chosen:
            raise DataError(
                f"no feature columns besides the label {label!r} (none of type {SUPPORTED_TYPES})",
                path=where,
            )
    return ColumnChoice(label=label, weight=weight, columns=tuple(chosen), left_out=tuple(left_out))


# ---------------------------------------------------------------------------------------
# Summaries: one pass, mergeable.
# ---------------------------------------------------------------------------------------


@dataclass
class ColumnSummary:
    """What one pass found in one column over some rows; merges exactly with another.

    ``mean`` and ``m2`` (sum of squared deviations from the mean) are over the
    non-null finite values (``count`` of them), merged with Chan et al.'s
    pairwise formula, which keeps the variance accurate where a plain sum of
    squares would cancel. ``levels`` counts each value of a categorical column
    (None past ``max_levels``: too many to be a feature).
    """

    rows: int = 0
    nulls: int = 0
    nonfinite: int = 0  # NaN or infinite, nulls not counted
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    levels: dict[str, int] | None = None
    # Integer columns: every value distinct within each batch (a likely key).
    distinct: bool = True
    # The first file where nulls / non-finite values were seen, for the error message.
    null_file: str | None = None
    nonfinite_file: str | None = None

    def merge(self, other: "ColumnSummary", max_levels: int) -> None:
        if other.count:
            total = self.count + other.count
            delta = other.mean - self.mean
            self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
            self.mean = self.mean + delta * (other.count / total)
            self.count = total
        self.rows += other.rows
        self.nulls += other.nulls
        self.nonfinite += other.nonfinite
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.distinct = self.distinct and other.distinct
        self.null_file = self.null_file or other.null_file
        self.nonfinite_file = self.nonfinite_file or other.nonfinite_file
        if self.levels is None or other.levels is None:
            self.levels = None
        else:
            for level, n in other.levels.items():
                self.levels[level] = self.levels.get(level, 0) + n
            if len(self.levels) > max_levels:
                self.levels = None


@dataclass
class Summary:
    """Per-column summaries of some rows, and the label's and weight's values."""

    rows: int = 0
    columns: dict[str, ColumnSummary] = field(default_factory=dict)
    # label value -> rows; the label's nulls and non-finite values
    labels: dict[Any, int] = field(default_factory=dict)
    label_nulls: int = 0
    label_nonfinite: int = 0
    label_file: str | None = None
    # the weight column's null, non-finite and negative values
    weight_nulls: int = 0
    weight_nonfinite: int = 0
    weight_negative: int = 0
    weight_file: str | None = None

    def merge(self, other: "Summary", max_levels: int) -> None:
        self.rows += other.rows
        for name, part in other.columns.items():
            if name not in self.columns:
                self.columns[name] = ColumnSummary(levels={} if part.levels is not None else None)
            self.columns[name].merge(part, max_levels)
        for value, n in other.labels.items():
            self.labels[value] = self.labels.get(value, 0) + n
        if len(self.labels) > LABEL_VALUES_KEPT:  # not binary; keep the smallest few
            self.labels = dict(sorted(self.labels.items())[: LABEL_VALUES_KEPT + 1])
        self.label_nulls += other.label_nulls
        self.label_nonfinite += other.label_nonfinite
        self.label_file = self.label_file or other.label_file
        self.weight_nulls += other.weight_nulls
        self.weight_nonfinite += other.weight_nonfinite
        self.weight_negative += other.weight_negative
        self.weight_file = self.weight_file or other.weight_file

    @classmethod
    def merged(cls, parts: Iterable["Summary"], max_levels: int) -> "Summary":
        """The parts added in the order given (a fixed order: reproducible bits)."""
        total = cls()
        for part in parts:
            total.merge(part, max_levels)
        return total


def summarize(
    frame: pl.DataFrame, choice: ColumnChoice, *, path: PurePath | str, max_levels: int
) -> Summary:
    """The :class:`Summary` of one batch of rows, in two Polars queries over the batch:
    the checks (nulls, non-finite values, ...), then the numeric columns' statistics."""
    checks: list[pl.Expr] = []
    numeric = [c.name for c in choice.columns if c.kind != "categorical"]
    for column in choice.columns:
        name = column.name
        checks.append(pl.col(name).null_count().alias(f"nulls\0{name}"))
        if column.kind == "categorical":
            continue
        checks.append(
            pl.col(name).cast(pl.Float64).is_finite().not_().sum().alias(f"nonfinite\0{name}")
        )
        if column.kind == "numeric" and frame.schema[name].is_integer():
            checks.append(
                (pl.col(name).drop_nulls().n_unique() == pl.col(name).drop_nulls().len()).alias(
                    f"distinct\0{name}"
                )
            )
    label = pl.col(choice.label)
    checks.append(label.null_count().alias("label_nulls"))
    if frame.schema[choice.label].is_float():
        checks.append(label.is_finite().not_().sum().alias("label_nonfinite"))
    if choice.weight is not None:
        weight = pl.col(choice.weight).cast(pl.Float64)
        checks += [
            weight.null_count().alias("weight_nulls"),
            weight.is_finite().not_().sum().alias("weight_nonfinite"),
            (weight < 0).sum().alias("weight_negative"),
        ]
    found = frame.select(checks).row(0, named=True) if frame.height else {}
    # The statistics are over the finite values. A column with neither nulls nor NaN/inf
    # (most) is read whole: the same values, without a filter per statistic (the
    # statistics query measured 3x faster).
    statistics: list[pl.Expr] = []
    for name in numeric if frame.height else ():
        values = pl.col(name).cast(pl.Float64)
        if found[f"nulls\0{name}"] or found[f"nonfinite\0{name}"]:
            values = values.filter(values.is_finite())
        statistics += [
            values.count().alias(f"count\0{name}"),
            values.mean().alias(f"mean\0{name}"),
            (values.var(ddof=0) * values.count()).alias(f"m2\0{name}"),
            values.min().alias(f"min\0{name}"),
            values.max().alias(f"max\0{name}"),
        ]
    if statistics:
        found |= frame.select(statistics).row(0, named=True)
    where = str(path)
    summary = Summary(rows=frame.height)
    for column in choice.columns:
        name = column.name
        part = ColumnSummary(rows=frame.height, distinct=True)
        part.nulls = int(found.get(f"nulls\0{name}") or 0)
        if part.nulls:
            part.null_file = where
        if column.kind == "categorical":
            part.levels = _level_counts(frame.get_column(name), max_levels)
        else:
            part.nonfinite = int(found.get(f"nonfinite\0{name}") or 0)
            if part.nonfinite:
                part.nonfinite_file = where
            part.count = int(found.get(f"count\0{name}") or 0)
            if part.count:
                part.mean = float(found[f"mean\0{name}"])
                part.m2 = float(found[f"m2\0{name}"])
                part.minimum = float(found[f"min\0{name}"])
                part.maximum = float(found[f"max\0{name}"])
            part.distinct = bool(found.get(f"distinct\0{name}", False))
        summary.columns[name] = part
    summary.labels = _value_counts(frame.get_column(choice.label))
    if len(summary.labels) > LABEL_VALUES_KEPT:
        summary.labels = dict(sorted(summary.labels.items())[: LABEL_VALUES_KEPT + 1])
    summary.label_nulls = int(found.get("label_nulls") or 0)
    summary.label_nonfinite = int(found.get("label_nonfinite") or 0)
    if summary.label_nulls or summary.label_nonfinite:
        summary.label_file = where
    if choice.weight is not None:
        summary.weight_nulls = int(found.get("weight_nulls") or 0)
        summary.weight_nonfinite = int(found.get("weight_nonfinite") or 0)
        summary.weight_negative = int(found.get("weight_negative") or 0)
        if summary.weight_nulls or summary.weight_nonfinite or summary.weight_negative:
            summary.weight_file = where
    return summary


def _value_counts(values: pl.Series) -> dict[Any, int]:
    """Each non-null value's count (the series' name may be anything, even ``count``)."""
    counts = values.drop_nulls().rename("value").value_counts(sort=False, name="n")
    return dict(counts.iter_rows())


def _level_counts(values: pl.Series, max_levels: int) -> dict[str, int] | None:
    counts = _value_counts(values.cast(pl.String))
    return None if len(counts) > max_levels else counts


# ---------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMapping:
    """How the label column's two values map onto 0 and 1."""

    negative: Any
    positive: Any
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"negative": self.negative, "positive": self.positive, "dtype": self.dtype}


@dataclass(frozen=True)
class Feature:
    """One feature column's transformation into its terms of ``X``.

    Numeric and boolean: ``(value - mean) / scale`` (``mean`` 0 and ``scale`` 1
    when not standardized, always for booleans), a null imputed with
    ``impute`` (the training mean), and ``c=(missing)`` when ``missing_term``.
    Categorical: ``levels`` in sorted order with their training counts,
    ``levels[0]`` the reference; ``(missing)``, if present, is last.
    """

    name: str
    kind: Kind
    mean: float = 0.0
    scale: float = 1.0
    impute: float | None = None
    missing_term: bool = False
    levels: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()
    nulls: int = 0  # in the training rows

    @property
    def terms(self) -> tuple[str, ...]:
        if self.kind == "categorical":
            return tuple(f"{self.name}={level}" for level in self.levels[1:])
        return (self.name, *([f"{self.name}={MISSING_LEVEL}"] if self.missing_term else []))

    @property
    def standardized_terms(self) -> tuple[bool, ...]:
        """Which of :attr:`terms` are standardized (indicators never are)."""
        if self.kind == "numeric":
            return (self.scale != 1.0 or self.mean != 0.0, *([False] * self.missing_term))
        return tuple(False for _ in self.terms)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "nulls": self.nulls}
        if self.kind == "categorical":
            data["levels"] = list(self.levels)
            data["counts"] = list(self.counts)
            data["reference"] = self.levels[0]
        else:
            data |= {"mean": self.mean, "scale": self.scale, "impute": self.impute}
            data["missing_term"] = self.missing_term
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Feature":
        if data["kind"] == "categorical":
            return cls(
                name=data["name"],
                kind="categorical",
                levels=tuple(data["levels"]),
                counts=tuple(data["counts"]),
                nulls=int(data.get("nulls", 0)),
            )
        return cls(
            name=data["name"],
            kind=data["kind"],
            mean=float(data["mean"]),
            scale=float(data["scale"]),
            impute=None if data["impute"] is None else float(data["impute"]),
            missing_term=bool(data["missing_term"]),
            nulls=int(data.get("nulls", 0)),
        )


@dataclass(frozen=True)
class FeaturePlan:
    """Everything needed to turn rows into ``X``, ``Y`` and weights: learned once, stored
    in the model's metadata, applied to every batch of training, validation and scoring."""

    label: str
    label_mapping: LabelMapping
    features: tuple[Feature, ...]
    standardized: bool
    missing: MissingPolicy
    weight: str | None = None
    # Per-class row weight factors (negative, positive): 1, 1 unless --class-weight.
    class_weight: tuple[float, float] = (1.0, 1.0)
    class_weight_mode: str | None = None
    left_out: tuple[LeftOut, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(t for f in self.features for t in f.terms)

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def standardized_terms(self) -> np.ndarray:
        """``(n_terms,)`` bool: which terms are standardized."""
        return np.array([s for f in self.features for s in f.standardized_terms], dtype=bool)

    @property
    def weighted(self) -> bool:
        return self.weight is not None or self.class_weight_mode is not None

    def term_mean_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(n_terms,)`` float64 mean and scale of each term (0 and 1 for indicators)."""
        mean, scale = [], []
        for feature in self.features:
            for standardized in feature.standardized_terms:
                mean.append(feature.mean if standardized else 0.0)
                scale.append(feature.scale if standardized else 1.0)
        return np.array(mean, dtype=np.float64), np.array(scale, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT,
            "label": self.label,
            "label_mapping": self.label_mapping.to_json(),
            "standardized": self.standardized,
            "missing": self.missing,
            "weight": self.weight,
            "class_weight": list(self.class_weight),
            "class_weight_mode": self.class_weight_mode,
            "features": [f.to_json() for f in self.features],
            "terms": list(self.terms),
            "left_out": [{"name": c.name, "reason": c.reason} for c in self.left_out],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FeaturePlan":
        weights = data.get("class_weight", (1.0, 1.0))
        return cls(
            label=data["label"],
            label_mapping=LabelMapping(**data["label_mapping"]),
            features=tuple(Feature.from_json(f) for f in data["features"]),
            standardized=bool(data["standardized"]),
            missing=data["missing"],
            weight=data.get("weight"),
            class_weight=(float(weights[0]), float(weights[1])),
            class_weight_mode=data.get("class_weight_mode"),
            left_out=tuple(LeftOut(c["name"], c["reason"]) for c in data.get("left_out", [])),
            warnings=tuple(data.get("warnings", [])),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), default=str)

    def describe(self) -> list[tuple[str, str, str]]:
        """``(column, role, detail)`` for every column: the label, each feature with its
        terms, imputation and levels, the weight, and every column left out, with why."""
        mapping = self.label_mapping
        rows = [(self.label, "label", f"{mapping.negative!r} -> 0, {mapping.positive!r} -> 1")]
        for f in self.features:
            if f.kind == "categorical":
                n = len(f.terms)
                detail = (
                    f"categorical, {len(f.levels)} levels, reference {f.levels[0]!r}, "
                    f"{n} term{'' if n == 1 else 's'}"
                )
            elif f.kind == "boolean":
                detail = "boolean, one 0/1 term"
            elif f.scale != 1.0 or f.mean != 0.0:
                detail = f"numeric, standardized (mean {f.mean:.6g}, scale {f.scale:.6g})"
            else:
                detail = "numeric, as is"
            if f.nulls:
                filled = (
                    f"level {MISSING_LEVEL}"
                    if f.kind == "categorical"
                    else f"imputed with the mean {f.impute:.6g} and a {MISSING_LEVEL} term"
                )
                detail += f"; {f.nulls} nulls in training, {filled}"
            rows.append((f.name, "feature", detail))
        if self.weight is not None:
            rows.append((self.weight, "weight", "row weights"))
        if self.class_weight_mode is not None:
            negative, positive = self.class_weight
            rows.append(
                (
                    self.label,
                    "class weight",
                    f"{self.class_weight_mode}: {negative:.6g} (negative), {positive:.6g} "
                    "(positive)",
                )
            )
        rows += [(c.name, "left out", c.reason) for c in self.left_out if c.name != self.label]
        return [r for r in rows if not (r[1] == "left out" and r[0] == self.weight)]


def label_mapping(
    values: Sequence[Any],
    n_distinct: int,
    positive_label: str | None,
    *,
    label: str,
    dtype: str,
    where: PurePath | str,
) -> LabelMapping:
    """Map a binary label onto 0/1: sorted order, negative first, unless told the positive.

    ``values`` are the label's first distinct values in sorted order (all of them
    when there are two); ``n_distinct`` counts them all.
    """
    if n_distinct != 2:
        shown = ", ".join(repr(v) for v in values) + (", ..." if n_distinct > len(values) else "")
        problem = "one value" if n_distinct == 1 else f"{n_distinct} distinct values"
        if n_distinct > LABEL_VALUES_KEPT:
            problem = f"more than {LABEL_VALUES_KEPT} distinct values"
        raise DataError(
            f"label has {problem} ({shown}); it must have exactly two", path=where, column=label
        )
    if positive_label is None:
        # Sorted order puts False before True: a boolean label maps onto itself.
        return LabelMapping(negative=values[0], positive=values[1], dtype=dtype)
    matches = [v for v in values if str(v) == positive_label]
    if not matches:
        raise DataError(
            f"positive label {positive_label!r} is not one of its values "
            f"({values[0]!r}, {values[1]!r})",
            path=where,
            column=label,
        )
    positive = matches[0]
    negative = values[0] if positive == values[1] else values[1]
    return LabelMapping(negative=negative, positive=positive, dtype=dtype)


def check_values(
    summary: Summary, choice: ColumnChoice, *, missing: MissingPolicy, where: PurePath | str
) -> None:
    """Refuse what no plan can use: no rows, a bad label or weight, NaN/inf, nulls
    (with ``missing="error"``, every such column at once), too many levels."""
    if summary.rows == 0:
        raise DataError("no rows", path=where)
    if summary.label_nulls:
        raise DataError(
            f"label has {summary.label_nulls} null values; drop those rows",
            path=summary.label_file or where,
            column=choice.label,
        )
    if summary.label_nonfinite:
        raise DataError(
            f"{summary.label_nonfinite} NaN or infinite values",
            path=summary.label_file or where,
            column=choice.label,
        )
    if choice.weight is not None:
        problems = [
            (summary.weight_nulls, "null"),
            (summary.weight_nonfinite, "NaN or infinite"),
            (summary.weight_negative, "negative"),
        ]
        for count, what in problems:
            if count:
                raise DataError(
                    f"weight has {count} {what} values; weights must be finite and >= 0",
                    path=summary.weight_file or where,
                    column=choice.weight,
                )
    for column in choice.columns:
        part = summary.columns[column.name]
        if part.nonfinite:
            raise DataError(
                f"{part.nonfinite} NaN or infinite values",
                path=part.nonfinite_file or where,
                column=column.name,
            )
    with_nulls = [c.name for c in choice.columns if summary.columns[c.name].nulls]
    if with_nulls and missing == "error":
        listed = ", ".join(f"{n!r} ({summary.columns[n].nulls})" for n in with_nulls)
        first = summary.columns[with_nulls[0]].null_file or where
        raise DataError(
            f"null values in {len(with_nulls)} column(s): {listed}; give --missing impute "
            "(numeric: the training mean and an indicator term; categorical: a "
            f"{MISSING_LEVEL} level), or --exclude them",
            path=first if len(with_nulls) == 1 else where,
        )


@dataclass(frozen=True)
class PlanSettings:
    """What shapes a plan besides the data: the columns and the run's choices."""

    choice: ColumnChoice
    label_dtype: str
    where: str
    positive_label: str | None = None
    standardize: bool = True
    missing: MissingPolicy = "error"
    max_levels: int = 100
    class_weight: str | None = None
    dtype: str = "float64"
    validation_fraction: float = 0.0
    seed: int = 0

    def batch_rows(self, budget: int = 32 << 20) -> int:
        """Rows per batch: :meth:`ColumnChoice.batch_rows`."""
        return self.choice.batch_rows(budget)


def learn_plan(train: Summary, everything: Summary, settings: PlanSettings) -> FeaturePlan:
    """The plan from the training rows' summary (``everything``: all rows, for the checks).

    Levels, means and scales come from the training rows alone; the value
    checks and the level limit look at every row.
    """
    choice, where, dtype = settings.choice, settings.where, settings.dtype
    missing, max_levels = settings.missing, settings.max_levels
    check_values(everything, choice, missing=missing, where=where)
    labels = sorted(everything.labels)
    mapping = label_mapping(
        labels[:LABEL_VALUES_KEPT],
        len(everything.labels),
        settings.positive_label,
        label=choice.label,
        dtype=settings.label_dtype,
        where=where,
    )
    for value in (mapping.negative, mapping.positive):
        if not train.labels.get(value):
            raise DataError(
                f"no training row has the label value {value!r} (all are held out); "
                "use a smaller --validation-fraction or more data",
                path=where,
                column=choice.label,
            )
    largest = float(np.finfo(np.dtype(dtype)).max)
    features: list[Feature] = []
    warnings: list[str] = []
    for column in choice.columns:
        part = train.columns[column.name]
        whole = everything.columns[column.name]
        if column.kind == "categorical":
            if whole.levels is None:
                raise DataError(
                    f"has more than {max_levels} distinct values (a key or free text?); "
                    f"--exclude {column.name}, or raise --max-levels",
                    path=where,
                    column=column.name,
                )
            counts = dict(part.levels or {})
            levels = sorted(counts)
            if part.nulls:
                levels.append(MISSING_LEVEL)
                counts[MISSING_LEVEL] = part.nulls
            if not levels:
                raise DataError("holds only null values", path=where, column=column.name)
            if len(levels) == 1:
                warnings.append(
                    f"column {column.name!r} has one level ({levels[0]!r}) in the training "
                    "rows: it adds no term"
                )
            features.append(
                Feature(
                    name=column.name,
                    kind="categorical",
                    levels=tuple(levels),
                    counts=tuple(counts[v] for v in levels),
                    nulls=part.nulls,
                )
            )
            continue
        if part.count == 0:
            raise DataError("holds only null values", path=where, column=column.name)
        mean = part.mean
        std = math.sqrt(part.m2 / part.count) if part.count else 0.0
        impute = mean if missing == "impute" else None
        missing_term = missing == "impute" and part.nulls > 0
        if column.kind == "boolean" or not settings.standardize:
            if column.kind == "numeric" and max(abs(part.minimum), abs(part.maximum)) > largest:
                raise DataError(f"values exceed the {dtype} range", path=where, column=column.name)
            features.append(
                Feature(
                    column.name,
                    column.kind,
                    impute=impute,
                    missing_term=missing_term,
                    nulls=part.nulls,
                )
            )
        else:
            if not (math.isfinite(mean) and math.isfinite(std)):
                raise DataError("values too large to standardize", path=where, column=column.name)
            # A (near-)constant feature is centered and left unscaled, as StandardScaler does.
            constant = std <= 10 * np.finfo(np.float64).eps * max(1.0, abs(mean))
            features.append(
                Feature(
                    column.name,
                    "numeric",
                    mean=mean,
                    scale=1.0 if constant else std,
                    impute=impute,
                    missing_term=missing_term,
                    nulls=part.nulls,
                )
            )
        if column.kind == "numeric" and whole.distinct and whole.count == whole.rows > 1:
            warnings.append(
                f"column {column.name!r}: every value is distinct, a likely key; "
                f"--exclude {column.name} unless it is a measurement"
            )
    factors = (1.0, 1.0)
    if settings.class_weight == "balanced":
        # scikit-learn's rule: m / (2 m_c) on the training rows.
        m = train.labels[mapping.negative] + train.labels[mapping.positive]
        factors = (
            m / (2 * train.labels[mapping.negative]),
            m / (2 * train.labels[mapping.positive]),
        )
    plan = FeaturePlan(
        label=choice.label,
        label_mapping=mapping,
        features=tuple(features),
        standardized=settings.standardize,
        missing=missing,
        weight=choice.weight,
        class_weight=factors,
        class_weight_mode=settings.class_weight,
        left_out=choice.left_out,
        warnings=tuple(warnings),
    )
    if plan.n_terms == 0:
        raise DataError("the features give no terms (every categorical has one level)", path=where)
    return plan


# ---------------------------------------------------------------------------------------
# Applying the plan.
# ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """One batch of rows as the kernel sees it.

    X : ndarray of shape (n_terms, k)
    Y : ndarray of shape (1, k), 0.0/1.0, or None when the label is not there
    weight : ndarray of shape (1, k), float64, or None when unweighted
    unseen : column -> rows whose level was not seen in training (coded as reference)
    imputed : column -> null values filled in
    """

    X: np.ndarray
    Y: np.ndarray | None
    weight: np.ndarray | None
    unseen: dict[str, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)


def apply_plan(
    plan: FeaturePlan,
    frame: pl.DataFrame,
    *,
    dtype: str | np.dtype = "float64",
    path: PurePath | str,
    unseen: UnseenPolicy = "reference",
    label: bool = True,
    weights: bool = True,
    out: np.ndarray | None = None,
) -> Block:
    """The rows of ``frame`` as a column block of ``X``, ``Y`` and weights.

    ``out``, if given, is the ``(n_terms, k)`` array to fill (e.g. a slice of the
    whole matrix): no other ``(n_terms, k)`` array is made. Values are computed
    in float64 and cast once into ``dtype``. A value the plan cannot take
    (NaN/inf, a null without imputation, an unseen level with ``unseen="error"``,
    a label value other than the two) raises DataError naming ``path`` and the column.
    """
    k = frame.height
    target = np.dtype(dtype)
    X = np.empty((plan.n_terms, k), dtype=target) if out is None else out  # (n_terms, k)
    block = Block(X=X, Y=None, weight=None)
    row = 0
    for feature in plan.features:
        series = frame.get_column(feature.name)
        if feature.kind == "categorical":
            row = _fill_categorical(feature, series, X, row, block, path, unseen, plan.missing)
            continue
        values = series.cast(pl.Float64).to_numpy()  # (k,); nulls read as NaN
        nulls = series.null_count()
        if nulls:
            if feature.impute is None:
                raise DataError(
                    f"{nulls} null values; the model was trained with --missing error",
                    path=path,
                    column=feature.name,
                )
            missing = series.is_null().to_numpy()
            values = np.where(missing, feature.impute, values)
            block.imputed[feature.name] = nulls
        with np.errstate(over="ignore", invalid="ignore"):
            if feature.scale != 1.0 or feature.mean != 0.0:
                # Standardized in float64 while filling the one row: float32 loses
                # nothing to cancellation and no other (n, k) copy is made.
                if X.dtype == np.float64:
                    np.subtract(values, feature.mean, out=X[row])
                    X[row] /= feature.scale
                else:
                    X[row] = (values - feature.mean) / feature.scale
            else:
                X[row] = values
        if not np.isfinite(X[row]).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            problem = "NaN or infinite values" if bad else f"values exceed the {target} range"
            raise DataError(f"{bad or ''} {problem}".strip(), path=path, column=feature.name)
        row += 1
        if feature.missing_term:
            X[row] = series.is_null().to_numpy() if nulls else 0.0
            row += 1
    if label:
        block.Y = _label_row(plan, frame.get_column(plan.label), target, path)
        if weights:
            block.weight = _weight_row(plan, frame, block.Y, path)
    return block


def _fill_categorical(
    feature: Feature,
    series: pl.Series,
    X: np.ndarray,
    row: int,
    block: Block,
    path: PurePath | str,
    unseen: UnseenPolicy,
    missing_policy: MissingPolicy,
) -> int:
    """Treatment-coded rows of one categorical column; returns the next free row of ``X``."""
    n_terms = len(feature.levels) - 1
    rows = X[row : row + n_terms]  # (levels - 1, k)
    hot = np.empty(series.len(), dtype=bool)  # (k,)
    known = [v for v in feature.levels if v != MISSING_LEVEL]
    codes = series.cast(pl.String).cast(pl.Enum(known), strict=False).to_physical()
    code = np.array(codes.fill_null(-1).cast(pl.Int64).to_numpy())  # (k,): level, -1 if none
    missing = series.is_null().to_numpy() if series.null_count() else None
    if MISSING_LEVEL in feature.levels and missing is not None:
        code[missing] = len(feature.levels) - 1
    not_found = code < 0
    if missing is not None and MISSING_LEVEL not in feature.levels:
        # A null where training had none: with imputation an unseen level, else an error.
        if missing_policy == "error":
            raise DataError(
                f"{int(missing.sum())} null values; the model was trained with --missing error",
                path=path,
                column=feature.name,
            )
    n_unseen = int(np.count_nonzero(not_found))
    if n_unseen:
        if unseen == "error":
            first = series.filter(pl.Series(not_found)).drop_nulls().head(1).to_list()
            shown = repr(first[0]) if first else "null"
            raise DataError(
                f"{n_unseen} values of levels not seen in training (e.g. {shown}); "
                "score with --unseen reference to code them as the reference level "
                f"{feature.levels[0]!r}",
                path=path,
                column=feature.name,
            )
        block.unseen[feature.name] = block.unseen.get(feature.name, 0) + n_unseen
    # One vectorized comparison per level writes each term's row whole (contiguous);
    # a scatter of ones into (levels - 1, k) strided rows measured ~20x slower.
    for level in range(1, n_terms + 1):  # level 0 is the reference: no term
        np.equal(code, level, out=hot)
        rows[level - 1] = hot
    return row + n_terms


def _label_row(
    plan: FeaturePlan, labels: pl.Series, target: np.dtype, path: PurePath | str
) -> np.ndarray:
    mapping = plan.label_mapping
    if labels.null_count():
        raise DataError(
            f"label has {labels.null_count()} null values; drop those rows",
            path=path,
            column=plan.label,
        )
    positive = (labels == mapping.positive).to_numpy()
    negative = (labels == mapping.negative).to_numpy()
    other = ~(positive | negative)
    if other.any():
        value = labels.filter(pl.Series(other)).head(1).to_list()[0]
        raise DataError(
            f"label value {value!r} is not one of the training labels "
            f"({mapping.negative!r}, {mapping.positive!r})",
            path=path,
            column=plan.label,
        )
    return positive.astype(target).reshape(1, -1)  # (1, k)


def _weight_row(
    plan: FeaturePlan, frame: pl.DataFrame, Y: np.ndarray, path: PurePath | str
) -> np.ndarray | None:
    if not plan.weighted:
        return None
    k = frame.height
    weight = np.ones(k)
    if plan.weight is not None:
        column = frame.get_column(plan.weight)
        weight = column.cast(pl.Float64).to_numpy().copy()
        bad = column.null_count() or int(np.count_nonzero(~(np.isfinite(weight) & (weight >= 0))))
        if bad:
            raise DataError(
                f"weight has {bad} null, negative or non-finite values; "
                "weights must be finite and >= 0",
                path=path,
                column=plan.weight,
            )
    if plan.class_weight != (1.0, 1.0):
        weight *= np.where(Y[0] == 1.0, plan.class_weight[1], plan.class_weight[0])
    return weight.reshape(1, -1)  # (1, k)

"""TrainConfig and ScoreConfig: each flow's knobs, validated once (CLI, flow, prefect.yaml)."""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lr_kernel.loss import compiled_engine_available

DEFAULT_VALIDATION_FRACTION = 0.2
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
L2 = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Promote = Literal["always", "if-better"]
DEFAULT_PROMOTE_TOLERANCE = 0.01


class TrainConfig(BaseModel):
    """Parameters of one training run; the CLI flags and deployment parameters map onto it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(
        min_length=1, description="A Parquet file, a directory of Parquet files, or a glob."
    )
    output: str = Field(
        min_length=1, description="Directory for params/cost_history/metrics Parquet files."
    )
    label: str = Field(default="label", min_length=1, description="Label column.")
    features: list[str] | None = Field(
        default=None,
        description="Exactly these feature columns; default: every column of a supported type "
        "but the label, the weight and `exclude`.",
    )
    exclude: list[str] = Field(
        default=[], description="Columns never used as features (keys, leaks, free text)."
    )
    max_levels: int = Field(
        default=100,
        ge=1,
        description="Most distinct values of a string/categorical feature (more: an error).",
    )
    missing: Literal["error", "impute"] = Field(
        default="error",
        description="Nulls in features: error, or impute (numeric: the training mean and an "
        "indicator term; categorical: a '(missing)' level).",
    )
    weight: str | None = Field(
        default=None, min_length=1, description="Column of row weights (finite, >= 0)."
    )
    class_weight: Literal["balanced"] | None = Field(
        default=None,
        description="balanced: each row weighted m / (2 m_c) by its class, as scikit-learn.",
    )
    positive_label: str | None = Field(
        default=None,
        description="Label value that is the positive class (default: the larger of the two).",
    )
    iterations: int = Field(default=1000, ge=1, description="Most gradient updates.")
    learning_rate: LearningRate | list[LearningRate] | Literal["auto"] = Field(
        default=0.5,
        description="Step size (> 0), a list of them to search, or 'auto': 1/L from the "
        "data's curvature bound (stable).",
    )
    l2: L2 | list[L2] = Field(
        default=0.0, description="L2 penalty strength, or a list of them to search."
    )
    tol: float = Field(
        default=1e-8,
        ge=0,
        allow_inf_nan=False,
        description="Converged when max |∇J| <= tol, on the standardized scale (0: never).",
    )
    optimizer: Literal["gd", "nesterov", "lbfgs", "newton", "auto"] = Field(
        default="auto",
        description="auto (newton up to 200 terms, else lbfgs), newton, lbfgs (SciPy), "
        "nesterov (accelerated) or gd (the seeds').",
    )
    confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Level of the Wald intervals in params.parquet."
    )
    drop_aliased: bool = Field(
        default=False,
        description="Drop aliased (exactly collinear) terms, refit, and record null estimates "
        "for them, instead of failing.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="Kernel threads (default: the cores this process may use)."
    )
    engine: Literal["auto", "numpy", "numba"] = Field(
        default="auto",
        description="How the kernel sums its blocks: numpy calls, or one compiled (numba) loop "
        "per thread; auto: compiled for large in-memory data on 2+ threads.",
    )
    checkpoint_every: int = Field(
        default=1000, ge=0, description="Save a checkpoint every N iterations (0: never)."
    )
    resume: bool = Field(
        default=False, description="Continue from the output directory's checkpoint."
    )
    standardize: bool = Field(default=True, description="Train on standardized features.")
    dtype: Literal["float64", "float32"] = Field(default="float64")
    validation_fraction: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Share of the rows held out for validation, stratified by label "
        f"(default {DEFAULT_VALIDATION_FRACTION} without validation_data; 0 disables).",
    )
    validation_data: str | None = Field(
        default=None, description="Separate validation data instead of a split (file/dir/glob)."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the validation split.")
    validation_every: int = Field(
        default=10, ge=1, description="Record validation_cost every this many iterations."
    )

    @property
    def effective_validation_fraction(self) -> float:
        """The split actually used: 0 with separate validation data."""
        if self.validation_data is not None:
            return 0.0
        if self.validation_fraction is None:
            return DEFAULT_VALIDATION_FRACTION
        return self.validation_fraction

    @model_validator(mode="after")
    def _one_kind_of_validation(self) -> "TrainConfig":
        if self.validation_data is not None and self.validation_fraction is not None:
            raise ValueError("give validation_fraction or validation_data, not both")
        return self

    @field_validator("l2", mode="before")
    @classmethod
    def _l2_is_finite_and_non_negative(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if isinstance(value, list):
            return [cls._l2_is_finite_and_non_negative(v) for v in value]
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not (math.isfinite(number) and number >= 0):
            raise ValueError(f"must be a finite number >= 0, got {value!r}")
        return number

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _learning_rate_is_positive_or_auto(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if isinstance(value, list):
            rates = [cls._learning_rate_is_positive_or_auto(v) for v in value]
            if "auto" in rates and len(rates) > 1:
                raise ValueError("'auto' is one learning rate, not part of a search")
            return rates
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
            raise ValueError(f"must be a positive finite number or 'auto', got {value!r}")
        return number

    backend: Literal["auto", "memory", "stream", "dask"] = Field(
        default="auto",
        description="auto: memory if the data fits memory_budget, else stream.",
    )
    memory_budget: int | None = Field(
        default=None,
        gt=0,
        description="Bytes the data may take, e.g. 256MB or 2GiB (default: half the RAM).",
    )
    cache_dir: str | None = Field(
        default=None, description="Where the stream backend keeps its cache (default: $TMPDIR)."
    )
    cleanup_cache: bool = Field(default=False, description="Delete the stream cache after the run.")
    dask_address: str | None = Field(
        default=None, description="Dask scheduler, tcp://HOST:PORT (default: a LocalCluster)."
    )
    dask_workers: int = Field(default=2, ge=1, description="Workers of the LocalCluster.")

    # The model store (flows/store.py): which run latest.json names, how many run
    # directories stay.
    promote: Promote = Field(
        default="if-better",
        description="always: every finished run becomes latest; if-better: only when its "
        "validation log-loss is at most the current model's x (1 + promote_tolerance).",
    )
    promote_tolerance: float = Field(
        default=DEFAULT_PROMOTE_TOLERANCE,
        ge=0,
        allow_inf_nan=False,
        description="Relative slack of if-better (0.01: up to 1% worse still promotes).",
    )
    keep_runs: int | None = Field(
        default=None,
        ge=1,
        description="Keep the run directories of the newest N runs (and the promoted one); "
        "default: all.",
    )

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget_in_units(cls, value: object) -> object:
        if isinstance(value, str):
            from flows.backends import parse_bytes

            return parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> "TrainConfig":
        if self.dask_address is not None and self.backend not in ("auto", "dask"):
            raise ValueError(f"dask_address is set but backend is {self.backend!r}, not 'dask'")
        return self

    @model_validator(mode="after")
    def _features_or_exclude(self) -> "TrainConfig":
        if self.features is not None and self.exclude:
            raise ValueError("give features (exactly these) or exclude (all but these), not both")
        return self

    @field_validator("features")
    @classmethod
    def _features_are_distinct(cls, features: list[str] | None) -> list[str] | None:
        if features is None:
            return None
        if not features:
            raise ValueError("features must name at least one column")
        duplicates = sorted({name for name in features if features.count(name) > 1})
        if duplicates:
            raise ValueError(f"features repeats {', '.join(duplicates)}")
        return features

    @field_validator("l2", "learning_rate")
    @classmethod
    def _one_value_is_not_a_search(cls, value: float | list[float]) -> float | list[float]:
        # A list of several values is a search (flows/search.py); a list of one is
        # the plain single run, with the same outputs as the number itself.
        if isinstance(value, list):
            if not value:
                raise ValueError("needs at least one value")
            if len(value) == 1:
                return value[0]
        return value

    @model_validator(mode="after")
    def _numba_engine_is_installed(self) -> "TrainConfig":
        if self.engine == "numba" and not compiled_engine_available():
            raise ValueError("engine 'numba' needs numba installed (pip install numba)")
        return self

    @model_validator(mode="after")
    def _lbfgs_has_no_learning_rate_grid(self) -> "TrainConfig":
        if self.optimizer in ("lbfgs", "newton", "auto") and isinstance(self.learning_rate, list):
            raise ValueError(
                f"{self.optimizer} searches its own steps: "
                "a learning-rate list needs gd or nesterov"
            )
        return self


class ScoreConfig(BaseModel):
    """Parameters of one scoring run: a trained model applied to new data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="A model store (its latest.json names the run) or a run directory."
    )
    unseen: Literal["error", "reference"] = Field(
        default="reference",
        description="A categorical level not seen in training: coded as the reference level "
        "(counted in the summary), or an error.",
    )
    data: str = Field(description="A Parquet file, a directory of Parquet files, or a glob.")
    output: str = Field(description="Parquet file to write the predictions to.")
    threshold: float = Field(
        default=0.5, ge=0, le=1, allow_inf_nan=False, description="Positive when p >= this."
    )
    batch_rows: int = Field(
        default=131_072, ge=1, description="Rows per scored batch (bounds the memory)."
    )

"""TrainConfig: every knob of the train flow, validated once (CLI, flow and prefect.yaml)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
L2 = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TrainConfig(BaseModel):
    """Parameters of one training run; the CLI flags and deployment parameters map onto it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(description="A Parquet file, a directory of Parquet files, or a glob.")
    output: str = Field(description="Directory for params/cost_history/metrics Parquet files.")
    label: str = Field(default="label", min_length=1, description="Label column.")
    features: list[str] | None = Field(
        default=None, description="Feature columns; default: every other numeric column."
    )
    positive_label: str | None = Field(
        default=None,
        description="Label value that is the positive class (default: the larger of the two).",
    )
    iterations: int = Field(default=1000, ge=1, description="Most gradient updates.")
    learning_rate: LearningRate | list[LearningRate] = Field(
        default=0.5, description="Step size, or a list of them to search."
    )
    l2: L2 | list[L2] = Field(
        default=0.0, description="L2 penalty strength, or a list of them to search."
    )
    tol: float = Field(
        default=1e-10, ge=0, allow_inf_nan=False, description="Stop when |ΔJ| < tol (0: never)."
    )
    optimizer: Literal["gd", "nesterov", "lbfgs"] = Field(
        default="gd", description="gd (the seeds'), nesterov (accelerated) or lbfgs (SciPy)."
    )
    threads: int | None = Field(
        default=None, ge=1, description="Kernel threads (default: the cores this process may use)."
    )
    standardize: bool = Field(default=True, description="Train on standardized features.")
    dtype: Literal["float64", "float32"] = Field(default="float64")

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
    def _lbfgs_has_no_learning_rate_grid(self) -> "TrainConfig":
        if self.optimizer == "lbfgs" and isinstance(self.learning_rate, list):
            raise ValueError(
                "lbfgs searches its own steps: a learning-rate list needs gd or nesterov"
            )
        return self

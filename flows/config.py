"""TrainConfig: every knob of the train flow, validated once (CLI, flow and prefect.yaml)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    learning_rate: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    l2: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="L2 penalty strength.")
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

"""Results -> Parquet: the output contract's schemas, metadata, and atomic writes."""

import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import arrow, durable
from flows.config import TrainConfig
from flows.errors import DataError
from flows.inference import STATISTICS, FitInference
from flows.locks import exclusive_lock
from lr_kernel import FitResult

if TYPE_CHECKING:
    from flows.backends import TrainingData

INTERCEPT_TERM = "(Intercept)"
METADATA_KEY = b"lrflow"

# Estimates and their Wald statistics on the raw feature scale (flows.inference); null
# where not identified (a dropped aliased term) or not computed (a fit short of the optimum).
PARAMS_SCHEMA = pa.schema(
    [
        ("term", pa.string()),
        ("estimate", pa.float64()),
        *((name, pa.float64()) for name in STATISTICS),
    ]
)
COST_HISTORY_SCHEMA = pa.schema(
    [
        ("iteration", pa.int64()),
        ("cost", pa.float64()),
        ("gradient_norm", pa.float64()),
        # Log-loss on the validation rows; null where not evaluated or without validation.
        ("validation_cost", pa.float64()),
    ]
)
METRICS_SCHEMA = pa.schema(
    [("split", pa.string()), ("metric", pa.string()), ("value", pa.float64())]
)


def raw_scale_parameters(
    w: np.ndarray, b: float, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, float]:
    """Fold standardization into the parameters: ``w·(x - mean)/scale + b == w_raw·x + b_raw``.

    Parameters
    ----------
    w : ndarray of shape (n_terms, 1) or (n_terms,), trained on standardized data
    b : float
    mean, scale : ndarray of shape (n_terms,), 0 and 1 for terms not standardized

    Returns
    -------
    w_raw : ndarray of shape (n_features,), float64
    b_raw : float
    """
    w_std = np.asarray(w, dtype=np.float64).ravel()
    w_raw = w_std / scale
    return w_raw, float(b) - float(np.dot(w_raw, mean))


def params_table(
    terms: tuple[str, ...],
    w_raw: np.ndarray,
    b_raw: float,
    statistics: Mapping[str, np.ndarray] | None = None,
) -> pa.Table:
    """One row per term in the plan's order, then the intercept; NaN is written as null.

    ``statistics`` maps each of ``STATISTICS`` to ``(n_terms + 1,)`` (all null without).
    """
    size = len(terms) + 1
    columns = {"estimate": np.append(np.asarray(w_raw, dtype=np.float64), float(b_raw))}
    for name in STATISTICS:
        columns[name] = np.full(size, np.nan) if statistics is None else statistics[name]
    return arrow.table(
        {"term": [*terms, INTERCEPT_TERM], **columns},
        PARAMS_SCHEMA,
        nan_as_null=[*columns],
    )


def cost_history_table(
    cost_history: np.ndarray,
    gradient_norm: np.ndarray,
    validation_cost: np.ndarray | None = None,
) -> pa.Table:
    """One row per iteration; ``validation_cost`` NaN entries (not evaluated) become null."""
    if validation_cost is None:
        validation_cost = np.full(len(cost_history), np.nan)
    validation_cost = np.asarray(validation_cost, dtype=np.float64)
    return arrow.table(
        {
            "iteration": np.arange(len(cost_history), dtype=np.int64),
            "cost": np.asarray(cost_history, dtype=np.float64),
            "gradient_norm": np.asarray(gradient_norm, dtype=np.float64),
            "validation_cost": validation_cost,
        },
        COST_HISTORY_SCHEMA,
        nan_as_null=["validation_cost"],
    )


def metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> pa.Table:
    """Long format: one row per (split, metric)."""
    rows = [
        (split, name, float(value))
        for split, values in metrics.items()
        for name, value in values.items()
    ]
    return arrow.table(
        {
            "split": [r[0] for r in rows],
            "metric": [r[1] for r in rows],
            "value": [r[2] for r in rows],
        },
        METRICS_SCHEMA,
    )


def metrics_rows(metrics: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """The metrics as rows for a Prefect table artifact, rounded for reading."""
    return [
        {"split": split, "metric": name, "value": round(float(value), 6)}
        for split, values in metrics.items()
        for name, value in values.items()
    ]


def with_metadata(table: pa.Table, metadata: Mapping[str, Any]) -> pa.Table:
    """Attach the run's JSON metadata under the Parquet key ``lrflow``."""
    encoded = json.dumps(metadata, default=str, sort_keys=True).encode()
    return table.replace_schema_metadata({METADATA_KEY: encoded})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``lrflow`` JSON metadata of a file written by :func:`write_table_atomic`."""
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw[METADATA_KEY])


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` so that readers see the whole file or none of it.

    See :mod:`flows.durable`: temporary name, fsync, rename, fsync of the directory.
    """
    with durable.replacing(path) as handle:
        pq.write_table(table, handle)
    return path


def run_metadata(
    data: "TrainingData",
    result: FitResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str | None,
    inference: FitInference | None = None,
) -> dict[str, Any]:
    """Everything a consumer needs to trust and reproduce the run (the ``lrflow`` key).

    ``feature_plan`` is the whole plan (levels, references, means, scales,
    imputation): scoring needs nothing else to turn rows into terms.
    """
    plan = data.plan
    mean, scale = plan.term_mean_scale()
    return {
        "format_version": 2,
        "run_id": run_id,
        "config": config.model_dump(mode="json"),
        "features": list(plan.terms),
        "columns": list(plan.columns),
        "feature_plan": plan.to_json(),
        "label": plan.label,
        "label_mapping": plan.label_mapping.to_json(),
        "standardized": plan.standardized,
        "feature_mean": mean.tolist(),
        "feature_scale": scale.tolist(),
        "weighted": plan.weighted,
        "warnings": list(plan.warnings),
        "backend": data.backend,
        "input_files": [str(p) for p in data.files],
        "input_fingerprint": data.fingerprint,
        "n_examples": data.n_examples,
        "validation": _validation_metadata(data, config),
        "fit": {
            "n_iterations": result.n_iterations,
            "stop_reason": result.stop_reason,
            "converged": result.converged,
            "final_cost": float(result.cost_history[-1]),
            "gradient_max": float(result.gradient_norm_history[-1]),
            **({} if inference is None else inference.metadata),
        },
        "versions": _versions(),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def _validation_metadata(data: "TrainingData", config: TrainConfig) -> dict[str, Any] | None:
    if not data.n_validation:
        return None
    return {
        "fraction": config.effective_validation_fraction or None,
        "seed": config.seed,
        "n_examples": data.n_validation,
        "input_files": [str(p) for p in data.validation_files],
        "cost_every": config.validation_every,
    }


def write_run_outputs(
    output: Path,
    data: "TrainingData",
    result: FitResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str | None = None,
    validation_cost: np.ndarray | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    extra_files: Mapping[str, bytes | pa.Table] | None = None,
    inference: FitInference | None = None,
) -> list[Path]:
    """Write params, cost history and metrics of a finished fit as one output set.

    The files are :func:`run_output_files`'s. Returns the paths of the files,
    then of the ``_SUCCESS`` manifest.
    """
    run_id = run_id or uuid.uuid4().hex
    files = run_output_files(
        data,
        result,
        config,
        started_at=started_at,
        run_id=run_id,
        validation_cost=validation_cost,
        metrics=metrics,
        extra_files=extra_files,
        inference=inference,
    )
    manifest = write_output_set(output, files, run_id=str(run_id))
    return [*(output / entry.name for entry in manifest.files), output / MANIFEST_NAME]


def run_output_files(
    data: "TrainingData",
    result: FitResult,
    config: TrainConfig,
    *,
    started_at: datetime,
    run_id: str,
    validation_cost: np.ndarray | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    extra_files: Mapping[str, bytes | pa.Table] | None = None,
    inference: FitInference | None = None,
) -> dict[str, pa.Table | bytes]:
    """The files of a finished fit's output set: file name -> table (with metadata) or bytes.

    ``validation_cost`` is ``(n_iterations + 1,)`` with NaN where not evaluated;
    ``metrics`` default to the data's; ``extra_files`` (name -> bytes,
    e.g. the cost curve picture, or tables carrying their own metadata) join the
    same set; ``inference`` (:func:`flows.inference.check_fit`) gives the statistics
    columns and the fit's diagnostics (without it they are null).
    """
    mean, scale = data.plan.term_mean_scale()
    w_raw, b_raw = raw_scale_parameters(result.w, result.b, mean, scale)
    if inference is not None:
        w_raw[list(inference.dropped)] = np.nan  # not identified: null, as R records them
    if metrics is None:
        metrics = data.metrics(result.w, result.b)
    metadata = run_metadata(
        data, result, config, started_at=started_at, run_id=run_id, inference=inference
    )
    statistics = None if inference is None else inference.statistics
    tables = {
        "params.parquet": params_table(data.plan.terms, w_raw, b_raw, statistics),
        "cost_history.parquet": cost_history_table(
            result.cost_history, result.gradient_norm_history, validation_cost
        ),
        "metrics.parquet": metrics_table(metrics),
    }
    files: dict[str, pa.Table | bytes] = {
        name: with_metadata(table, metadata) for name, table in tables.items()
    }
    files |= extra_files or {}
    return files


# ---------------------------------------------------------------------------------------
# Output sets: several files that appear together or not at all.
#
# A run stages its whole set in a hidden directory inside the output directory
# (same file system, so renames are atomic), writes the staged manifest last (the
# set is then complete: a journal that says "commit me"), and commits it:
#   1. remove DIR/_SUCCESS    (from here the directory says "being replaced")
#   2. rename each staged file over DIR/<name>
#   3. rename the staged manifest to DIR/_SUCCESS
# A crash before the staged manifest exists leaves the earlier set untouched; a
# crash during 1-3 leaves a complete journal that the next writer rolls forward
# (recover_output_set) before doing anything else. One writer at a time holds an
# flock on the directory, so two runs never interleave their files.
# ---------------------------------------------------------------------------------------

MANIFEST_NAME = "_SUCCESS"
STAGING_PREFIX = ".lrflow-staging-"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class OutputFile:
    """One file of an output set, as the manifest records it."""

    name: str
    size: int
    blake2b: str


@dataclass(frozen=True)
class Manifest:
    """The ``_SUCCESS`` file: which files make up the set, their sizes and checksums."""

    run_id: str
    files: tuple[OutputFile, ...]
    written_at: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format_version": MANIFEST_FORMAT,
                "run_id": self.run_id,
                "written_at": self.written_at,
                "files": [
                    {"name": f.name, "size": f.size, "blake2b": f.blake2b} for f in self.files
                ],
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: PurePath) -> "Manifest":
        try:
            data = json.loads(raw)
            files = tuple(
                OutputFile(str(f["name"]), int(f["size"]), str(f["blake2b"])) for f in data["files"]
            )
            return cls(run_id=str(data["run_id"]), files=files, written_at=str(data["written_at"]))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"not an lrflow manifest ({error})", path=path) from None


def write_output_set(
    output: Path, tables: Mapping[str, pa.Table | bytes], *, run_id: str
) -> Manifest:
    """Write ``tables`` (file name -> table, or raw bytes) into ``output`` as one set.

    ``_SUCCESS`` comes last.
    Blocks while another process writes into ``output``. Until the new set is
    complete (staged and fsynced) the earlier set in ``output`` is untouched.
    """
    output.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output):
        recover_output_set(output, locked=True)
        staging = output / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            entries = []
            for name, table in tables.items():
                if isinstance(table, bytes):
                    durable.write_bytes(staging / name, table)
                else:
                    with durable.replacing(staging / name) as handle:
                        pq.write_table(table, handle)
                entries.append(_describe(staging / name))
            manifest = Manifest(
                run_id=run_id,
                files=tuple(entries),
                written_at=datetime.now(timezone.utc).isoformat(),
            )
            durable.write_bytes(staging / MANIFEST_NAME, manifest.to_json())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _commit(output, staging, manifest)
    return manifest


def recover_output_set(output: Path, *, locked: bool = False) -> None:
    """Finish a commit that a crash interrupted; delete sets a crash left half-staged.

    Safe at any time: it takes the directory's lock unless the caller holds it.
    """
    if not output.is_dir():
        return
    if not locked:
        with exclusive_lock(output):
            recover_output_set(output, locked=True)
        return
    for staging in sorted(output.glob(f"{STAGING_PREFIX}*")):
        staged_manifest = staging / MANIFEST_NAME
        if staged_manifest.is_file():
            _commit(output, staging, Manifest.from_json(staged_manifest.read_bytes(), staging))
        else:
            shutil.rmtree(staging, ignore_errors=True)


def read_manifest(output: Path) -> Manifest | None:
    """The directory's ``_SUCCESS`` manifest, or None while it has no complete set."""
    path = Path(output) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Manifest.from_json(raw, path)


def verify_output_set(output: Path) -> Manifest:
    """Check that ``output`` holds a complete, consistent set; returns its manifest.

    A consumer calls this before reading (and may call it again after, to be sure
    no newer set replaced a file meanwhile): every file the manifest lists must
    have the recorded size and BLAKE2b checksum.
    """
    output = Path(output)
    manifest = read_manifest(output)
    if manifest is None:
        raise DataError(
            f"no {MANIFEST_NAME} manifest: no complete output set (yet), or one is being replaced",
            path=output,
        )
    for entry in manifest.files:
        path = output / entry.name
        if not path.is_file():
            raise DataError("listed in the manifest but missing", path=path)
        found = _describe(path)
        if (found.size, found.blake2b) != (entry.size, entry.blake2b):
            raise DataError(
                f"size or checksum differs from the manifest of run {manifest.run_id}", path=path
            )
    return manifest


def _commit(output: Path, staging: Path, manifest: Manifest) -> None:
    """Steps 1-3 above; each can be repeated after a crash (renames of what is left)."""
    (output / MANIFEST_NAME).unlink(missing_ok=True)
    durable.fsync_directory(output)
    for entry in manifest.files:
        staged = staging / entry.name
        if staged.exists():  # absent: moved before the crash
            os.replace(staged, output / entry.name)
    durable.fsync_directory(output)
    os.replace(staging / MANIFEST_NAME, output / MANIFEST_NAME)
    durable.fsync_directory(output)
    shutil.rmtree(staging, ignore_errors=True)


def _describe(path: Path) -> OutputFile:
    digest = hashlib.blake2b(digest_size=16)
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return OutputFile(name=path.name, size=size, blake2b=digest.hexdigest())


def _versions() -> dict[str, str]:
    names = ("lrflow", "numpy", "polars", "pyarrow", "prefect")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found

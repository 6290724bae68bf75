"""The model store and the output files in object storage (``s3://``), where there is no
rename and no lock: every file is one PUT, visible whole or not at all.

A run's commit, in order (the same order as on a local disk, without the lock):

1. each file of the run's set as ``runs/<run>/<name>``, then ``runs/<run>/_SUCCESS``
   (the manifest, last: a run without it is incomplete and nobody reads it);
2. ``runs.parquet``, rewritten whole with the run's row appended (one PUT);
3. ``latest.json``, if the run is promoted (one PUT, atomic on S3);
4. with ``--keep-runs``, the prefixes of old complete runs are deleted.

A crash between two steps leaves a state the next writer completes
(:func:`recover_store`): a run that ``runs.parquet`` records as promoted after the
one ``latest.json`` names is rolled forward into ``latest.json``. A crashed run's
partial objects (no ``_SUCCESS``) are left under its prefix: with no lock there is
no telling them from a concurrent writer's run in progress. Nothing reads them.

Two concurrent writers into one store: neither run is ever seen half-written, and
``latest.json`` always names a complete run (the earlier one, or a new one once it
is promoted). Without a lock, ``runs.parquet`` is read, extended and written by
each: when their commits overlap, the later PUT wins and the other run's row is
lost (its set stays under ``runs/``), and each compares itself with the model that
was current when it read ``latest.json``. Run one writer per store at a time (the
deployment's concurrency limit of 1 does) to keep every row.
"""

import hashlib
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flows import arrow, storage
from flows.config import DEFAULT_PROMOTE_TOLERANCE, Promote
from flows.errors import DataError
from flows.outputs import MANIFEST_NAME, Manifest, OutputFile
from flows.storage import ObjectPath

if TYPE_CHECKING:
    from flows.scoring import Model, ScorePlan, ScoreResult
    from flows.store import Candidate, Comparison, HeldOut, Latest, StoredRun


def parquet_bytes(table: pa.Table) -> bytes:
    """The Parquet file of ``table``, as the local writer would write it."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


def _blake2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --- output sets ---------------------------------------------------------------------------


def write_output_set(
    output: ObjectPath, tables: Mapping[str, pa.Table | bytes], *, run_id: str
) -> Manifest:
    """Each file of the set in one PUT, then the ``_SUCCESS`` manifest, last."""
    entries = []
    for name, table in tables.items():
        data = table if isinstance(table, bytes) else parquet_bytes(table)
        storage.write_bytes(output / name, data)
        entries.append(OutputFile(name=name, size=len(data), blake2b=_blake2b(data)))
    manifest = Manifest(
        run_id=run_id, files=tuple(entries), written_at=datetime.now(timezone.utc).isoformat()
    )
    storage.write_bytes(output / MANIFEST_NAME, manifest.to_json())
    return manifest


def read_manifest(output: ObjectPath) -> Manifest | None:
    """The prefix's ``_SUCCESS`` manifest, or None while it has no complete set."""
    path = output / MANIFEST_NAME
    try:
        return Manifest.from_json(storage.read_bytes(path), path)
    except FileNotFoundError:
        return None


def verify_output_set(output: ObjectPath) -> Manifest:
    """:func:`flows.outputs.verify_output_set` for a set in object storage."""
    manifest = read_manifest(output)
    if manifest is None:
        raise DataError(f"no {MANIFEST_NAME} manifest: no complete output set", path=output)
    for entry in manifest.files:
        path = output / entry.name
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise DataError("listed in the manifest but missing", path=path) from None
        if (len(data), _blake2b(data)) != (entry.size, entry.blake2b):
            raise DataError(
                f"size or checksum differs from the manifest of run {manifest.run_id}", path=path
            )
    return manifest


# --- the store -----------------------------------------------------------------------------


def check_store(store: ObjectPath) -> None:
    """The bucket must exist and be readable; a flat output set there is refused."""
    from flows.store import FLAT_SET_NAMES

    storage.check_bucket(store)
    if store.key and any(storage.exists(store / name) for name in FLAT_SET_NAMES):
        raise DataError(
            "holds a flat output set from an earlier lrflow, not a model store; choose "
            "another --output",
            path=store,
        )


# Reads of latest.json that may meet a concurrent replacement (see read_latest).
LATEST_READS = 5


def read_latest(store: ObjectPath) -> "Latest | None":
    """The store's ``latest.json``, or None.

    A PUT replaces an object atomically, but a read is a HEAD (the size) and a
    ranged GET: a replacement between the two returns a prefix of the new object
    (measured against moto with two writers). Such a torn read does not parse;
    reading again gets one whole version.
    """
    from flows.store import LATEST_NAME, Latest

    path = store / LATEST_NAME
    for attempt in range(LATEST_READS):
        try:
            return Latest.from_json(storage.read_bytes(path), path)
        except FileNotFoundError:
            return None
        except DataError:
            if attempt == LATEST_READS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


def latest(store: ObjectPath) -> ObjectPath:
    """:func:`flows.store.latest`: the promoted run's prefix, checked against its manifest."""
    from flows.store import LATEST_NAME

    found = read_latest(store)
    if found is None:
        raise DataError(f"no {LATEST_NAME}: not a model store, or no run promoted yet", path=store)
    run_dir = store / found.run
    manifest = verify_output_set(run_dir)
    if manifest.run_id != found.run_id or _blake2b(storage.read_bytes(run_dir / MANIFEST_NAME)) != (
        found.manifest_blake2b
    ):
        raise DataError(f"{MANIFEST_NAME} is not the one {LATEST_NAME} names", path=run_dir)
    return run_dir


def is_store(path: ObjectPath) -> bool:
    from flows.store import LATEST_NAME, RUNS_DIR

    return storage.exists(path / LATEST_NAME) or bool(
        path.key and storage.info(path / RUNS_DIR).type == pafs.FileType.Directory
    )


def read_history(store: ObjectPath) -> pa.Table:
    from flows.store import HISTORY_NAME, HISTORY_SCHEMA

    path = store / HISTORY_NAME
    for attempt in range(LATEST_READS):  # a torn read, as for latest.json: read again
        try:
            raw = storage.read_bytes(path)
        except FileNotFoundError:
            return arrow.empty(HISTORY_SCHEMA)
        try:
            return arrow.read_parquet(pa.BufferReader(raw)).cast(HISTORY_SCHEMA)
        except pa.ArrowException:
            if attempt == LATEST_READS - 1:
                raise DataError("not a readable runs.parquet", path=path) from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _write_latest(
    store: ObjectPath, name: str, run_id: str, loss: float | None, reason: str
) -> "Latest":
    from flows.store import LATEST_NAME, RUNS_DIR, Latest

    manifest = storage.read_bytes(store / RUNS_DIR / name / MANIFEST_NAME)
    found = Latest(
        run=f"{RUNS_DIR}/{name}",
        run_id=run_id,
        promoted_at=datetime.now(timezone.utc).isoformat(),
        manifest_blake2b=_blake2b(manifest),
        validation_log_loss=loss,
        reason=reason,
    )
    storage.write_bytes(store / LATEST_NAME, found.to_json())
    return found


def recover_store(store: ObjectPath) -> None:
    """Roll ``latest.json`` forward to a run that ``runs.parquet`` records as promoted after
    the one it names (a writer that crashed between the two PUTs).

    ``latest.json`` is read before ``runs.parquet``: every writer writes the history
    first, so a run named by ``latest.json`` is in the history read after it, and a
    concurrent writer's newer promotion is never rolled back.
    """
    from flows.store import RUNS_DIR

    current = read_latest(store)
    rows = arrow.rows(read_history(store))
    ids = [row["run_id"] for row in rows]
    if current is not None and current.run_id not in ids:
        return  # its row was lost to a concurrent writer's runs.parquet: never roll back
    after = 0 if current is None else ids.index(current.run_id) + 1
    promoted = [row for row in rows[after:] if row["promoted"]]
    if not promoted:
        return
    newest = promoted[-1]
    if read_manifest(store / RUNS_DIR / newest["run"]) is not None:
        _write_latest(
            store, newest["run"], newest["run_id"], newest["validation_log_loss"], newest["reason"]
        )


def commit_run(
    store: ObjectPath,
    files: Mapping[str, pa.Table | bytes],
    *,
    run_id: str,
    started_at: datetime,
    data_fingerprint: str,
    n_examples: int,
    held_out: "HeldOut | None",
    promote: Promote,
    tolerance: float = DEFAULT_PROMOTE_TOLERANCE,
    keep_runs: int | None = None,
    load_champion: "Callable[[PurePath], Candidate] | None" = None,
) -> "StoredRun":
    """:func:`flows.store.commit_run` in object storage (see the module docstring)."""
    from flows.store import RUNS_DIR, StoredRun, _compare, _history_row, _recorded, run_name

    check_store(store)
    name = run_name(started_at, run_id)
    run_dir = store / RUNS_DIR / name
    recover_store(store)
    history = read_history(store)
    comparison: Comparison
    if run_id in history.column("run_id").to_pylist():  # a retry after the row was written
        comparison = _recorded(history, run_id, promote, tolerance)
    else:
        comparison = _compare(store, held_out, promote, tolerance, load_champion)
        existing = read_manifest(run_dir)
        if existing is None or existing.run_id != run_id:  # else a retry wrote it
            write_output_set(run_dir, files, run_id=run_id)
        row = _history_row(name, run_id, started_at, data_fingerprint, n_examples, comparison)
        _write_history(store, pa.concat_tables([history, row]))
        if comparison.promoted:
            _write_latest(store, name, run_id, comparison.challenger_log_loss, comparison.reason)
    listed = read_manifest(run_dir)
    written = () if listed is None else tuple(run_dir / entry.name for entry in listed.files)
    removed = prune(store, keep_runs) if keep_runs is not None else ()
    return StoredRun(store, run_dir, (*written, run_dir / MANIFEST_NAME), comparison, removed)


def _write_history(store: ObjectPath, table: pa.Table) -> None:
    from flows.store import HISTORY_NAME

    storage.write_bytes(store / HISTORY_NAME, parquet_bytes(table))


def complete_runs(store: ObjectPath) -> list[str]:
    """The names of the runs whose ``_SUCCESS`` exists, oldest first."""
    from flows.store import RUNS_DIR

    runs = store / RUNS_DIR
    if storage.info(runs).type == pafs.FileType.NotFound:
        return []
    return sorted(
        path.parent.name
        for path in storage.list_objects(runs)
        if path.name == MANIFEST_NAME and path.parent.parent == runs
    )


def prune(store: ObjectPath, keep_runs: int) -> tuple[str, ...]:
    """Delete the prefixes of all but the newest ``keep_runs`` complete runs, never the
    promoted one (incomplete prefixes may be a concurrent run's: they stay)."""
    from flows.store import RUNS_DIR

    names = complete_runs(store)
    current = read_latest(store)
    keep = set(names[-keep_runs:] if keep_runs > 0 else [])
    if current is not None:
        keep.add(ObjectPath(current.run).name)
    removed = tuple(name for name in names if name not in keep)
    for name in removed:
        # _SUCCESS first: a half-deleted run is then an incomplete one, never read.
        storage.delete_file(store / RUNS_DIR / name / MANIFEST_NAME)
        storage.delete_prefix(store / RUNS_DIR / name)
    return removed


# --- predictions ------------------------------------------------------------------------------


def check_output_object(output: ObjectPath) -> ObjectPath:
    """A predictions object may be created or replaced: its bucket exists, it is no prefix."""
    found = storage.info(output)  # a missing bucket or bad credentials fail here
    if found.type == pafs.FileType.Directory:
        raise DataError("output is a prefix holding objects; give an object name", path=output)
    if not output.key or not output.name:
        raise DataError("give an object name: s3://bucket/prefix/predictions.parquet", path=output)
    return output


def score_to_object(
    plan: "ScorePlan",
    model: "Model",
    output: ObjectPath,
    **options: Any,
) -> "ScoreResult":
    """:func:`flows.scoring.score_to_parquet` into object storage: scored into a local
    temporary file as usual (whole or not at all), then uploaded; the metrics first, so
    that a consumer who sees the predictions finds them too."""
    import dataclasses
    import tempfile

    from flows.scoring import metrics_path, score_to_parquet

    with tempfile.TemporaryDirectory(prefix="lrflow-score-") as directory:
        local = Path(directory) / output.name
        result = score_to_parquet(plan, model, local, **options)
        metrics = None
        if result.metrics_file is not None:
            metrics = storage.upload(Path(result.metrics_file), metrics_path(output))  # type: ignore[arg-type]
        storage.upload(local, output)
    return dataclasses.replace(result, output=output, metrics_file=metrics)

"""The model store: every run's output set under runs/, the promoted one in latest.json,
the history in runs.parquet, and the rule that promotes a new model.

Layout of a store ``DIR`` (the contract for consumers; the README has it too)::

    DIR/runs/<run>/        one complete output set per run (_SUCCESS last), never
                           changed once _SUCCESS exists; <run> = UTC start time and
                           the first 8 characters of the flow run id
    DIR/latest.json        the promoted run, and its manifest's checksum
    DIR/runs.parquet       one row per finished run, newest last

Every change to a store happens under one ``flock`` on ``DIR``
(:func:`flows.locks.exclusive_lock`), in this order: the run's output set, its
row in ``runs.parquet``, ``latest.json`` (if promoted), then the removal of old
run directories. Each step is a durable write (:mod:`flows.durable`), so a crash
between two steps leaves a state that :func:`recover_store` (run by the next
writer, under the lock) completes: ``runs.parquet`` is the journal, and a run it
records as promoted is rolled forward into ``latest.json``.
"""

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import arrow, durable, object_store, storage
from flows.config import DEFAULT_PROMOTE_TOLERANCE, Promote
from flows.errors import DataError
from flows.locks import exclusive_lock
from flows.outputs import (
    MANIFEST_NAME,
    read_manifest,
    recover_output_set,
    verify_output_set,
    write_output_set,
)

RUNS_DIR = "runs"
LATEST_NAME = "latest.json"
HISTORY_NAME = "runs.parquet"
LATEST_FORMAT = 1
# A run directory being removed is renamed to this hidden prefix first, so a crash
# during the removal never leaves a half-deleted directory under a run's name.
REMOVING_PREFIX = ".removing-"
# Files of today's flat output set: a directory holding them directly is not a store.
FLAT_SET_NAMES = (MANIFEST_NAME, "params.parquet")

DEFAULT_PROMOTE: Promote = "if-better"

HISTORY_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("run_id", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("data_fingerprint", pa.string()),
        ("n_examples", pa.int64()),
        ("validation_log_loss", pa.float64()),
        ("promoted", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def run_name(started_at: datetime, run_id: str) -> str:
    """``20261201T030000Z-1a2b3c4d``: the UTC start time, then the run id's first 8 characters."""
    utc = started_at.astimezone(timezone.utc)
    return f"{utc:%Y%m%dT%H%M%SZ}-{run_id.replace('-', '')[:8]}"


def check_store(store: Path | storage.ObjectPath) -> None:
    """Refuse a directory that holds a flat output set (written before the store existed)."""
    if isinstance(store, storage.ObjectPath):
        return object_store.check_store(store)
    if any((store / name).exists() for name in FLAT_SET_NAMES):
        raise DataError(
            "holds a flat output set from an earlier lrflow, not a model store; move it aside "
            f"(e.g. mv {store} {store}.flat; `lrflow score --model` still reads it there) "
            "or choose another --output",
            path=store,
        )


# --- reading a store -------------------------------------------------------------------


@dataclass(frozen=True)
class Latest:
    """``latest.json``: which run is promoted, and what a consumer checks it against.

    ``manifest_blake2b`` is the BLAKE2b (16-byte digest, hex) of the run's
    ``_SUCCESS`` file; the manifest in turn holds each file's size and checksum.
    """

    run: str  # "runs/<run>", relative to the store
    run_id: str
    promoted_at: str
    manifest_blake2b: str
    validation_log_loss: float | None
    reason: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format_version": LATEST_FORMAT,
                "run": self.run,
                "run_id": self.run_id,
                "promoted_at": self.promoted_at,
                "manifest_blake2b": self.manifest_blake2b,
                "validation_log_loss": self.validation_log_loss,
                "reason": self.reason,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: PurePath) -> "Latest":
        try:
            data = json.loads(raw)
            loss = data.get("validation_log_loss")
            return cls(
                run=str(data["run"]),
                run_id=str(data["run_id"]),
                promoted_at=str(data["promoted_at"]),
                manifest_blake2b=str(data["manifest_blake2b"]),
                validation_log_loss=None if loss is None else float(loss),
                reason=str(data.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"not an lrflow latest.json ({error})", path=path) from None


def read_latest(store: str | PurePath) -> Latest | None:
    """The store's ``latest.json``, or None before any run was promoted."""
    if isinstance(where := storage.location(store), storage.ObjectPath):
        return object_store.read_latest(where)
    path = Path(store) / LATEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Latest.from_json(raw, path)


def latest(store: str | PurePath) -> Path | storage.ObjectPath:
    """The directory of the store's promoted run, checked against its manifest.

    The consumer's entry point: reads ``latest.json``, then checks that the run's
    ``_SUCCESS`` is the one ``latest.json`` names (its checksum and run id) and
    that every file has the size and checksum the manifest records. Raises
    DataError otherwise, or when no run has been promoted yet. For a store in object
    storage it returns the run's ``storage.ObjectPath``.
    """
    if isinstance(where := storage.location(store), storage.ObjectPath):
        return object_store.latest(where)
    store = Path(store)
    found = read_latest(store)
    if found is None:
        raise DataError(f"no {LATEST_NAME}: not a model store, or no run promoted yet", path=store)
    run_dir = store / found.run
    manifest = verify_output_set(run_dir)
    if manifest.run_id != found.run_id or _blake2b(run_dir / MANIFEST_NAME) != (
        found.manifest_blake2b
    ):
        raise DataError(f"{MANIFEST_NAME} is not the one {LATEST_NAME} names", path=run_dir)
    return run_dir


def resolve_model(model: str | PurePath) -> Path | storage.ObjectPath:
    """A run directory for ``--model``: a store's promoted run, or the directory itself."""
    if isinstance(where := storage.location(model), storage.ObjectPath):
        return object_store.latest(where) if object_store.is_store(where) else where
    path = Path(model)
    if (path / LATEST_NAME).exists() or (path / RUNS_DIR).is_dir():
        return latest(path)
    return path


def model_origin(run_dir: PurePath) -> dict[str, str | None]:
    """Which run (and store, if any) a model directory is: for the score outputs' metadata."""
    in_store = run_dir.parent.name == RUNS_DIR
    return {
        "model_run": run_dir.name,
        "model_store": str(run_dir.parent.parent) if in_store else None,
    }


def read_history(store: str | PurePath) -> pa.Table:
    """``runs.parquet``: one row per finished run, newest last (empty before the first)."""
    if isinstance(where := storage.location(store), storage.ObjectPath):
        return object_store.read_history(where)
    path = Path(store) / HISTORY_NAME
    if not path.exists():
        return arrow.empty(HISTORY_SCHEMA)
    return arrow.read_parquet(path).cast(HISTORY_SCHEMA)


# --- promotion ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A model as the comparison needs it: raw-scale parameters, features, label values.

    Attributes
    ----------
    w : ndarray of shape (n_features,), float64, on the raw feature scale
    b : float, so that ``probability = sigmoid(w · x + b)``
    """

    features: tuple[str, ...]
    w: np.ndarray
    b: float
    label: str
    negative: Any
    positive: Any


@dataclass(frozen=True)
class HeldOut:
    """The new run's validation rows as promotion sees them, wherever they live: the run's
    term space and label mapping, its model's log-loss there, and the pass that measures
    any other model on the same rows.

    Attributes
    ----------
    terms : tuple of str, the run's terms in the order of its ``w``
    mean, scale : ndarray of shape (n_terms,), float64
        The run's standardization, ``x_std = (x - mean) / scale`` (0 and 1 where a
        term is not standardized): :meth:`flows.features.FeaturePlan.term_mean_scale`.
    challenger_log_loss : float
        The new model's validation log-loss (the run's own validation metrics).
    log_loss : callable ``(w, b) -> float``
        The (weighted) mean log-loss on these rows of the model ``sigmoid(w · x_std + b)``,
        ``w`` of shape (n_terms, 1) on the run's scale: the pass that gives the run's
        validation metrics (:meth:`flows.backends.TrainingData.validation_log_loss`).
    """

    terms: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    label: str
    negative: Any
    positive: Any
    challenger_log_loss: float
    log_loss: Callable[[np.ndarray, float], float]


class Incomparable(Exception):
    """A model cannot be evaluated on the rows (features or label values differ)."""


def on_run_scale(candidate: Candidate, held_out: HeldOut) -> tuple[np.ndarray, float]:
    """``candidate``'s raw-scale model in the new run's standardized term space.

    With ``x = x_std * scale + mean``, ``w_raw · x + b_raw = w_std · x_std + b_std`` for
    ``w_std = w_raw * scale`` and ``b_std = b_raw + w_raw · mean``; a term of the run
    that the candidate lacks gets weight 0. A candidate whose positive class is the
    run's negative one is negated: ``1 - sigmoid(z) = sigmoid(-z)``.

    Returns ``w`` of shape (n_terms, 1), float64, and ``b``. Raises
    :class:`Incomparable` when the candidate uses a term the run lacks, or its label
    (or label values) differ.
    """
    missing = [name for name in candidate.features if name not in held_out.terms]
    if missing:
        raise Incomparable(f"it uses feature(s) {', '.join(missing)} absent from this run's data")
    if candidate.label != held_out.label:
        raise Incomparable(f"its label is {candidate.label!r}, this run's is {held_out.label!r}")
    values = (str(candidate.negative), str(candidate.positive))
    if values == (str(held_out.negative), str(held_out.positive)):
        sign = 1.0
    elif values == (str(held_out.positive), str(held_out.negative)):
        sign = -1.0  # its positive class is this run's negative one
    else:
        raise Incomparable(f"its label values {values} are not this run's")
    w_raw = np.zeros(len(held_out.terms))  # (n_terms,), 0 where the candidate has no term
    index = [held_out.terms.index(name) for name in candidate.features]
    w_raw[index] = np.asarray(candidate.w, dtype=np.float64)
    w = w_raw * np.asarray(held_out.scale, dtype=np.float64)
    b = float(candidate.b) + float(np.dot(w_raw, np.asarray(held_out.mean, dtype=np.float64)))
    return sign * w[:, np.newaxis], sign * b


def validation_log_loss(candidate: Candidate, held_out: HeldOut) -> float:
    """Mean log-loss of ``candidate`` on the new run's validation rows: the measure the new
    model got from the run's validation metrics, by the same pass.

    The candidate's features are looked up by name among the run's terms; its label
    values may be the run's in either order. Raises :class:`Incomparable` when a
    feature is missing or the labels differ (:func:`on_run_scale`).
    """
    return float(held_out.log_loss(*on_run_scale(candidate, held_out)))


@dataclass(frozen=True)
class Comparison:
    """The promotion decision, with what it rests on."""

    promote: Promote
    tolerance: float
    challenger_log_loss: float | None
    champion_run: str | None
    champion_log_loss: float | None
    promoted: bool
    reason: str

    def rows(self) -> list[tuple[str, object]]:
        """The comparison as (what, value) pairs, for the report."""
        rows: list[tuple[str, object]] = [
            ("policy", f"--promote {self.promote}, tolerance {self.tolerance:g}"),
            ("this run's validation log-loss", _number(self.challenger_log_loss)),
            ("current model", self.champion_run or "none"),
            ("current model's validation log-loss", _number(self.champion_log_loss)),
        ]
        if self.champion_log_loss is not None:
            limit = self.champion_log_loss * (1 + self.tolerance)
            rows.append(("promoted if at most", f"{limit:.6g}"))
        return [*rows, ("promoted", self.promoted), ("reason", self.reason)]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def decide(
    promote: Promote,
    tolerance: float,
    held_out: HeldOut | None,
    champion: Candidate | None,
    champion_run: str | None = None,
) -> Comparison:
    """Promote the new model over the current one (``champion``)?

    ``always``: yes. ``if-better``: both are evaluated on the new run's validation
    rows ``held_out`` (the new one by its validation metrics, the current one by
    :func:`validation_log_loss`); yes if the new one's log-loss is at most the
    current one's times ``1 + tolerance``, or if there is no current model. A new
    model that cannot show it is better (no validation rows, or a current model
    that cannot be evaluated on them) is not promoted; the reason says how to move
    on.
    """
    challenger_loss = None if held_out is None else held_out.challenger_log_loss
    champion_loss = None
    if champion is not None and held_out is not None:
        try:
            champion_loss = validation_log_loss(champion, held_out)
        except Incomparable as why:
            if promote == "if-better":
                return Comparison(
                    promote, tolerance, challenger_loss, champion_run, None, False,
                    f"not promoted: the current model {champion_run} cannot be evaluated on "
                    f"this run's validation rows ({why}); use --promote always to replace it",
                )  # fmt: skip

    def outcome(promoted: bool, reason: str) -> Comparison:
        return Comparison(
            promote, tolerance, challenger_loss, champion_run, champion_loss, promoted, reason
        )

    if promote == "always":
        return outcome(True, "promoted: --promote always")
    if champion is None:
        return outcome(True, "promoted: no current model")
    if challenger_loss is None or champion_loss is None:
        return outcome(
            False,
            "not promoted: no validation rows to compare on; --promote if-better needs "
            "--validation-fraction > 0 or --validation-data (or use --promote always)",
        )
    limit = champion_loss * (1 + tolerance)
    if challenger_loss <= limit:
        return outcome(
            True,
            f"promoted: validation log-loss {challenger_loss:.6g} <= {limit:.6g} "
            f"(current {champion_loss:.6g} x (1 + {tolerance:g}))",
        )
    return outcome(
        False,
        f"not promoted: validation log-loss {challenger_loss:.6g} > {limit:.6g} "
        f"(current {champion_loss:.6g} x (1 + {tolerance:g})); {champion_run} stays",
    )


# --- writing a run into a store -----------------------------------------------------------


@dataclass(frozen=True)
class StoredRun:
    """What :func:`commit_run` did: where the run's set is, and whether it was promoted."""

    store: PurePath  # a local Path, or a storage.ObjectPath
    run_dir: PurePath
    files: tuple[PurePath, ...]  # the set's files, then its _SUCCESS
    comparison: Comparison
    removed: tuple[str, ...]  # run directories removed by keep_runs


def commit_run(
    store: Path | storage.ObjectPath,
    files: Mapping[str, pa.Table | bytes],
    *,
    run_id: str,
    started_at: datetime,
    data_fingerprint: str,
    n_examples: int,
    held_out: HeldOut | None,
    promote: Promote = DEFAULT_PROMOTE,
    tolerance: float = DEFAULT_PROMOTE_TOLERANCE,
    keep_runs: int | None = None,
    load_champion: Callable[[PurePath], Candidate] | None = None,
) -> StoredRun:
    """Add a finished run to ``store``: its output set, its history row, and maybe promote it.

    Under the store's lock: recover what a crash left (:func:`recover_store`),
    compare the current model with the new one on the new run's validation rows
    ``held_out`` (:func:`decide`; None: the run has none),
    write ``files`` as ``runs/<run>/`` with ``_SUCCESS`` last, append the row to
    ``runs.parquet``, replace ``latest.json`` if promoted, then remove all but
    the newest ``keep_runs`` run directories (never the promoted one).
    ``load_champion(run_dir) -> Candidate`` reads the current model (default:
    :func:`flows.scoring.load_model`). Repeating the call for the same ``run_id``
    (a retried task) neither writes a second set nor a second row. A store in object
    storage has no lock: see :mod:`flows.object_store`.
    """
    if isinstance(store, storage.ObjectPath):
        return object_store.commit_run(
            store, files, run_id=run_id, started_at=started_at,
            data_fingerprint=data_fingerprint, n_examples=n_examples, held_out=held_out,
            promote=promote, tolerance=tolerance, keep_runs=keep_runs,
            load_champion=load_champion,
        )  # fmt: skip
    check_store(store)
    name = run_name(started_at, run_id)
    run_dir = store / RUNS_DIR / name
    (store / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store):
        recover_store(store, locked=True)
        history = read_history(store)
        if run_id in history.column("run_id").to_pylist():  # a retry after the row was written
            comparison = _recorded(history, run_id, promote, tolerance)
        else:
            comparison = _compare(store, held_out, promote, tolerance, load_champion)
            existing = read_manifest(run_dir) if run_dir.is_dir() else None
            if existing is None or existing.run_id != run_id:  # else a retry wrote it
                write_output_set(run_dir, files, run_id=run_id)
            row = _history_row(name, run_id, started_at, data_fingerprint, n_examples, comparison)
            _write_history(store, pa.concat_tables([history, row]))
            if comparison.promoted:
                _write_latest(
                    store, name, run_id, comparison.challenger_log_loss, comparison.reason
                )
        # Listed before pruning: a concurrent run that started later may leave this one
        # outside the newest keep_runs, and then the next commit removes it.
        listed = read_manifest(run_dir) if run_dir.is_dir() else None  # None: pruned before
        written = () if listed is None else tuple(run_dir / entry.name for entry in listed.files)
        removed = prune(store, keep_runs, locked=True) if keep_runs is not None else ()
    return StoredRun(store, run_dir, (*written, run_dir / MANIFEST_NAME), comparison, removed)


def _compare(
    store: PurePath,
    held_out: HeldOut | None,
    promote: Promote,
    tolerance: float,
    load_champion: Callable[[PurePath], Candidate] | None,
) -> Comparison:
    current = read_latest(store)
    if current is None:
        return decide(promote, tolerance, held_out, None)
    try:
        champion_dir = latest(store)
        champion = (load_champion or load_candidate)(champion_dir)
    except DataError as damaged:  # a damaged current model must not block every later run
        comparison = decide(promote, tolerance, held_out, None)
        return Comparison(
            promote, tolerance, comparison.challenger_log_loss, current.run, None, True,
            f"promoted: the current model cannot be read ({damaged})",
        )  # fmt: skip
    return decide(promote, tolerance, held_out, champion, champion_dir.name)


def load_candidate(run_dir: PurePath) -> Candidate:
    """A run directory's model (:func:`flows.scoring.load_model`) as a :class:`Candidate`."""
    from flows.scoring import load_model  # scoring imports the data layer; only needed here

    model = load_model(run_dir)
    mean, scale = model.plan.term_mean_scale()
    w_raw = model.w / scale  # the model's terms on the raw scale, as params.parquet has them
    return Candidate(
        features=model.plan.terms,
        w=w_raw,
        b=model.b - float(np.dot(w_raw, mean)),
        label=model.label,
        negative=model.negative,
        positive=model.positive,
    )


def _recorded(history: pa.Table, run_id: str, promote: Promote, tolerance: float) -> Comparison:
    row = next(r for r in arrow.rows(history) if r["run_id"] == run_id)
    return Comparison(
        promote, tolerance, row["validation_log_loss"], None, None, row["promoted"], row["reason"]
    )


def _history_row(
    name: str,
    run_id: str,
    started_at: datetime,
    data_fingerprint: str,
    n_examples: int,
    comparison: Comparison,
) -> pa.Table:
    """A finished run's row of ``runs.parquet`` (local and object-store stores alike)."""
    row = {
        "run": name,
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc),
        "data_fingerprint": data_fingerprint,
        "n_examples": n_examples,
        "validation_log_loss": comparison.challenger_log_loss,
        "promoted": comparison.promoted,
        "reason": comparison.reason,
    }
    return arrow.table_from_rows([row], HISTORY_SCHEMA)


def _write_history(store: Path, table: pa.Table) -> None:
    with durable.replacing(store / HISTORY_NAME) as handle:
        pq.write_table(table, handle)


def _write_latest(store: Path, name: str, run_id: str, loss: float | None, reason: str) -> Latest:
    found = Latest(
        run=f"{RUNS_DIR}/{name}",
        run_id=run_id,
        promoted_at=datetime.now(timezone.utc).isoformat(),
        manifest_blake2b=_blake2b(store / RUNS_DIR / name / MANIFEST_NAME),
        validation_log_loss=loss,
        reason=reason,
    )
    durable.write_bytes(store / LATEST_NAME, found.to_json())
    return found


def recover_store(store: Path | storage.ObjectPath, *, locked: bool = False) -> None:
    """Complete what a crash left in ``store``; safe at any time.

    Finishes interrupted removals and commits of run directories, deletes run
    directories a crash left without ``_SUCCESS``, and rolls ``latest.json``
    forward to the newest run that ``runs.parquet`` records as promoted.
    """
    if isinstance(store, storage.ObjectPath):
        return object_store.recover_store(store)
    if not locked:
        with exclusive_lock(store):
            recover_store(store, locked=True)
        return
    runs = store / RUNS_DIR
    for path in sorted(runs.iterdir()) if runs.is_dir() else []:
        if path.name.startswith(REMOVING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            continue
        recover_output_set(path)  # a complete staged set is committed
        if read_manifest(path) is None:  # the run crashed before its set was complete
            shutil.rmtree(path, ignore_errors=True)
    promoted = [r for r in arrow.rows(read_history(store)) if r["promoted"]]
    current = read_latest(store)
    if promoted and (current is None or current.run_id != promoted[-1]["run_id"]):
        newest = promoted[-1]
        if read_manifest(runs / newest["run"]) is not None:
            _write_latest(
                store, newest["run"], newest["run_id"], newest["validation_log_loss"],
                newest["reason"],
            )  # fmt: skip


def prune(
    store: Path | storage.ObjectPath, keep_runs: int, *, locked: bool = False
) -> tuple[str, ...]:
    """Remove the run directories of all but the newest ``keep_runs`` runs, never the
    promoted one; returns the names removed. Their rows in ``runs.parquet`` stay."""
    if isinstance(store, storage.ObjectPath):
        return object_store.prune(store, keep_runs)
    if not locked:
        with exclusive_lock(store):
            return prune(store, keep_runs, locked=True)
    runs = store / RUNS_DIR
    names = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
    current = read_latest(store)
    keep = set(names[-keep_runs:] if keep_runs > 0 else [])
    if current is not None:
        keep.add(Path(current.run).name)
    removed = tuple(name for name in names if name not in keep)
    for name in removed:
        hidden = runs / f"{REMOVING_PREFIX}{name}"
        durable.rename(runs / name, hidden)
        shutil.rmtree(hidden)
    return removed


def _blake2b(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def summary_line(stored: StoredRun) -> str:
    """One line for the command line: the run, and whether (and why) it was promoted."""
    return f"run {stored.run_dir.name}: {stored.comparison.reason}"

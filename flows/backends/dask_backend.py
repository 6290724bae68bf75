"""Past one machine: each Dask worker reads and keeps its own shard; the driver sums partial sums.

The driver reads only the Parquet footers: it splits the row groups of all
files, in input order, into one contiguous shard per worker. Each worker reads
its row groups, checks them and returns their moments; the driver merges those
in shard order (the standardization statistics, computed the distributed way),
then each worker builds its standardized ``X`` shard and a
:class:`lr_kernel.FusedLoss` over it. Per evaluation the driver sends ``(w, b)``
with one small task per shard and adds the returned partial sums in shard
order, so the result does not depend on which worker finishes first.

A worker that leaves the cluster takes its shard with it: the run fails with a
message naming the worker rather than waiting for it.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from flows.backends.pieces import (
    ValueSummary,
    finish_summary,
    iter_batches,
    kernel_arrays,
    merge_metrics,
    piece_sums,
    summarize,
)
from flows.dataset import InputPlan, LabelMapping, fingerprint
from flows.errors import LrflowError
from lr_kernel import FusedLoss, loss_from_sums

# Rows per Arrow batch a worker decodes at a time while reading its row groups.
WORKER_BATCH_ROWS = 1 << 18
# How often the driver checks that the shards' workers are still there while it waits.
LIVENESS_SECONDS = 1.0


class WorkerLostError(LrflowError):
    """A Dask worker holding a shard left the cluster: the shard, and the run, are lost."""


Piece = tuple[str, list[int]]  # a file and some of its row groups


def split_row_groups(files: tuple[Path, ...], n_shards: int) -> list[list[Piece]]:
    """Contiguous runs of row groups, in input order, of about equal row counts.

    Returns one list of ``(file, row groups)`` per non-empty shard.
    """
    groups = []  # (file, row group, rows)
    for path in files:
        metadata = pq.read_metadata(path)
        groups += [
            (str(path), g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)
        ]
    total = sum(rows for _, _, rows in groups) or 1
    shards: list[list[Piece]] = [[] for _ in range(n_shards)]
    before = 0
    for path, group, rows in groups:
        # The shard whose share of the rows this group starts in.
        shard = shards[min(n_shards - 1, before * n_shards // total)]
        if shard and shard[-1][0] == path:
            shard[-1][1].append(group)
        else:
            shard.append((path, [group]))
        before += rows
    return [shard for shard in shards if shard]


@dataclass
class _RawShard:
    """On a worker: its rows as read, before the statistics are known."""

    frame: pl.DataFrame
    summary: ValueSummary


@dataclass
class _Shard:
    """On a worker: the standardized shard and the fused loss over it."""

    loss: FusedLoss
    X: np.ndarray = field(repr=False)
    Y: np.ndarray = field(repr=False)


def _read_shard(plan: InputPlan, pieces: list[Piece]) -> _RawShard:
    frames, summary = [], ValueSummary.empty(len(plan.features))
    for path, groups in pieces:
        for frame in iter_batches(plan, Path(path), WORKER_BATCH_ROWS, row_groups=groups):
            summary.merge(summarize(frame, plan, Path(path)))
            frames.append(frame)
    return _RawShard(frame=pl.concat(frames, rechunk=False), summary=summary)


def _shard_summary(raw: _RawShard) -> ValueSummary:
    return raw.summary


def _build_shard(
    raw: _RawShard,
    plan: InputPlan,
    mapping: LabelMapping,
    mean: np.ndarray,
    scale: np.ndarray,
    dtype: str,
) -> _Shard:
    X, Y = kernel_arrays(raw.frame, plan, mapping, mean, scale, np.dtype(dtype))
    return _Shard(loss=FusedLoss(X, Y), X=X, Y=Y)


def _shard_sums(shard: _Shard, w: np.ndarray, b: float) -> tuple[float, np.ndarray, float]:
    return shard.loss.partial_sums(w, b)


def _shard_metrics(shard: _Shard, w: np.ndarray, b: float) -> dict[str, Any]:
    return piece_sums(w.T @ shard.X + b, shard.Y)


@dataclass
class DaskData:
    """A training set sharded over Dask workers: what the flow needs besides ``X`` and ``Y``."""

    features: tuple[str, ...]
    label: str
    label_mapping: LabelMapping
    mean: np.ndarray
    scale: np.ndarray
    standardized: bool
    files: tuple[Path, ...]
    fingerprint: str
    n_examples: int
    dtype: np.dtype
    client: Any = field(repr=False)
    shards: list[Any] = field(repr=False)  # futures of _Shard, in shard order
    workers: list[str] = field(repr=False)  # the worker holding each shard
    owned: list[Any] = field(default_factory=list, repr=False)  # closed by close()
    validation: None = None  # held-out data needs the memory backend

    def loss(self, n_threads: int = 1) -> "DaskLoss":
        return DaskLoss(self)

    def train_metrics(self, w: np.ndarray, b: float) -> dict[str, float]:
        return merge_metrics(self._map(_shard_metrics, w, b))

    def close(self) -> None:
        """Release the shards; stop the client and the cluster if this run started them."""
        self.shards.clear()
        for thing in self.owned:
            thing.close()

    def _map(self, function: Any, *args: Any) -> list[Any]:
        """``function(shard, *args)`` on each shard's worker; results in shard order."""
        from distributed import wait

        futures = [
            self.client.submit(function, shard, *args, workers=[worker], pure=False)
            for shard, worker in zip(self.shards, self.workers, strict=True)
        ]
        while True:
            try:
                wait(futures, timeout=LIVENESS_SECONDS)
                return self.client.gather(futures)
            except TimeoutError:
                self._check_workers()
            except Exception:
                self._check_workers()
                raise

    def _check_workers(self) -> None:
        alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
        for index, worker in enumerate(self.workers):
            if worker not in alive:
                raise WorkerLostError(
                    f"dask worker {worker} left the cluster with shard {index} of "
                    f"{len(self.workers)} of the data; the run cannot finish without it "
                    "(run it again on the remaining workers)"
                )


class DaskLoss:
    """A :class:`lr_kernel.LossFunction` whose sums come from the shards' workers."""

    def __init__(self, data: DaskData) -> None:
        self._data = data

    @property
    def n_features(self) -> int:
        return len(self._data.features)

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    def __call__(self, w: np.ndarray, b: float, l2: float = 0.0) -> tuple[float, np.ndarray, float]:
        parts = self._data._map(_shard_sums, w, float(b))
        # Shard order, whatever order the workers finished in: reproducible bits.
        dw_sum = parts[0][1].copy()
        for part in parts[1:]:
            dw_sum += part[1]
        loss_sum = math.fsum(p[0] for p in parts)
        db_sum = math.fsum(p[2] for p in parts)
        return loss_from_sums(loss_sum, dw_sum, db_sum, w, l2, self._data.n_examples, self.dtype)


def open_dask(
    plan: InputPlan,
    *,
    address: str | None = None,
    n_workers: int = 2,
    client: Any = None,
    standardize: bool = True,
    dtype: str = "float64",
    positive_label: str | None = None,
) -> DaskData:
    """Shard the input over a Dask cluster: ``client``, else ``address``, else a new LocalCluster.

    A cluster or client started here is stopped by :meth:`DaskData.close`.
    """
    from distributed import Client, LocalCluster

    owned: list[Any] = []
    if client is None:
        if address is None:
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=1, dashboard_address=":0"
            )
            owned.append(cluster)
            client = Client(cluster)
        else:
            client = Client(address)
        owned.insert(0, client)
    try:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            raise LrflowError(f"the dask cluster at {client.scheduler.address} has no workers")
        pieces = split_row_groups(plan.files, len(workers))
        workers = workers[: len(pieces)]

        def on(worker: str, function: Any, *args: Any) -> Any:
            return client.submit(function, *args, workers=[worker], pure=False)

        raws = [
            on(worker, _read_shard, plan, own) for worker, own in zip(workers, pieces, strict=True)
        ]
        summaries = client.gather(
            [on(w, _shard_summary, raw) for w, raw in zip(workers, raws, strict=True)]
        )
        summary = ValueSummary.empty(len(plan.features))
        for part in summaries:  # shard order: the same statistics every run
            summary.merge(part)
        mapping, mean, scale = finish_summary(plan, summary, positive_label, standardize)
        shards = [
            on(worker, _build_shard, raw, plan, mapping, mean, scale, dtype)
            for worker, raw in zip(workers, raws, strict=True)
        ]
        client.gather(shards)  # errors surface here, not in the first iteration
        del raws  # the raw frames are freed once their shards are built
        return DaskData(
            features=plan.features,
            label=plan.label,
            label_mapping=mapping,
            mean=mean,
            scale=scale,
            standardized=standardize,
            files=plan.files,
            fingerprint=fingerprint(plan.files),
            n_examples=summary.rows,
            dtype=np.dtype(dtype),
            client=client,
            shards=shards,
            workers=workers,
            owned=owned,
        )
    except BaseException:
        for thing in owned:
            thing.close()
        raise

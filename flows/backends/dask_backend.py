"""Past one machine: each Dask worker reads and keeps its own shard; the driver sums partial sums.

The driver reads only the Parquet footers: it splits the row groups of all
files (training data, then separate validation data), in input order, into one
contiguous shard per worker. Each worker reads its row groups and returns their
summaries (:mod:`flows.backends.passes`); the driver merges those in shard
order and learns the feature plan, then each worker reads its row groups again
and applies the plan into its own ``X`` (training and held-out rows) and a
:class:`lr_kernel.FusedLoss` over it. Per evaluation the driver sends ``(w, b)``
with one small task per shard and adds the returned partial sums in shard
order, so the result does not depend on which worker finishes first.

A worker that leaves the cluster takes its shard with it: the run fails with a
message naming the worker rather than waiting for it.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flows.backends import PartialSums, PiecewiseData
from flows.backends.memory import Rows
from flows.backends.partial_metrics import piece_sums
from flows.backends.passes import learn, piece_blocks, pieces_of, summarize_piece
from flows.dataset import InputPlan, Piece, fingerprint, row_group_pieces
from flows.errors import LrflowError
from flows.features import FeaturePlan, PlanSettings, Summary
from lr_kernel import FusedLoss

# How often the driver checks that the shards' workers are still there while it waits.
LIVENESS_SECONDS = 1.0


class WorkerLostError(LrflowError):
    """A Dask worker holding a shard left the cluster: the shard, and the run, are lost."""


def split_pieces(pieces: list[Piece], n_shards: int) -> list[list[Piece]]:
    """Contiguous runs of pieces, in input order, of about equal row counts (none empty)."""
    total = sum(p.n_rows for p in pieces) or 1
    shards: list[list[Piece]] = [[] for _ in range(n_shards)]
    before = 0
    for piece in pieces:
        # The shard whose share of the rows this piece starts in.
        shards[min(n_shards - 1, before * n_shards // total)].append(piece)
        before += piece.n_rows
    return [shard for shard in shards if shard]


def _summarize_shard(pieces: list[Piece], prep: PlanSettings) -> tuple[Summary, Summary]:
    train, held_out = Summary(), Summary()
    for piece in pieces:
        piece_train, piece_held_out = summarize_piece(piece, prep)
        train.merge(piece_train, prep.max_levels)
        held_out.merge(piece_held_out, prep.max_levels)
    return train, held_out


@dataclass
class _Shard:
    """On a worker: its training and held-out rows through the plan."""

    parts: dict[str, Rows] = field(repr=False)
    weight_sums: dict[str, float]
    losses: dict[str, FusedLoss] = field(default_factory=dict, repr=False)


def _build_shard(pieces: list[Piece], plan: FeaturePlan, prep: PlanSettings) -> _Shard:
    blocks: dict[bool, list[Any]] = {False: [], True: []}
    for piece in pieces:
        for is_held_out, block in piece_blocks(piece, plan, prep):
            blocks[is_held_out].append(block)
    parts, sums = {}, {}
    for is_held_out, name in ((False, "train"), (True, "validation")):
        found = blocks[is_held_out]
        if not found:
            continue
        X = np.concatenate([b.X for b in found], axis=1)  # (n, m_shard), C order
        Y = np.concatenate([b.Y for b in found], axis=1)
        weight = None if found[0].weight is None else np.concatenate([b.weight for b in found], 1)
        parts[name] = Rows(X, Y, weight)
        sums[name] = float(X.shape[1]) if weight is None else math.fsum(weight[0])
    return _Shard(parts=parts, weight_sums=sums)


def _shard_sums(shard: _Shard, part: str, w: np.ndarray, b: float, hessian: bool) -> Any:
    rows = shard.parts.get(part)
    if rows is None:
        return None
    if part not in shard.losses:  # built once, on the worker, at the first evaluation
        shard.losses[part] = rows.loss()
    loss = shard.losses[part]
    return loss.hessian_sums(w, b) if hessian else loss.partial_sums(w, b)


def _shard_metrics(shard: _Shard, part: str, w: np.ndarray, b: float) -> Any:
    rows = shard.parts.get(part)
    if rows is None:
        return None
    return piece_sums(w.T @ rows.X + b, rows.Y, rows.weight)


def _shard_weight_sums(shard: _Shard) -> dict[str, float]:
    return shard.weight_sums


@dataclass
class DaskData(PiecewiseData):
    """:class:`flows.backends.TrainingData` sharded over Dask workers."""

    client: Any = field(repr=False)
    shards: list[Any] = field(repr=False)  # futures of _Shard, in shard order
    workers: list[str] = field(repr=False)  # the worker holding each shard
    owned: list[Any] = field(default_factory=list, repr=False)  # closed by close()
    backend: str = "dask"

    def loss(self, n_threads: int = 1, engine: str = "auto") -> "DaskLoss":
        return DaskLoss(self, "train")

    def validation_loss(self) -> "DaskLoss | None":
        return DaskLoss(self, "validation") if self.n_validation else None

    def metric_sums(self, part: str, w: np.ndarray, b: float) -> list[dict[str, Any]]:
        return [p for p in self._map(_shard_metrics, part, w, b) if p is not None]

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

    def __init__(self, data: DaskData, part: str) -> None:
        self._data = data
        self._part = part

    @property
    def n_features(self) -> int:
        return self._data.plan.n_terms

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def weight_sum(self) -> float:
        return self._data.weight_sums[self._part]

    def _sums(self, w: np.ndarray, b: float, hessian: bool = False) -> PartialSums:
        # Shard order, whatever order the workers finished in: reproducible bits.
        sums = PartialSums()
        for part in self._data._map(_shard_sums, self._part, w, float(b), hessian):
            if part is not None:
                sums.add(part)
        return sums

    def __call__(self, w: np.ndarray, b: float, l2: float = 0.0) -> tuple[float, np.ndarray, float]:
        return self._sums(w, b).loss(w, l2, self.weight_sum, self.dtype)

    def hessian(
        self, w: np.ndarray, b: float, l2: float = 0.0
    ) -> tuple[float, np.ndarray, float, np.ndarray]:
        return self._sums(w, b, hessian=True).hessian(w, l2, self.weight_sum, self.dtype)

    def close(self) -> None:
        """Nothing to release here: the shards belong to the data."""


def open_dask(
    plan: InputPlan,
    validation: InputPlan | None,
    prep: PlanSettings,
    *,
    address: str | None = None,
    n_workers: int = 2,
    client: Any = None,
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
        pieces = pieces_of(plan, validation, prep.validation_fraction, row_group_pieces)
        shares = split_pieces(pieces, len(workers))
        workers = workers[: len(shares)]

        def on(worker: str, function: Any, *args: Any) -> Any:
            return client.submit(function, *args, workers=[worker], pure=False)

        summaries = client.gather(
            [on(w, _summarize_shard, own, prep) for w, own in zip(workers, shares, strict=True)]
        )
        # Shard order: the same plan every run.
        feature_plan, train, held_out = learn(
            prep, [s[0] for s in summaries], [s[1] for s in summaries]
        )
        shards = [
            on(worker, _build_shard, own, feature_plan, prep)
            for worker, own in zip(workers, shares, strict=True)
        ]
        client.gather(shards)  # errors surface here, not in the first iteration
        sums = client.gather(
            [on(w, _shard_weight_sums, s) for w, s in zip(workers, shards, strict=True)]
        )
        weight_sums = {
            part: math.fsum(s.get(part, 0.0) for s in sums) for part in ("train", "validation")
        }
        files = plan.files + (() if validation is None else validation.files)
        return DaskData(
            plan=feature_plan,
            files=plan.files,
            validation_files=() if validation is None else validation.files,
            fingerprint=fingerprint(files),
            n_examples=train.rows,
            n_validation=held_out.rows,
            weight_sums=weight_sums,
            dtype=np.dtype(prep.dtype),
            client=client,
            shards=shards,
            workers=workers,
            owned=owned,
        )
    except BaseException:
        for thing in owned:
            thing.close()
        raise

"""Where training data lives: in memory, streamed from an on-disk cache, or sharded over Dask.

Every backend implements :class:`TrainingData`: the flows never ask which one
they have. All of them read their rows through the same two passes
(:mod:`flows.backends.passes`: summaries, then the feature plan applied per
batch) and hand the solvers a :class:`lr_kernel.LossFunction` whose sums over
examples split exactly across blocks and shards, so the parameters do not
depend on where the sums ran (beyond float rounding).
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Protocol

import numpy as np

from flows.config import TrainConfig
from flows.dataset import InputPlan, count_rows
from flows.errors import LrflowError
from flows.features import FeaturePlan
from flows.threads import available_cores
from lr_kernel import GridFitResult, LossFunction, Optimizer
from lr_kernel.loss import SecondOrderLoss, hessian_from_sums, loss_from_sums

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30; a plain number is bytes."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not found or found.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 2GiB, 1000000)")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def default_memory_budget() -> int:
    """Half of the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class Grid:
    """The candidates of a search (every ``l2`` times every learning rate) and their fit."""

    l2: tuple[float, ...]
    learning_rate: tuple[float, ...] | None  # None: lbfgs picks its own steps
    iterations: int
    tol: float
    optimizer: Optimizer
    n_threads: int = 1


class TrainingData(Protocol):
    """A run's training (and held-out) rows, wherever they live.

    ``n_examples`` counts the training rows, ``n_validation`` the held-out ones
    (0 without validation). Parameters are on the plan's scale (standardized
    terms standardized).
    """

    @property
    def backend(self) -> str: ...
    @property
    def plan(self) -> FeaturePlan: ...
    @property
    def files(self) -> tuple[PurePath, ...]: ...
    @property
    def validation_files(self) -> tuple[PurePath, ...]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def n_examples(self) -> int: ...
    @property
    def n_validation(self) -> int: ...

    def loss(self, n_threads: int = 1, engine: str = "auto") -> LossFunction:
        """The training rows' cost and gradients."""
        ...

    def validation_loss(self) -> LossFunction | None:
        """The held-out rows' cost (call with ``l2=0``: their mean log-loss), or None."""
        ...

    def metrics(self, w: np.ndarray, b: float) -> dict[str, dict[str, float]]:
        """Every contracted metric on ``train`` and, with validation, ``validation``."""
        ...

    def fit_candidates(self, grid: Grid) -> GridFitResult:
        """Every candidate of ``grid`` fitted on the training rows."""
        ...

    def stable_learning_rate(self, l2: float) -> float:
        """A gradient-descent step that lowers the cost at every update (``1/L``)."""
        ...

    def kernel_setting(self, threads: int, engine: str) -> tuple[int, str]:
        """The kernel's threads and engine for this data (``auto`` resolved where it can be)."""
        ...

    def validation_log_loss(self, w: np.ndarray, b: float) -> float | None:
        """``metrics(w, b)["validation"]["log_loss"]`` by the same pass over the held-out
        rows alone (None without them): how the store compares models
        (:class:`flows.store.HeldOut`)."""
        ...

    def close(self) -> None:
        """Release what the data holds (a cluster, a cache asked to be cleaned up)."""
        ...


def in_memory_bytes(plan: InputPlan, n_rows: int, dtype: str) -> int:
    """What the in-memory path holds at its peak: ``X``, ``Y`` and the weights, one batch
    being read, and the block that fills ``X``'s tiles, counted whether or not the
    run gets tiles (that depends on the optimizer and the engine, resolved later).
    A conservative guess of the terms: categorical columns are counted at 8."""
    n = sum(8 if c.kind == "categorical" else 1 for c in plan.choice.columns)
    itemsize = 4 if dtype == "float32" else 8
    block = n * min(n_rows, plan.choice.batch_rows()) * itemsize  # (n, batch rows)
    return n_rows * (n + 2) * itemsize + (32 << 20) + block


def resolve_backend(config: TrainConfig, plan: InputPlan) -> str:
    """The backend a run uses: the configured one, or for ``auto`` memory if it fits the budget."""
    if config.backend != "auto":
        return config.backend
    if config.dask_address is not None:
        return "dask"
    budget = config.memory_budget or default_memory_budget()
    needed = in_memory_bytes(plan, count_rows(plan.files), config.dtype)
    return "memory" if needed <= budget else "stream"


def cache_root(config: TrainConfig) -> Path:
    """Where stream caches go: ``--cache-dir``, else ``$TMPDIR/lrflow-cache``."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    import tempfile

    return Path(tempfile.gettempdir()) / "lrflow-cache"


def requested_kernel(config: TrainConfig) -> tuple[int, str]:
    """The kernel's threads and engine as the run asks for them (threads: the available
    cores by default); each backend resolves them for its data
    (:meth:`TrainingData.kernel_setting`)."""
    return config.threads or available_cores(), config.engine


def open_training_data(
    config: TrainConfig, plan: InputPlan, validation: InputPlan | None = None
) -> TrainingData:
    """The run's training data on the backend ``config`` asks for (``auto`` resolved).

    The one place that chooses a backend: everything after it goes through
    :class:`TrainingData`.
    """
    from flows.backends.passes import settings_of

    backend = resolve_backend(config, plan)
    prep = settings_of(config, plan)
    if backend == "memory":
        from flows.backends.memory import open_memory

        threads, engine = requested_kernel(config)
        return open_memory(
            plan,
            validation,
            prep,
            threads=threads,
            engine=engine,
            optimizer=config.optimizer,
            iterations=config.iterations,
        )
    if backend == "stream":
        from flows.backends.stream import open_stream

        return open_stream(
            plan,
            validation,
            prep,
            cache_root=cache_root(config),
            memory_budget=config.memory_budget or default_memory_budget(),
            cleanup=config.cleanup_cache,
        )
    if backend == "dask":
        try:
            from flows.backends.dask_backend import open_dask
        except ImportError:
            raise LrflowError(
                "the dask backend needs dask.distributed: pip install 'lrflow[dask]'"
            ) from None
        return open_dask(
            plan, validation, prep, address=config.dask_address, n_workers=config.dask_workers
        )
    raise ValueError(f"no backend {backend!r}")


class ClosableLoss(SecondOrderLoss, Protocol):
    @property
    def weight_sum(self) -> float: ...
    def close(self) -> None: ...


class PartialSums:
    """The partial sums of pieces (chunks, shards), added in the order they come, then
    finished by the kernel's one normalization (``loss_from_sums``, ``hessian_from_sums``).

    Each piece's arrays are added at once: a piece's loss may reuse its buffers.
    """

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._dbs: list[float] = []
        self._dw: np.ndarray | None = None
        self._H: np.ndarray | None = None

    def add(self, part: tuple[Any, ...]) -> None:
        """``(loss_sum, dw_sum, db_sum)`` or, with the Hessian, ``(..., H_sum)``."""
        self._losses.append(float(part[0]))
        self._dbs.append(float(part[2]))
        self._dw = np.array(part[1], dtype=np.float64) if self._dw is None else self._dw + part[1]
        if len(part) == 4:
            self._H = np.array(part[3], dtype=np.float64) if self._H is None else self._H + part[3]

    def loss(
        self, w: np.ndarray, l2: float, weight_sum: float, dtype: np.dtype
    ) -> tuple[float, np.ndarray, float]:
        import math

        assert self._dw is not None, "no pieces were added"
        loss_sum, db_sum = math.fsum(self._losses), math.fsum(self._dbs)
        return loss_from_sums(loss_sum, self._dw, db_sum, w, l2, weight_sum, dtype)

    def hessian(
        self, w: np.ndarray, l2: float, weight_sum: float, dtype: np.dtype
    ) -> tuple[float, np.ndarray, float, np.ndarray]:
        assert self._H is not None, "no Hessian sums were added"
        cost, dw, db = self.loss(w, l2, weight_sum, dtype)
        return cost, dw, db, hessian_from_sums(self._H, l2, weight_sum)


def curvature_learning_rate(loss: SecondOrderLoss, l2: float, weight_sum: float) -> float:
    """``1/L`` from the Hessian at ``w = 0, b = 0``, the same on every backend.

    There ``a (1 - a) = 1/4`` for every row, so ``H(0) = G/4`` with ``G`` the
    weighted Gram matrix of ``[X; 1]``, and ``L = λ_max(G)/4 + l2/Σs`` bounds the
    curvature of ``J`` everywhere (``lr_kernel.stepsize``): gradient descent with
    ``1/L`` lowers the cost at every update. One pass over the data, exact.
    """
    n = loss.n_features
    H = loss.hessian(np.zeros((n, 1), dtype=loss.dtype), 0.0, 0.0)[3]  # (n + 1, n + 1)
    return 1.0 / (float(np.linalg.eigvalsh(H)[-1]) + l2 / weight_sum)


@dataclass
class PiecewiseData:
    """What the stream and Dask backends share: their rows are in pieces (chunks, shards)
    that each return partial sums, so metrics merge from per-piece sums and a search
    fits its candidates one after another (no many-model pass over the pieces yet).

    ``weight_sums`` are ``Σ s`` of the ``train`` and ``validation`` rows (row counts
    when unweighted), which normalize the pieces' summed losses.
    """

    plan: FeaturePlan
    files: tuple[PurePath, ...]
    validation_files: tuple[PurePath, ...]
    fingerprint: str
    n_examples: int
    n_validation: int
    weight_sums: dict[str, float]
    dtype: np.dtype

    def loss(self, n_threads: int = 1, engine: str = "auto") -> ClosableLoss:
        raise NotImplementedError

    def metric_sums(self, part: str, w: np.ndarray, b: float) -> list[dict[str, Any]]:
        """:func:`flows.backends.partial_metrics.piece_sums` of each piece of ``part``."""
        raise NotImplementedError

    def metrics(self, w: np.ndarray, b: float) -> dict[str, dict[str, float]]:
        from flows.backends.partial_metrics import merge_metrics

        parts = ("train", "validation") if self.n_validation else ("train",)
        return {part: merge_metrics(self.metric_sums(part, w, b)) for part in parts}

    def validation_log_loss(self, w: np.ndarray, b: float) -> float | None:
        from flows.backends.partial_metrics import merge_metrics

        if not self.n_validation:
            return None
        return merge_metrics(self.metric_sums("validation", w, b))["log_loss"]

    def fit_candidates(self, grid: Grid) -> GridFitResult:
        """Each candidate fitted in turn, in :func:`lr_kernel.grid_candidates` order."""
        from lr_kernel import fit_loss, grid_candidates

        l2_values, rates = grid_candidates(list(grid.l2), grid.learning_rate)
        loss = self.loss(grid.n_threads)
        try:
            fits = [
                fit_loss(
                    loss,
                    learning_rate=None if np.isnan(rate) else float(rate),
                    iterations=grid.iterations,
                    l2=float(value),
                    tol=grid.tol,
                    optimizer=grid.optimizer,
                )
                for value, rate in zip(l2_values, rates, strict=True)
            ]
        finally:
            loss.close()
        return GridFitResult.from_fits(fits, l2_values, rates)

    def stable_learning_rate(self, l2: float) -> float:
        loss = self.loss()
        try:
            return curvature_learning_rate(loss, l2, loss.weight_sum)
        finally:
            loss.close()

    def kernel_setting(self, threads: int, engine: str) -> tuple[int, str]:
        return threads, "auto"  # one loss per chunk or shard, each choosing its engine


def plan_run(config: TrainConfig) -> tuple[InputPlan, InputPlan | None]:
    """The run's inputs from the footers: paths, schemas, column roles, the output's place."""
    from flows.dataset import check_output_location, plan_held_out, plan_inputs

    plan = plan_inputs(
        config.data, config.label, config.features, exclude=config.exclude, weight=config.weight
    )
    check_output_location(config.data, config.output)
    validation = None
    if config.validation_data is not None:
        validation = plan_held_out(config.validation_data, plan)
    return plan, validation


def check_values(config: TrainConfig) -> FeaturePlan:
    """Every check of the run's values, before anything slow starts: the first pass of the
    in-memory backend (bounded memory: one batch at a time, the next one read meanwhile),
    which learns the plan.

    Returns the plan the run will use; raises DataError for anything it cannot use.
    """
    from flows.backends.passes import learn, pieces_of, settings_of, summarize_pieces
    from flows.dataset import file_pieces

    plan, validation = plan_run(config)
    prep = settings_of(config, plan)
    pieces = pieces_of(plan, validation, prep.validation_fraction, file_pieces)
    summaries = summarize_pieces(pieces, prep, ahead=True)  # as open_memory's first pass
    return learn(prep, [s[0] for s in summaries], [s[1] for s in summaries])[0]

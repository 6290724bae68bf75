"""In memory: the whole matrix ``X`` (and the held-out rows' own) built batch by batch.

The training rows' ``X`` is held in the layout the run's fit reads fastest: as
tiles of examples (:class:`lr_kernel.tiles.TiledMatrix`) when the run will sum
it with the compiled engine (:func:`kernel_setting_over`, which also gives the
engine, so the two agree) and the fit is not Newton's (:func:`tiled_layout`),
else as the ``(n, m)`` C-contiguous ndarray.
"""

import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np

from flows.backends import Grid, curvature_learning_rate
from flows.backends.passes import learn, pieces_blocks, pieces_of, summarize_pieces
from flows.dataset import InputPlan, file_pieces, fingerprint
from flows.features import FeaturePlan, PlanSettings
from lr_kernel import FusedLoss, GridFitResult, default_block_size, fit_many
from lr_kernel.loss import resolve_engine
from lr_kernel.metrics import binary_metrics, log_loss
from lr_kernel.tiles import TiledMatrix
from lr_kernel.train import auto_optimizer


def weighted(weight: np.ndarray | None) -> dict[str, Any]:
    """The kernel's ``sample_weight`` argument, only when there are weights."""
    return {} if weight is None else {"sample_weight": weight}


@dataclass
class Rows:
    """Column-stacked rows: ``X`` ``(n_terms, m)``, ``Y`` and ``weight`` ``(1, m)`` (or None).

    ``X`` is an ndarray or, for the compiled engine, a :class:`TiledMatrix`:
    only its products (``w.T @ X``) and the kernel read it, never a dense copy.
    """

    X: np.ndarray | TiledMatrix = field(repr=False)
    Y: np.ndarray = field(repr=False)
    weight: np.ndarray | None = field(repr=False)

    @property
    def n_examples(self) -> int:
        return int(self.X.shape[1])

    def loss(self, **kernel: Any) -> FusedLoss:
        return FusedLoss(self.X, self.Y, **weighted(self.weight), **kernel)

    def metrics(self, w: np.ndarray, b: float) -> dict[str, float]:
        Z = w.T @ self.X + b  # (1, m), one pass for the metrics
        return binary_metrics(Z, self.Y, **weighted(self.weight))

    def log_loss(self, w: np.ndarray, b: float) -> float:
        """``metrics(w, b)["log_loss"]``, computed the same way, without the other metrics."""
        Z = w.T @ self.X + b  # (1, m)
        return log_loss(Z, self.Y.astype(np.float64, copy=False), **weighted(self.weight))


@dataclass
class MemoryData:
    """:class:`flows.backends.TrainingData` held in memory."""

    plan: FeaturePlan
    files: tuple[PurePath, ...]
    validation_files: tuple[PurePath, ...]
    fingerprint: str
    train: Rows
    held_out: Rows | None
    backend: str = "memory"

    @property
    def n_examples(self) -> int:
        return self.train.n_examples

    @property
    def n_validation(self) -> int:
        return 0 if self.held_out is None else self.held_out.n_examples

    def loss(self, n_threads: int = 1, engine: str = "auto") -> FusedLoss:
        return self.train.loss(n_threads=n_threads, engine=engine)

    def validation_loss(self) -> FusedLoss | None:
        return None if self.held_out is None else self.held_out.loss()

    def metrics(self, w: np.ndarray, b: float) -> dict[str, dict[str, float]]:
        metrics = {"train": self.train.metrics(w, b)}
        if self.held_out is not None:
            metrics["validation"] = self.held_out.metrics(w, b)
        return metrics

    def validation_log_loss(self, w: np.ndarray, b: float) -> float | None:
        return None if self.held_out is None else self.held_out.log_loss(w, b)

    def fit_candidates(self, grid: Grid) -> GridFitResult:
        """All candidates together: one pass over ``X`` per iteration for all of them."""
        return fit_many(
            self.train.X,
            self.train.Y,
            l2=list(grid.l2),
            learning_rate=None if grid.learning_rate is None else list(grid.learning_rate),
            iterations=grid.iterations,
            tol=grid.tol,
            optimizer=grid.optimizer,
            n_threads=grid.n_threads,
            **weighted(self.train.weight),
        )

    def stable_learning_rate(self, l2: float) -> float:
        loss = self.loss()
        return curvature_learning_rate(loss, l2, loss.weight_sum)

    def kernel_setting(self, threads: int, engine: str) -> tuple[int, str]:
        return kernel_setting_over(self.train.X, threads, engine)

    def close(self) -> None:
        """Nothing to release: the arrays go with the object."""


def kernel_setting_over(X: np.ndarray | TiledMatrix, threads: int, engine: str) -> tuple[int, str]:
    """The kernel's threads and engine over the training rows' ``X`` ``(n, m)``.

    The one rule for the in-memory backend: :meth:`MemoryData.kernel_setting`
    and the layout :func:`open_memory` gives ``X`` (tiles where this says
    ``"numba"``). It depends on ``X``'s shape and dtype alone, so ``X`` in
    either layout gets the same answer.
    """
    n, m = X.shape
    if m <= default_block_size(n, X.dtype):
        threads = 1  # one block of examples: nothing to share between threads
    return threads, resolve_engine(engine, X, threads)


# A first-order fit of at least this many iterations (``gd``, ``nesterov``) gets
# its tiles in huge pages: ~0.8 s more to fill per 0.8 GB, 1-4 ms less per pass.
HUGE_PAGES_MIN_PASSES = 250


def tiled_layout(optimizer: str, iterations: int, n_terms: int) -> tuple[bool, bool]:
    """Whether the training rows' ``X`` goes in tiles where the compiled engine runs,
    and whether in huge pages: the layout follows the passes the fit makes.

    Newton (``optimizer``, or ``"auto"`` over at most ``NEWTON_MAX_FEATURES``
    terms) makes a Hessian pass per iteration, which over tiles took 1.03-1.07x
    (float64) and 1.11-1.16x (float32) the time of one over columns: it keeps
    the columns. Other fits make loss passes, 1.15-1.2x faster over tiles; ``gd``
    and ``nesterov`` of at least :data:`HUGE_PAGES_MIN_PASSES` iterations get
    huge pages (:func:`huge_pages_empty`).
    """
    fit = auto_optimizer(n_terms) if optimizer == "auto" else optimizer
    if fit == "newton":
        return False, False
    return True, fit in ("gd", "nesterov") and iterations >= HUGE_PAGES_MIN_PASSES


def small_pages_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` in ordinary 4 KiB pages, not transparent huge pages.

    NumPy asks for huge pages (``madvise(MADV_HUGEPAGE)``) on large arrays. On
    this project's virtual machines (KVM, a memory balloon) the first touch of
    fresh huge pages measured 2.9-3.5 s of kernel time per 1.12 GB, against
    0.4-0.7 s in 4 KiB pages; that first touch was most of ``open_memory``'s
    time. The kernel pays for it on every pass: at 1M x 100 float64 on 2
    threads, a loss pass over such an ``X`` took 1.07x and 1.16x the time of
    one over NumPy's own allocation (pairwise medians of 21 and 15 rounds),
    ~3-6 ms a pass against ~2 s saved per GB: the default Newton fit (tens of
    passes) gains, a 1,000-iteration ``gd`` fit at that size loses. (Whether
    NumPy's allocation was in huge pages at all, ``/proc/self/smaps`` did not
    show: ``AnonHugePages`` read 0 for both.)
    """
    return _anonymous_empty(shape, dtype, "MADV_NOHUGEPAGE")


def huge_pages_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` in transparent huge pages (2 MiB), where the system allows.

    For the tiles of a fit that makes many passes: the compiled engine's pass
    over tiles in 4 KiB pages took 1.15x (float64) and 1.14x (float32) the
    time of one over huge pages at 1M x 100 (22.9 against 26.5 ms, 15.4
    against 17.6 ms, pairwise medians of 21 rounds, 2026-12-02), but only
    1.05x and 1.03x in a later A/B of 31 rounds with the order rotated: a TLB
    miss every 4 KiB of the stream, worth 1-4 ms a pass. The first touch cost
    1.0-1.3 s per 0.8 GB against 0.32-0.44 s in 4 KiB pages, so huge pages pay
    from ~200-800 passes on
    (:data:`HUGE_PAGES_MIN_PASSES`).
    """
    return _anonymous_empty(shape, dtype, "MADV_HUGEPAGE")


def _anonymous_empty(shape: tuple[int, int], dtype: np.dtype, advice: str) -> np.ndarray:
    """An uninitialized array in its own anonymous mapping, advised ``mmap.<advice>``."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if not nbytes or not hasattr(mmap, advice):
        return np.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(getattr(mmap, advice))
    return np.frombuffer(pages, dtype=dtype).reshape(shape)  # the array keeps the pages


def open_memory(
    plan: InputPlan,
    validation: InputPlan | None,
    prep: PlanSettings,
    threads: int = 1,
    engine: str = "auto",
    optimizer: str = "auto",
    iterations: int = 0,
) -> MemoryData:
    """Two passes over the files: the summaries and the plan, then ``X`` filled batch by batch.

    The peak is the matrices plus about one batch: each block is written
    straight into its columns of ``X`` while the next batch is read (as a
    plain loop holds the last batch while it reads the next). ``threads`` and
    ``engine`` are the kernel's as the run asks for them: where they resolve
    to the compiled engine (:func:`kernel_setting_over`), the training rows'
    ``X`` is held as tiles, each block written into one reused scratch block
    and copied into its tiles: one block more at the peak, and a copy of
    ``X`` more in time (at 1M x 140 float64, pairwise medians: 1.04-1.06x the
    peak RSS of 1.6 GB, i.e. the ~0.09 GB block, and 1.12-1.16x the 2.1-2.3 s,
    ``benchmarks/features_bench.py``), for fits whose every pass reads ``X``
    faster; but not for a Newton fit (``optimizer`` and ``iterations`` are the
    run's), and in huge pages for a long first-order one: :func:`tiled_layout`.
    """
    files = plan.files + (() if validation is None else validation.files)
    # Hashing the files' bytes (~1 s per 400 MB) overlaps the two passes: hashlib
    # releases the GIL on large updates.
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrflow-fingerprint")
    digest = hashing.submit(fingerprint, files)
    hashing.shutdown(wait=False)
    pieces = pieces_of(plan, validation, prep.validation_fraction, file_pieces)
    # Each pass reads the next batch in a thread while it works on this one.
    summaries = summarize_pieces(pieces, prep, ahead=True)
    feature_plan, train, held_out = learn(
        prep, [s[0] for s in summaries], [s[1] for s in summaries]
    )
    sizes = {False: train.rows, True: held_out.rows}
    n, dtype = feature_plan.n_terms, np.dtype(prep.dtype)
    X = {part: small_pages_empty((n, size), dtype) for part, size in sizes.items()}  # (n, m)
    tiles: TiledMatrix | None = None
    tiled, huge = tiled_layout(optimizer, iterations, n)
    if tiled and kernel_setting_over(X[False], threads, engine)[1] == "numba":
        allocate = huge_pages_empty if huge else small_pages_empty
        tiles = TiledMatrix.empty(n, sizes[False], dtype, allocate=allocate)
        # X[False], of which no page was touched yet, gives way to the plan's scratch
        # block: a tile's columns are no (n, k) view, so each block is filled there,
        # then copied into its tiles (one batch, reused).
        X[False] = np.empty((n, min(prep.batch_rows(), sizes[False])), dtype)
    Y = {part: np.empty((1, size), dtype=dtype) for part, size in sizes.items()}  # (1, m)
    weight = (
        {part: np.empty((1, size)) for part, size in sizes.items()}
        if feature_plan.weighted
        else None
    )
    filled = {False: 0, True: 0}

    def target(is_held_out: bool, k: int) -> np.ndarray:
        if tiles is not None and not is_held_out:
            return X[False][:, :k]  # the scratch block
        start = filled[is_held_out]
        return X[is_held_out][:, start : start + k]

    for is_held_out, block in pieces_blocks(pieces, feature_plan, prep, target, ahead=True):
        start = filled[is_held_out]
        k = block.X.shape[1]
        if tiles is not None and not is_held_out:
            tiles.set_columns(start, block.X)
        assert block.Y is not None
        Y[is_held_out][:, start : start + k] = block.Y
        if weight is not None and block.weight is not None:
            weight[is_held_out][:, start : start + k] = block.weight
        filled[is_held_out] = start + k

    def rows(part: bool) -> Rows:
        matrix = tiles if tiles is not None and not part else X[part]
        return Rows(matrix, Y[part], None if weight is None else weight[part])

    return MemoryData(
        plan=feature_plan,
        files=plan.files,
        validation_files=() if validation is None else validation.files,
        fingerprint=digest.result(),
        train=rows(False),
        held_out=rows(True) if sizes[True] else None,
    )

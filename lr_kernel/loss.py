"""The cost and its gradients: a fused, cache-blocked pass over X, and the naive oracle."""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from lr_kernel.tiles import TiledMatrix

FloatArray = NDArray[np.floating]
T = TypeVar("T")

# Bytes of X in one column block. The block is read from memory once by the
# forward GEMV and again, from cache, by the gradient GEMV: it must fit the
# last-level cache with room to spare, yet be large enough that the ~15 NumPy
# calls per block cost little next to the block's arithmetic.
BLOCK_BYTES = 8 * 2**20
# Bounds on examples per block: below, Python overhead per call dominates;
# above, the three scratch vectors stop fitting in a core's L2 cache.
MIN_BLOCK = 1024
MAX_BLOCK = 32768

Engine = Literal["auto", "numpy", "numba"]
ENGINES: tuple[Engine, ...] = ("auto", "numpy", "numba")
# The compiled engine's blocks: about this much of X, to stay in a core's L2
# cache (1 MiB here) between the forward and the backward sweep.
COMPILED_BLOCK_BYTES = 2**20
# "auto" picks the compiled engine from this many elements of X (32 MiB of
# float64) up: below, importing numba and loading the compiled kernel (~0.7 s,
# once per process) costs more than it can save.
COMPILED_MIN_ELEMENTS = 2**22
# Examples per step of the Hessian pass, at most: its work per example is a
# GEMM of (n + 1)² multiply-adds, so short steps cost no speed, and keep the
# scaled copy of the block, (n + 1) x this, small and in cache.
HESSIAN_BLOCK = 4096
# How far ahead (bytes of X) the tiled engine prefetches: 8 tiles of 100
# float64 features; 4 measured slower (RESULTS.md, issue 14 run 6).
PREFETCH_BYTES = 1_228_800
# Runs of tiles a pass is cut into, whatever the threads (see BlockedPass._each_run):
# ~1 ms each at 1M x 100, and a compiled call apiece (~10 µs).
TILE_CHUNKS = 16


def sigmoid(Z: FloatArray) -> FloatArray:
    """Logistic function ``1 / (1 + exp(-Z))``, elementwise, without overflow.

    Parameters
    ----------
    Z : ndarray of any shape

    Returns
    -------
    A : ndarray of ``Z``'s shape and dtype, in ``[0, 1]``.
    """
    # exp(-|Z|) lies in (0, 1], so neither branch can overflow.
    E = np.exp(-np.abs(Z))
    return np.where(Z >= 0, 1.0, E) / (1.0 + E)


def loss_and_gradients_naive(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    l2: float = 0.0,
) -> tuple[float, FloatArray, float]:
    """The seeds' vectorized formula, whole-array: the oracle and benchmark baseline.

    Reads ``X`` twice and allocates several ``(1, m)`` temporaries; prefer
    :func:`loss_and_gradients`. Same arguments and results.
    """
    m = X.shape[1]
    Z = w.T @ X + b  # (1, m)
    # log-loss per example is softplus(Z) - Y*Z, and
    # softplus(Z) = max(Z, 0) + log1p(exp(-|Z|)): finite for any Z, never log(0).
    E = np.exp(-np.abs(Z))  # (1, m)
    A = np.where(Z >= 0, 1.0, E) / (1.0 + E)  # (1, m), sigmoid(Z) from the same exp
    losses = np.maximum(Z, 0.0) + np.log1p(E) - Y * Z  # (1, m)
    penalty = 0.5 * l2 * float(np.dot(w.ravel(), w.ravel()))
    cost = (float(np.sum(losses, dtype=np.float64)) + penalty) / m
    dZ = A - Y  # (1, m)
    dw = (X @ dZ.T) / m  # (n, 1), one GEMV over X
    if l2:
        dw += (l2 / m) * w
    db = float(np.sum(dZ, dtype=np.float64)) / m
    return cost, dw.astype(X.dtype, copy=False), db


class LossFunction(Protocol):
    """What a solver calls: the cost and its gradients at ``(w, b)``.

    The seam between solvers and data: the in-memory :class:`FusedLoss` is one
    implementation; any source of ``X`` that returns the same three values
    plugs into :func:`lr_kernel.fit`'s solvers unchanged.
    """

    @property
    def n_features(self) -> int: ...

    @property
    def dtype(self) -> np.dtype[np.floating]: ...

    def __call__(
        self, w: FloatArray, b: float, l2: float = 0.0
    ) -> tuple[float, FloatArray, float]: ...


@runtime_checkable
class SecondOrderLoss(LossFunction, Protocol):
    """A :class:`LossFunction` that also gives the Hessian: what ``"newton"`` needs.

    A streamed or sharded loss provides it by adding the pieces'
    :meth:`FusedLoss.hessian_sums` and finishing with :func:`loss_from_sums`
    and :func:`hessian_from_sums`, as :meth:`FusedLoss.hessian` does.
    """

    def hessian(
        self, w: FloatArray, b: float, l2: float = 0.0
    ) -> tuple[float, FloatArray, float, NDArray[np.float64]]:
        """``(cost, dw, db, H)``: :meth:`__call__`'s values and ``H`` of shape
        ``(n_features + 1, n_features + 1)``, float64, intercept last."""
        ...


def default_block_size(n_features: int, dtype: np.dtype[np.floating]) -> int:
    """Examples per column block: about ``BLOCK_BYTES`` of ``X``, a multiple of 256."""
    examples = BLOCK_BYTES // max(1, n_features * dtype.itemsize)
    return int(min(MAX_BLOCK, max(MIN_BLOCK, examples // 256 * 256)))


def compiled_block_size(n_features: int, dtype: np.dtype[np.floating]) -> int:
    """Examples per block of the compiled engine: ~``COMPILED_BLOCK_BYTES`` of ``X``."""
    examples = COMPILED_BLOCK_BYTES // max(1, n_features * dtype.itemsize)
    return int(min(16384, max(256, examples // 64 * 64)))


def compiled_engine_available() -> bool:
    """Whether numba is installed, so that ``engine="numba"`` can run."""
    return importlib.util.find_spec("numba") is not None


def resolve_engine(
    engine: str, X: FloatArray | TiledMatrix, n_threads: int
) -> Literal["numpy", "numba"]:
    """The engine ``"auto"`` stands for, given the data and the threads.

    ``"auto"`` is ``"numba"`` when it is installed, ``n_threads > 1`` (one
    thread gains little from it: see ``benchmarks/RESULTS.md``), ``X`` is
    C-contiguous and has at least ``COMPILED_MIN_ELEMENTS`` elements; else
    ``"numpy"``. An explicit ``"numba"`` without numba installed is an error.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "numba":
        if not compiled_engine_available():
            raise ValueError("engine='numba' needs numba installed (pip install numba)")
        return "numba"
    if (
        engine == "auto"
        and n_threads > 1
        and (isinstance(X, TiledMatrix) or X.flags.c_contiguous)
        and X.size >= COMPILED_MIN_ELEMENTS
        and compiled_engine_available()
    ):
        return "numba"
    return "numpy"


def check_sample_weight(
    sample_weight: FloatArray | None, n_examples: int, dtype: np.dtype[np.floating]
) -> FloatArray | None:
    """Row weights as the passes use them: ``(n_examples,)`` in ``dtype``, or None.

    Parameters
    ----------
    sample_weight : ndarray of shape (1, n_examples), optional
        Finite and >= 0; float64 or ``dtype``.
    n_examples : int
    dtype : the data's dtype.

    Raises
    ------
    ValueError
        On a wrong shape, a non-float dtype, a negative or non-finite weight,
        or weights that sum to 0.
    """
    if sample_weight is None:
        return None
    s = np.asarray(sample_weight)
    if s.shape != (1, n_examples):
        raise ValueError(f"sample_weight must have shape (1, {n_examples}), got {s.shape}")
    if s.dtype not in (np.float64, dtype):
        raise ValueError(f"sample_weight must be float64 or {dtype}, got {s.dtype}")
    s = np.ascontiguousarray(s.reshape(n_examples), dtype=dtype)  # (m,)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("sample_weight must be finite and >= 0")
    if not np.any(s > 0):
        raise ValueError("sample_weight must have a positive entry")
    return s


class BlockedPass:
    """What every blocked pass over ``X`` shares: checked inputs, blocks, thread shares.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples), float32 or float64
    Y : ndarray of shape (1, n_examples)
    block_size : int or None
        Examples per block (capped at ``n_examples``); None: ``default_block(n, dtype)``.
    n_threads : int
        Threads wanted; no more than there are blocks get a share.
    default_block : callable ``(n_features, dtype) -> int``
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s``: finite, >= 0, float64 or ``X``'s dtype. Kept in
        ``X``'s dtype as ``self.s`` of shape ``(n_examples,)``; None (every
        weight 1) keeps ``self.s`` None, so the unweighted passes are unchanged.

    Each thread's share is a contiguous run of block starts, the same at every
    call, so the partial sums are always added in the same order.
    """

    def __init__(
        self,
        X: FloatArray | TiledMatrix,
        Y: FloatArray,
        block_size: int | None,
        n_threads: int,
        default_block: Callable[[int, np.dtype[np.floating]], int],
        sample_weight: FloatArray | None = None,
    ) -> None:
        n, m = X.shape
        if X.dtype not in (np.float32, np.float64):
            raise ValueError(f"X must be float32 or float64, got {X.dtype}")
        if Y.shape != (1, m):
            raise ValueError(f"Y must have shape (1, {m}), got {Y.shape}")
        if m < 1:
            raise ValueError("X must have at least one example")
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        block = default_block(n, X.dtype) if block_size is None else int(block_size)
        if block < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.X = X
        self.y = np.ascontiguousarray(Y.reshape(m), dtype=X.dtype)  # (m,), a view when possible
        self.s = check_sample_weight(sample_weight, m, X.dtype)  # (m,) or None
        # Σ s, summed once in float64 from the weights as the passes use them.
        self._weight_sum = float(m) if self.s is None else math.fsum(self.s.tolist())
        self.block_size = min(block, m)
        starts = list(range(0, m, self.block_size))
        n_threads = min(n_threads, len(starts))
        per_thread = -(-len(starts) // n_threads)
        self._shares = [starts[k : k + per_thread] for k in range(0, len(starts), per_thread)]
        # exp(U) must stay finite, and so must 1 / (1 + exp(U)) stay a normal
        # number: cap U ten below log(max float). Capped examples get their
        # exact loss back through a correction term.
        self._u_cap = float(np.log(np.finfo(X.dtype).max)) - 10.0
        self._pool: ThreadPoolExecutor | None = None  # started on the first threaded call

    def _map_shares(self, run: Callable[[int], T]) -> list[T]:
        """``run(k)`` for every share ``k``, in share order.

        Share 0 runs on the caller's thread, the others on this pass's own
        threads, kept from call to call (starting threads each call costs
        ~0.1 ms apiece). A worker's exception is raised here, after every share
        has finished: none is still writing its scratch when this returns.
        """
        if len(self._shares) == 1:
            return [run(0)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=len(self._shares) - 1, thread_name_prefix="lr_kernel"
            )
        futures = [self._pool.submit(run, k) for k in range(1, len(self._shares))]
        try:
            first = run(0)
        finally:
            wait(futures)
        return [first, *(future.result() for future in futures)]

    @staticmethod
    def _tile_runs(n_tiles: int) -> list[tuple[int, int]]:
        """Tiles ``[t0, t1)`` of each of ``TILE_CHUNKS`` runs (fewer for fewer tiles),
        fixed by the data alone, not by the threads (see :meth:`_each_run`)."""
        n_runs = min(TILE_CHUNKS, n_tiles)
        return list(itertools.pairwise(n_tiles * c // n_runs for c in range(n_runs + 1)))

    def _each_run(self, n_runs: int, work: Callable[[int, int], None]) -> None:
        """``work(share, run)`` for every run, each taken by the next thread that comes free.

        A thread slowed by another process's load then costs the pass one run,
        not half of it. ``share`` names the thread's scratch; ``work`` keeps
        each run's sums apart, for the caller to add in run order: the same
        bits whatever the threads and their timing.
        """
        runs = itertools.count()  # next() is atomic under the GIL

        def take(share: int) -> None:
            while (run := next(runs)) < n_runs:
                work(share, run)

        self._map_shares(take)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # threads do not travel; a copy starts its own
        return state

    @property
    def n_features(self) -> int:
        return int(self.X.shape[0])

    @property
    def weight_sum(self) -> float:
        """``Σ s_i``, the total weight (``n_examples`` when unweighted)."""
        return self._weight_sum

    @property
    def n_examples(self) -> int:
        return int(self.X.shape[1])

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self.X.dtype


class FusedLoss(BlockedPass):
    """Cost and gradients of the log-loss in one cache-blocked pass over ``X``.

    For each column block ``Xb`` of ``block_size`` examples, while it is in cache::

        U  = -(wᵀ Xb + b)                          one GEMV, reads Xb from memory
        J += Σ log(1 + exp(U)) - (1 - Y) U         = Σ softplus(Z) - Y Z
        dZ = 1 / (1 + exp(U)) - Y                  = sigmoid(Z) - Y
        dw += Xb dZᵀ,  db += Σ dZ                  one GEMV, reads Xb from cache

    so ``X`` is read from memory once per call, and the only memory touched
    besides ``X``, ``Y`` and the ``(n, 1)`` results is three scratch vectors of
    ``block_size`` per thread, allocated once here and reused by every call.

    Conventions are the package's: ``X`` is ``(n_features, n_examples)``,
    C-contiguous (or any layout with unit stride along examples), only read.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples), float32 or float64
    Y : ndarray of shape (1, n_examples), ``X``'s dtype, 0.0/1.0
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s`` (finite, >= 0; float64 or ``X``'s dtype). The sums
        become ``Σ s_i ℓ_i``, ``X (s ∘ (A - Y))ᵀ`` and ``Σ s_i (a_i - y_i)``, and
        the cost is normalized by :attr:`weight_sum` (``Σ s``). None: every
        weight 1, and the pass is the unweighted one, as fast as before.
    block_size : int, optional
        Examples per block; default :func:`default_block_size`. Results do not
        depend on it beyond float rounding.
    n_threads : int, default 1
        Python threads, each summing a fixed contiguous share of the blocks.
        With 1 the caller's thread does everything and the BLAS library
        parallelizes each GEMV itself. Use more only where BLAS is limited to
        one thread (e.g. ``threadpoolctl.threadpool_limits(1, "blas")``):
        threads that each call a multi-threaded BLAS oversubscribe the cores.
    engine : {"auto", "numpy", "numba"}, default "auto"
        How each thread sums its blocks. ``"numpy"``: the NumPy calls above.
        ``"numba"``: one compiled loop per thread (:mod:`lr_kernel._compiled`)
        over blocks of :func:`compiled_block_size`, without the GIL, with its
        own vectorized ``exp``/``log1p``; the same results to rounding, 1.4-1.7x
        faster than the best NumPy setting at 1M x 100 on 2 cores. ``"auto"``:
        see :func:`resolve_engine`. The chosen one is ``self.engine``.

    Notes
    -----
    One instance is scratch space for one caller at a time: do not call the
    same instance from two threads at once (separate instances are
    independent). Results are bitwise reproducible for a given ``block_size``
    and ``n_threads``: shares and the order of the partial sums are fixed.
    """

    def __init__(
        self,
        X: FloatArray | TiledMatrix,
        Y: FloatArray,
        *,
        sample_weight: FloatArray | None = None,
        block_size: int | None = None,
        n_threads: int = 1,
        engine: Engine = "auto",
    ) -> None:
        self.engine = resolve_engine(engine, X, n_threads)
        compiled = self.engine == "numba"
        # Over a TiledMatrix the compiled engine's block is a tile.
        self._tiled = compiled and isinstance(X, TiledMatrix)
        default_block = compiled_block_size if compiled else default_block_size
        if compiled and isinstance(X, TiledMatrix):
            lanes = 64 // X.dtype.itemsize
            if X.width not in (24 * lanes, 8 * lanes):
                raise ValueError(
                    f"the compiled engine reads tiles of 24 or 8 lines of {lanes} examples, "
                    f"not of {X.width}: make X with TiledMatrix.empty or from_array"
                )
            block_size = X.width
            self._tiles: FloatArray = X.tiles
        super().__init__(X, Y, block_size, n_threads, default_block, sample_weight)
        block, dtype = self.block_size, X.dtype
        # Per thread: the compiled engine's U/dZ and per-example losses, or the
        # NumPy engine's three block vectors and its GEMV output.
        self._compiled_share: Any = None
        # The Hessian pass's scratch per thread, made on its first call.
        self._hessian_scratch: dict[int, tuple[FloatArray, FloatArray, NDArray[np.float64]]] = {}
        # Unweighted compiled calls pass this, unread, where the weights would go.
        self._no_weights = np.ones(1, dtype)
        self._compiled_scratch: list[tuple[FloatArray, NDArray[np.float64]]] = []
        self._scratch: list[tuple[FloatArray, FloatArray, FloatArray]] = []
        self._gemv_out: list[FloatArray] = []
        if self._tiled:
            from lr_kernel._compiled import share_sums_tiled  # imports numba

            self._compiled_share = share_sums_tiled
            width = self._tiles.shape[2]  # a whole tile, even where m is less
            self._compiled_scratch = [
                (np.empty(width, dtype), np.empty(width, np.float64)) for _ in self._shares
            ]
            # Runs of tiles, which the threads take as they come free (_each_run).
            self._runs = self._tile_runs(self._tiles.shape[0])
            # Per run: (loss, Σ dZ), and a 64-byte line of float64 lane sums per row.
            self._run_totals = np.zeros((len(self._runs), 2))
            self._run_lanes = np.zeros((len(self._runs), self.n_features, 64 // dtype.itemsize))
            tile_bytes = self.n_features * width * dtype.itemsize
            self._ahead_tiles = max(1, PREFETCH_BYTES // tile_bytes)
        elif compiled:
            from lr_kernel._compiled import share_sums  # imports numba

            self._compiled_share = share_sums
            self._compiled_scratch = [
                (np.empty(block, dtype), np.empty(block, np.float64)) for _ in self._shares
            ]
        else:
            self._scratch = [
                (np.empty(block, dtype), np.empty(block, dtype), np.empty(block, dtype))
                for _ in self._shares
            ]
            self._gemv_out = [np.empty(self.n_features, dtype) for _ in self._shares]

    def __call__(self, w: FloatArray, b: float, l2: float = 0.0) -> tuple[float, FloatArray, float]:
        """Cost and gradients at ``(w, b)``; see :func:`loss_and_gradients`."""
        loss_sum, dw_sum, db_sum = self.partial_sums(w, b)
        return loss_from_sums(loss_sum, dw_sum, db_sum, w, l2, self.weight_sum, self.dtype)

    def partial_sums(self, w: FloatArray, b: float) -> tuple[float, NDArray[np.float64], float]:
        """The unnormalized, unpenalized sums over this ``X``: what shards add up.

        Returns
        -------
        loss_sum : float
            ``Σ_i s_i (softplus(z_i) - y_i z_i)``.
        dw_sum : ndarray of shape (n_features,), float64
            ``X dZᵀ`` with ``dZ = s ∘ (A - Y)``.
        db_sum : float
            ``Σ_i dz_i``.

        ``s_i`` is 1 without ``sample_weight``.

        Sums over disjoint column ranges of the data add up, in any grouping, to
        the sums over all of it (up to rounding); :func:`loss_from_sums` turns
        the totals into the cost and gradients.
        """
        neg_w = np.negative(w.reshape(-1), dtype=self.dtype)  # (n,), so the GEMV gives -Z
        if self._tiled:
            return self._tiled_sums(neg_w, float(b))
        partials = self._map_shares(lambda k: self._sum_blocks(k, neg_w, float(b)))
        # Summed in share order whatever the threads' timing: reproducible bits.
        loss_sum = math.fsum(p[0] for p in partials)
        dw_sum = partials[0][1].copy()
        for p in partials[1:]:
            dw_sum += p[1]
        db_sum = math.fsum(p[2] for p in partials)
        return loss_sum, dw_sum, db_sum

    def hessian(
        self, w: FloatArray, b: float, l2: float = 0.0
    ) -> tuple[float, FloatArray, float, NDArray[np.float64]]:
        """Cost, gradients and Hessian at ``(w, b)``, in one pass over ``X``.

        Returns
        -------
        cost, dw, db : as :meth:`__call__`
        H : ndarray of shape (n_features + 1, n_features + 1), float64
            ``([X; 1] diag(s a (1 - a)) [X; 1]ᵀ + l2 diag(1, ..., 1, 0)) / Σs``,
            the intercept last (:func:`hessian_from_sums`).
        """
        loss_sum, dw_sum, db_sum, H_sum = self.hessian_sums(w, b)
        cost, dw, db = loss_from_sums(loss_sum, dw_sum, db_sum, w, l2, self.weight_sum, self.dtype)
        return cost, dw, db, hessian_from_sums(H_sum, l2, self.weight_sum)

    def hessian_sums(
        self, w: FloatArray, b: float
    ) -> tuple[float, NDArray[np.float64], float, NDArray[np.float64]]:
        """:meth:`partial_sums` and the Hessian's sum, in the same blocked pass.

        Per block ``Xb`` (``k`` examples), while it is in cache, after the
        gradient's work: ``c = s a (1 - a)`` (``k``), then one GEMM
        ``[Xb; 1] diag(c) [Xb; 1]ᵀ`` as ``Bᵀ B``-shaped product of the scaled
        block ``B = [Xb; 1] diag(√c)``, added in float64. That product costs
        ``(n + 1)² k`` multiply-adds against the gradient's ``2 n k``: see
        ``lr_kernel.train.NEWTON_MAX_FEATURES`` for when it pays.

        Returns
        -------
        loss_sum, dw_sum, db_sum : as :meth:`partial_sums`
        H_sum : ndarray of shape (n_features + 1, n_features + 1), float64
            ``Σ_i s_i a_i (1 - a_i) [x_i; 1][x_i; 1]ᵀ``, the intercept last.
            Sums over disjoint pieces of the data add up to the whole's.
        """
        neg_w = np.negative(w.reshape(-1), dtype=self.dtype)  # (n,)
        partials = self._map_shares(lambda k: self._hessian_blocks(k, neg_w, float(b)))
        loss_sum = math.fsum(p[0] for p in partials)
        db_sum = math.fsum(p[2] for p in partials)
        dw_sum = partials[0][1].copy()
        H_sum = partials[0][3].copy()
        for p in partials[1:]:  # share order: reproducible bits
            dw_sum += p[1]
            H_sum += p[3]
        return loss_sum, dw_sum, db_sum, H_sum

    def _hessian_blocks(
        self, share: int, neg_w: FloatArray, b: float
    ) -> tuple[float, NDArray[np.float64], float, NDArray[np.float64]]:
        """One thread's blocks of :meth:`hessian_sums`."""
        if self._tiled:
            return self._tiled_hessian_blocks(share, neg_w, b)
        X, n, dtype = self.X, self.n_features, self.dtype
        tiled = isinstance(X, TiledMatrix)  # NumPy engine: blocks copied out of the tiles
        step = HESSIAN_BLOCK if tiled else min(self.block_size, HESSIAN_BLOCK)
        if share not in self._hessian_scratch:
            # Per thread, kept from call to call: the scaled block [Xb; 1] diag(√c),
            # Z's buffer, per-example losses and the curvature.
            block = step
            self._hessian_scratch[share] = (
                np.empty((n + 1, block), dtype),
                np.empty(block, dtype),
                np.empty((4, block), np.float64),  # losses, curvature, Z, exp(-|Z|)
            )
        scaled, u_buffer, float_buffers = self._hessian_scratch[share]
        loss_buffer, curvature_buffer = float_buffers[0], float_buffers[1]
        compiled = None
        if self._compiled_share is not None:
            from lr_kernel._compiled import block_curvature

            compiled = block_curvature
        row_weights = self._no_weights if self.s is None else self.s
        loss_sum = 0.0
        db_sum = 0.0
        dw_sum = np.zeros(n, dtype=np.float64)  # (n,)
        H_sum = np.zeros((n + 1, n + 1), dtype=np.float64)
        m = self.n_examples
        share_stop = min(self._shares[share][-1] + self.block_size, m)
        for start in range(self._shares[share][0], share_stop, step):
            stop = min(start + step, share_stop)
            k = stop - start
            Xb = X[:, start:stop]  # (n, k): a view, or over tiles a copy
            curvature = curvature_buffer[:k]
            if compiled is not None:
                block_loss, block_db = compiled(
                    X, self.y, row_weights, self.s is not None, neg_w, b, start, stop,
                    u_buffer, loss_buffer, curvature, dw_sum,
                )  # fmt: skip
            else:
                block_loss, block_db = self._curvature_block(
                    Xb, start, stop, neg_w, b, u_buffer[:k], float_buffers[:, :k], dw_sum
                )
            loss_sum += block_loss
            db_sum += block_db
            B = scaled[:, :k]  # (n + 1, k)
            np.sqrt(curvature, out=curvature)
            np.multiply(Xb, curvature, out=B[:n], casting="same_kind")
            B[n] = curvature
            H_sum += B @ B.T  # (n + 1, n + 1): the block product, Xb still in cache
        return loss_sum, dw_sum, db_sum, H_sum

    def _tiled_hessian_blocks(
        self, share: int, neg_w: FloatArray, b: float
    ) -> tuple[float, NDArray[np.float64], float, NDArray[np.float64]]:
        """:meth:`_hessian_blocks` over tiles: per group of tiles (~1 MiB of ``X``),
        the compiled pass with the curvature, then the scaled block
        ``[Xb; 1] diag(√c)`` built from the tiles while they are in cache, and its
        product. No copy of ``X`` beyond that block."""
        from lr_kernel._compiled import scale_tiles, share_sums_tiled

        n, dtype, width = self.n_features, self.dtype, self._tiles.shape[2]
        # Tiles per block product: the scaled block ~1 MiB, in L2 for its GEMM.
        group = max(1, COMPILED_BLOCK_BYTES // ((n + 1) * width * dtype.itemsize))
        if share not in self._hessian_scratch:
            self._hessian_scratch[share] = (
                np.empty((n + 1, group * width), dtype),  # [Xb; 1] diag(√c)
                np.empty(width, dtype),  # a tile's U, then dZ
                np.empty((2, group * width), np.float64),  # a tile's losses; the curvature
            )
        scaled, u, float_buffers = self._hessian_scratch[share]
        losses, curvature = float_buffers[0, :width], float_buffers[1]
        lanes = np.zeros((n, 64 // dtype.itemsize))
        weights = self._no_weights if self.s is None else self.s
        H_sum = np.zeros((n + 1, n + 1), dtype=np.float64)
        loss_sum = 0.0
        db_sum = 0.0
        m = self.n_examples
        first, last = self._shares[share][0] // width, self._shares[share][-1] // width + 1
        for t0 in range(first, last, group):
            t1 = min(t0 + group, last)
            k = min(t1 * width, m) - t0 * width
            block_loss, block_db = share_sums_tiled(
                self._tiles, self.y, weights, self.s is not None, neg_w, b, t0, t1, m,
                self._ahead_tiles, u, losses, curvature, lanes,
            )  # fmt: skip
            loss_sum += block_loss
            db_sum += block_db
            root = np.sqrt(curvature[:k], out=curvature[:k])  # in place: no allocation
            B = scaled[:, :k]  # (n + 1, k)
            scale_tiles(self._tiles, t0, t1, m, root, B)
            B[n] = root
            H_sum += B @ B.T  # (n + 1, n + 1)
        return loss_sum, lanes.sum(axis=1), db_sum, H_sum

    def _curvature_block(
        self,
        Xb: FloatArray,
        start: int,
        stop: int,
        neg_w: FloatArray,
        b: float,
        u: FloatArray,
        buffers: NDArray[np.float64],
        dw_sum: NDArray[np.float64],
    ) -> tuple[float, float]:
        """NumPy engine: one block's loss and ``Σ dZ`` (returned), ``dw_sum += Xb dZᵀ``,
        and ``buffers[1] = s a (1 - a)``; in float64, in the caller's scratch
        ``buffers`` of shape ``(4, k)``."""
        losses, curvature, Z, E = buffers
        np.matmul(neg_w, Xb, out=u)  # (k,) = -wᵀ Xb
        np.negative(u, out=Z)
        Z += b
        yb = self.y[start:stop]
        np.abs(Z, out=E)
        np.negative(E, out=E)
        np.exp(E, out=E)  # exp(-|Z|), in (0, 1]
        np.log1p(E, out=losses)
        np.maximum(Z, 0.0, out=curvature)  # scratch here
        losses += curvature
        np.multiply(yb, Z, out=curvature)
        losses -= curvature  # softplus(Z) - Y Z
        np.greater_equal(Z, 0.0, out=Z, casting="unsafe")  # Z is not needed below
        np.maximum(Z, E, out=Z)  # 1 where Z >= 0, else exp(-|Z|) = exp(Z)
        np.add(E, 1.0, out=curvature)
        Z /= curvature  # sigmoid(Z)
        Z -= yb  # A - Y
        np.multiply(curvature, curvature, out=curvature)
        np.divide(E, curvature, out=curvature)  # a (1 - a) = e / (1 + e)², exact near 0 and 1
        if self.s is not None:
            sb = self.s[start:stop]
            losses *= sb
            Z *= sb
            curvature *= sb
        dw_sum += Xb @ Z.astype(self.dtype, copy=False)  # (n,), Xb still in cache
        return float(losses.sum()), float(Z.sum())

    def _tiled_sums(self, neg_w: FloatArray, b: float) -> tuple[float, NDArray[np.float64], float]:
        """:meth:`partial_sums` over tiles, by runs of tiles (:meth:`_each_run`)."""
        weights = self._no_weights if self.s is None else self.s

        def work(share: int, run: int) -> None:
            u, losses = self._compiled_scratch[share]
            lanes = self._run_lanes[run]
            lanes.fill(0.0)
            self._run_totals[run] = self._compiled_share(
                self._tiles, self.y, weights, self.s is not None, neg_w, b,
                *self._runs[run], self.n_examples, self._ahead_tiles, u, losses,
                losses[:0], lanes,
            )  # fmt: skip

        self._each_run(len(self._runs), work)
        loss_sum = math.fsum(self._run_totals[:, 0].tolist())
        db_sum = math.fsum(self._run_totals[:, 1].tolist())
        return loss_sum, self._run_lanes.sum(axis=(0, 2)), db_sum

    def _sum_blocks(
        self, share: int, neg_w: FloatArray, b: float
    ) -> tuple[float, NDArray[np.float64], float]:
        """Unnormalized loss, ``X dZᵀ`` and ``Σ dZ`` over one thread's blocks."""
        if self._compiled_share is not None:
            starts = self._shares[share]
            u, losses = self._compiled_scratch[share]
            dw = np.zeros(self.n_features, dtype=np.float64)
            stop = min(starts[-1] + self.block_size, self.n_examples)
            row_weights = self._no_weights if self.s is None else self.s
            loss, db = self._compiled_share(
                self.X,
                self.y,
                row_weights,
                self.s is not None,
                neg_w,
                b,
                starts[0],
                stop,
                self.block_size,
                u,
                losses,
                dw,
            )
            return float(loss), dw, float(db)
        X, y, cap = self.X, self.y, self._u_cap
        weights = self.s
        U, T, V = self._scratch[share]
        gemv_out = self._gemv_out[share]
        m = X.shape[1]
        loss_sum = 0.0
        db_sum = 0.0
        # float64 accumulators across blocks: float32 data loses no more than
        # one block's rounding.
        dw_sum = np.zeros(X.shape[0], dtype=np.float64)  # (n,)
        for start in self._shares[share]:
            stop = min(start + self.block_size, m)
            Xb = X[:, start:stop]  # (n, k) view, rows strided by m
            yb = y[start:stop]  # (k,)
            k = stop - start
            u, t, v = U[:k], T[:k], V[:k]
            np.matmul(neg_w, Xb, out=u)  # (k,) = -wᵀ Xb
            u -= b  # u = -Z
            # Per example loss is softplus(Z) - Y Z = log(1 + exp(u)) - (1 - Y) u.
            # The (1 - Y) u part is exact (0 or u), so the sum keeps rounding
            # error as small as the naive formula's.
            np.multiply(yb, u, out=t)
            t -= u  # t = -(1 - Y) u
            if u.max() > cap:  # rare: some Z below -cap, an extreme score
                # log(1 + exp(u)) = cap' + (u - cap) for u > cap, to rounding.
                np.subtract(u, cap, out=v)
                np.maximum(v, 0.0, out=v)
                if weights is not None:
                    v *= weights[start:stop]
                loss_sum += float(v.sum(dtype=np.float64))
                np.minimum(u, cap, out=u)
            np.exp(u, out=u)
            u += 1.0  # u = 1 + exp(-Z), in [1, 1 + exp(cap)]: log and 1/u are safe
            np.log(u, out=v)  # one log for the cost, never of 0
            t += v
            np.reciprocal(u, out=u)  # sigmoid(Z)
            u -= yb  # A - Y
            if weights is not None:
                # In place on the block's scratch: weighting costs no (n, m) array.
                sb = weights[start:stop]  # (k,)
                t *= sb
                u *= sb  # dZ = s ∘ (A - Y)
            loss_sum += float(t.sum(dtype=np.float64))
            db_sum += float(u.sum(dtype=np.float64))
            np.matmul(Xb, u, out=gemv_out)  # (n,), Xb is still in cache
            dw_sum += gemv_out
        return loss_sum, dw_sum, db_sum


def loss_from_sums(
    loss_sum: float,
    dw_sum: NDArray[np.float64],
    db_sum: float,
    w: FloatArray,
    l2: float,
    weight_sum: float,
    dtype: np.dtype[np.floating],
) -> tuple[float, FloatArray, float]:
    """Cost and gradients from the summed parts of :meth:`FusedLoss.partial_sums`.

    The one place the sums are normalized and penalized, so every source of
    data (in memory, streamed, sharded) finishes identically::

        J  = (Σ s ℓ + (l2/2) ||w||²) / Σs
        dw = (dw_sum + l2 w) / Σs,   db = db_sum / Σs

    Parameters
    ----------
    loss_sum, db_sum : float
        Totals over all examples.
    dw_sum : ndarray of shape (n_features,), float64
    w : ndarray of shape (n_features, 1)
    l2 : float
    weight_sum : float
        ``Σ s``, the total weight summed over (the number of examples ``m``
        when unweighted): :attr:`FusedLoss.weight_sum`, added over pieces.
    dtype : the data's dtype, that of the returned ``dw``.

    Returns
    -------
    cost, dw of shape (n_features, 1), db : as :func:`loss_and_gradients`.
    """
    m = float(weight_sum)
    w64 = w.reshape(-1, 1).astype(np.float64, copy=False)
    cost = (loss_sum + 0.5 * l2 * float(np.dot(w64.ravel(), w64.ravel()))) / m
    dw = dw_sum.reshape(-1, 1) / m  # (n, 1)
    if l2:
        dw += (l2 / m) * w64
    return cost, dw.astype(dtype, copy=False), db_sum / m


def hessian_from_sums(
    H_sum: NDArray[np.float64], l2: float, weight_sum: float
) -> NDArray[np.float64]:
    """The Hessian of ``J`` from the summed :meth:`FusedLoss.hessian_sums`.

    The one place the Hessian is normalized and penalized::

        H = (H_sum + l2 diag(1, ..., 1, 0)) / Σs

    (the intercept, last, is not penalized).

    Parameters
    ----------
    H_sum : ndarray of shape (n_features + 1, n_features + 1), float64
    l2 : float
    weight_sum : float
        ``Σ s`` (``m`` unweighted), as for :func:`loss_from_sums`.

    Returns
    -------
    H : ndarray of shape (n_features + 1, n_features + 1), float64, a new array.
    """
    H = np.array(H_sum, dtype=np.float64)  # (n + 1, n + 1), a copy
    n = H.shape[0] - 1
    H[np.arange(n), np.arange(n)] += l2
    H /= float(weight_sum)
    return H


def loss_and_gradients(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    l2: float = 0.0,
) -> tuple[float, FloatArray, float]:
    """Cost and its gradients at ``(w, b)``, fused: one pass over ``X``.

    A convenience over :class:`FusedLoss` that allocates its block scratch per
    call; a solver calling it repeatedly should build one :class:`FusedLoss`.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples)
        Column-stacked examples; only read.
    Y : ndarray of shape (1, n_examples)
        Labels, 0.0 or 1.0.
    w : ndarray of shape (n_features, 1)
    b : float
    l2 : float, default 0.0
        L2 penalty strength; the penalty is ``(l2 / (2m)) ||w||²``.

    Returns
    -------
    cost : float
        ``J(w, b)`` as a Python float (summed in float64 whatever ``X``'s dtype).
    dw : ndarray of shape (n_features, 1), ``X``'s dtype
        ``(1/m) X dZᵀ + (l2/m) w``.
    db : float
        ``(1/m) Σ dZ``.
    """
    return FusedLoss(X, Y)(w, b, l2)


def predict_proba(X: FloatArray, w: FloatArray, b: float) -> FloatArray:
    """Probability of the positive class for each example.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples)
    w : ndarray of shape (n_features, 1)
    b : float

    Returns
    -------
    A : ndarray of shape (1, n_examples)
    """
    return sigmoid(w.T @ X + b)

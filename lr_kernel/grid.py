"""Many models in one pass over X: K weight vectors as the columns of W, trained together."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lr_kernel.convergence import StopReason, StopRule, gradient_max
from lr_kernel.loss import (
    MAX_BLOCK,
    MIN_BLOCK,
    BlockedPass,
    Engine,
    FloatArray,
    resolve_engine,
)
from lr_kernel.tiles import TiledMatrix
from lr_kernel.train import OPTIMIZERS, SEARCHING, FitResult, Optimizer, fit

# Bytes of X in one block, half FusedLoss's: the second GEMM, which reads the
# block from cache, takes about as long as the first for K >= 8, so the block
# must survive longer in the cache next to its (K, block) scratch.
GRID_BLOCK_BYTES = 4 * 2**20
# Bytes of each (K, block) scratch matrix of one thread: the elementwise passes
# between the GEMMs walk it about eight times per block.
SCRATCH_BYTES = 2 * 2**20

# The compiled engine's blocks: about this much of X, so that the block and the
# next one, prefetched while this one is worked on, sit in a core's L2 (1 MiB
# here) ...
COMPILED_GRID_BLOCK_BYTES = 192 * 2**10
# ... and at most this many examples: a group's scores and losses (8 models x
# 240 examples x 16 bytes, 30 KiB) then stay in L1 through the element-wise
# step. A multiple of the forward tile's 24 examples.
COMPILED_GRID_MAX_BLOCK = 240
# Over a TiledMatrix the block is a tile, and the first group's forward product
# prefetches the tile this many tiles on. K = 8 takes longer per tile than the
# tile takes to arrive, so the next one suffices: 1M x 100 on 2 threads, 2 and
# 8 tiles were no faster (8: 1.1-1.2x slower).
COMPILED_GRID_AHEAD_TILES = 1

Values = float | Sequence[float] | NDArray[np.floating]


def grid_block_size(n_features: int, n_models: int, dtype: np.dtype[np.floating]) -> int:
    """Examples per block for ``n_models`` models: the smaller of X's and the scratch's bound."""
    by_x = GRID_BLOCK_BYTES // max(1, n_features * dtype.itemsize)
    by_scratch = SCRATCH_BYTES // max(1, n_models * dtype.itemsize)
    return int(min(MAX_BLOCK, max(MIN_BLOCK, min(by_x, by_scratch) // 256 * 256)))


def compiled_grid_block_size(n_features: int, dtype: np.dtype[np.floating]) -> int:
    """Examples per block of the compiled many-model engine: a multiple of 24, 24 to 240."""
    examples = COMPILED_GRID_BLOCK_BYTES // max(1, n_features * dtype.itemsize)
    return int(min(COMPILED_GRID_MAX_BLOCK, max(24, examples // 24 * 24)))


class FusedLossMany(BlockedPass):
    """Costs and gradients of ``K`` models in one cache-blocked pass over ``X``.

    :class:`~lr_kernel.FusedLoss` with the weight vector widened to a matrix.
    For each column block ``Xb`` of ``block_size`` examples, while it is in cache::

        U   = -(Wᵀ Xb + b)                     (K, k), one GEMM: reads Xb from memory
        J  += Σ_i log(1 + exp(U)) - U (1 - Y)ᵀ (K,)
        dZ  = 1 / (1 + exp(U)) - Y             (K, k) = sigmoid(Z) - Y
        dW += Xb dZᵀ,  db += Σ_i dZ            (n, K), one GEMM: reads Xb from cache

    so one call reads ``X`` from memory once for all ``K`` models: the GEMV of a
    single model, memory-bound, becomes a GEMM whose extra columns cost
    arithmetic, not memory traffic.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples), float32 or float64, or TiledMatrix
        Column-stacked, unit stride along examples, or in tiles
        (:class:`~lr_kernel.tiles.TiledMatrix`); only read.
    Y : ndarray of shape (1, n_examples), ``X``'s dtype, 0.0/1.0
    n_models : int
        Most models per call (``K``); a call may pass fewer (e.g. only the
        candidates still training). Sizes the scratch.
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights, as for :class:`~lr_kernel.FusedLoss`.
    block_size : int, optional
        Examples per block; default :func:`grid_block_size`.
    n_threads : int, default 1
        As for :class:`~lr_kernel.FusedLoss`: more than one only where BLAS is
        limited to one thread.
    engine : {"auto", "numpy", "numba"}, default "auto"
        ``"numpy"``: the two GEMMs per block above, with NumPy's element-wise
        calls between them. ``"numba"``: one compiled loop per thread
        (:func:`lr_kernel._compiled.share_sums_many`) over blocks of
        :func:`compiled_grid_block_size`: the models in groups of eight (two
        or four for ``K <= 2`` or ``<= 4``; one model runs the single-model
        loops), one per lane of a vector register;
        per block and group, ``U`` by tiles of 24 examples, the element-wise
        step (in float32 arithmetic for float32 ``X``), then ``Xb dZᵀ`` by
        tiles of 12 rows, while the next block is prefetched into L2. The last
        group is padded with zero models. ``X`` with other strides than unit
        along examples is copied once to C order. Over a
        :class:`~lr_kernel.tiles.TiledMatrix` the blocks are its tiles
        (:func:`lr_kernel._compiled.share_sums_many_tiled`, ``block_size`` is
        ignored), each read from memory once, with no copy, in runs of tiles
        that the threads take as they come free; float32 groups put 16
        examples of one model in a register's lanes there instead of the
        models. The NumPy engine copies each block out of the tiles
        (``X[:, a:b]``).
        ``"auto"``: as :func:`~lr_kernel.loss.resolve_engine` decides
        for one model. The chosen one is ``self.engine``.

    Notes
    -----
    One instance serves one caller at a time. Results are bitwise reproducible
    for a given ``engine``, ``block_size``, ``n_threads`` (over tiles, any
    number of threads) and set of models passed; they equal
    :class:`~lr_kernel.FusedLoss`'s per model up to float rounding (the
    products sum in another order; with float32 ``X`` the compiled engine's
    ``exp``, ``log1p`` and sigmoid are float32's).
    """

    def __init__(
        self,
        X: FloatArray | TiledMatrix,
        Y: FloatArray,
        *,
        n_models: int,
        sample_weight: FloatArray | None = None,
        block_size: int | None = None,
        n_threads: int = 1,
        engine: Engine = "auto",
    ) -> None:
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        self.engine = resolve_engine(engine, X, n_threads)
        compiled = self.engine == "numba"
        # Over a TiledMatrix the compiled engine's block is a tile.
        self._tiled = compiled and isinstance(X, TiledMatrix)
        if isinstance(X, TiledMatrix) and compiled:
            block_size = X.width
            self._tiles: FloatArray = X.tiles
        super().__init__(
            X,
            Y,
            block_size,
            n_threads,
            (lambda n, dtype: compiled_grid_block_size(n, dtype))
            if compiled
            else (lambda n, dtype: grid_block_size(n, n_models, dtype)),
            sample_weight,
        )
        self.n_models = n_models
        n, block = self.n_features, self.block_size
        if self._tiled:
            # A whole tile, even where X has fewer examples (the single-model
            # tile loop writes the padding's scores too).
            block = self._tiles.shape[2]
        self._compiled_share: Any = None
        self._lanes_for: Callable[[int], int] = lambda n_models: n_models
        self._compiled_scratch: list[
            tuple[FloatArray, NDArray[np.float64], FloatArray, FloatArray]
        ] = []
        self._scratch: list[tuple[FloatArray, ...]] = []
        if compiled:
            from lr_kernel._compiled import (  # imports numba
                LANES,
                lanes_for,
                share_sums_many,
                share_sums_many_tiled,
            )

            if self._tiled:
                self._compiled_share = share_sums_many_tiled
                self._ahead_tiles = COMPILED_GRID_AHEAD_TILES
                # Runs of tiles, which the threads take as they come free (_each_run).
                self._runs = self._tile_runs(self._tiles.shape[0])
            else:
                if isinstance(X, np.ndarray) and X.strides[1] != X.itemsize:
                    # The compiled tiles step through a row one element at a time.
                    self.X = np.ascontiguousarray(X)
                self._compiled_share = share_sums_many
            self._lanes_for = lanes_for
            # Per thread: scores then dZ, losses, Y and the row weights, each
            # example's value repeated for the LANES models of a group.
            self._compiled_scratch = [
                (
                    np.empty(block * LANES, X.dtype),
                    np.empty(block * LANES, np.float64),
                    np.empty(block * LANES, X.dtype),
                    np.empty(block * LANES if self.s is not None else 1, X.dtype),
                )
                for _ in self._shares
            ]
            # Unweighted calls pass this, unread, where the weights would go.
            self._no_weights = np.ones(1, X.dtype)
            return
        # Flat buffers: the first K * k elements reshape to a contiguous (K, k),
        # whatever K a call brings.
        self._scratch = [
            (
                np.empty(n_models * block, X.dtype),  # U, then dZ
                np.empty(n_models * block, X.dtype),  # log(1 + exp(U)), or U - cap
                np.empty(block, X.dtype),  # Y - 1 of the block
                np.empty(n * n_models, X.dtype),  # Xb dZᵀ
                np.empty(n_models, X.dtype),  # U (Y - 1)ᵀ
            )
            for _ in self._shares
        ]

    def __call__(
        self, W: FloatArray, b: FloatArray, l2: FloatArray
    ) -> tuple[NDArray[np.float64], FloatArray, NDArray[np.float64]]:
        """Costs and gradients of ``K <= n_models`` models.

        Parameters
        ----------
        W : ndarray of shape (n_features, K)
            Column ``k`` is model ``k``'s weights.
        b : ndarray of shape (K,)
            Intercepts.
        l2 : ndarray of shape (K,)
            Penalty strengths; model ``k``'s penalty is ``(l2[k] / (2 Σs)) ||W[:, k]||²``.

        Returns
        -------
        cost : ndarray of shape (K,), float64
        dW : ndarray of shape (n_features, K), ``X``'s dtype
            ``(X dZᵀ + l2 W) / Σs``.
        db : ndarray of shape (K,), float64
        """
        n = self.n_features
        K = W.shape[1]
        if W.shape[0] != n or not 1 <= K <= self.n_models:
            raise ValueError(f"W must have shape ({n}, K <= {self.n_models}), got {W.shape}")
        if self._compiled_share is None:
            neg_WT = np.ascontiguousarray(-W.T, dtype=self.dtype)  # (K, n)
            b_column = np.asarray(b, dtype=self.dtype).reshape(K, 1)  # (K, 1)
            partials = self._map_shares(lambda k: self._sum_blocks(k, neg_WT, b_column))
        else:
            # Groups of `lanes` models, -W and -b padded with zeros: (G, n, lanes), (G, lanes).
            lanes = self._lanes_for(K)
            groups = -(-K // lanes)
            neg_W = np.zeros((groups * lanes, n), dtype=self.dtype)
            neg_W[:K] = -W.T
            neg_W = np.ascontiguousarray(neg_W.reshape(groups, lanes, n).transpose(0, 2, 1))
            neg_b = np.zeros(groups * lanes, dtype=self.dtype)
            neg_b[:K] = -np.asarray(b, dtype=self.dtype).reshape(K)
            neg_b = neg_b.reshape(groups, lanes)
            if self._tiled:
                partials = [self._tiled_sums(neg_W, neg_b, K)]
            else:
                partials = self._map_shares(lambda k: self._compiled_blocks(k, neg_W, neg_b, K))
        # Summed in share order whatever the threads' timing: reproducible bits.
        loss_sum, dW_sum, db_sum = (p.copy() for p in partials[0])
        for p in partials[1:]:
            loss_sum += p[0]
            dW_sum += p[1]
            db_sum += p[2]
        W64 = W.astype(np.float64, copy=False)
        l2_64 = np.asarray(l2, dtype=np.float64).reshape(K)
        total = self.weight_sum  # Σ s, m when unweighted
        cost = (loss_sum + 0.5 * l2_64 * np.einsum("ij,ij->j", W64, W64)) / total  # (K,)
        dW = dW_sum / total + (l2_64 / total) * W64  # (n, K)
        return cost, dW.astype(self.dtype, copy=False), db_sum / total

    def _compiled_blocks(
        self, share: int, neg_W: FloatArray, neg_b: FloatArray, K: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """:meth:`_sum_blocks` by the compiled engine: one call for the whole share."""
        groups, n, lanes = neg_W.shape
        starts = self._shares[share]
        loss_sum = np.zeros((groups, lanes), dtype=np.float64)
        db_sum = np.zeros((groups, lanes), dtype=np.float64)
        dW_sum = np.zeros((groups, n, lanes), dtype=np.float64)
        weights = self._no_weights if self.s is None else self.s
        stop = min(starts[-1] + self.block_size, self.n_examples)
        self._compiled_share(
            self.X, self.y, weights, self.s is not None, neg_W, neg_b,
            starts[0], stop, self.block_size, *self._compiled_scratch[share],
            loss_sum, db_sum, dW_sum,
        )  # fmt: skip
        return self._by_model(loss_sum, dW_sum, db_sum, K)

    def _tiled_sums(
        self, neg_W: FloatArray, neg_b: FloatArray, K: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """:meth:`_compiled_blocks` over tiles, by runs of tiles (:meth:`_each_run`):
        each run's sums apart, then added in run order."""
        groups, n, lanes = neg_W.shape
        n_runs = len(self._runs)
        loss_sum = np.zeros((n_runs, groups, lanes), dtype=np.float64)
        db_sum = np.zeros((n_runs, groups, lanes), dtype=np.float64)
        dW_sum = np.zeros((n_runs, groups, n, lanes), dtype=np.float64)
        weights = self._no_weights if self.s is None else self.s

        def work(share: int, run: int) -> None:
            self._compiled_share(
                self._tiles, self.y, weights, self.s is not None, neg_W, neg_b,
                *self._runs[run], self.n_examples, self._ahead_tiles,
                *self._compiled_scratch[share], loss_sum[run], db_sum[run], dW_sum[run],
            )  # fmt: skip

        self._each_run(n_runs, work)
        return self._by_model(loss_sum.sum(axis=0), dW_sum.sum(axis=0), db_sum.sum(axis=0), K)

    @staticmethod
    def _by_model(
        loss_sum: NDArray[np.float64],
        dW_sum: NDArray[np.float64],
        db_sum: NDArray[np.float64],
        K: int,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Sums by group ``(G, lanes)``, ``(G, n, lanes)`` as ``(K,)``, ``(n, K)``, ``(K,)``."""
        groups, n, lanes = dW_sum.shape
        dW = dW_sum.transpose(1, 0, 2).reshape(n, groups * lanes)[:, :K]  # (n, K)
        return loss_sum.reshape(-1)[:K], dW, db_sum.reshape(-1)[:K]

    def _sum_blocks(
        self, share: int, neg_WT: FloatArray, b_column: FloatArray
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Unnormalized losses ``(K,)``, ``X dZᵀ`` ``(n, K)`` and ``Σ dZ`` ``(K,)`` of one share."""
        X, y, weights, cap = self.X, self.y, self.s, self._u_cap
        n, m = X.shape
        K = neg_WT.shape[0]
        U_flat, V_flat, y_minus_1, gemm_flat, linear = self._scratch[share]
        gemm_out = gemm_flat[: n * K].reshape(n, K)
        linear_out = linear[:K]
        loss_sum = np.zeros(K, dtype=np.float64)
        db_sum = np.zeros(K, dtype=np.float64)
        # float64 accumulators across blocks, as in FusedLoss.
        dW_sum = np.zeros((n, K), dtype=np.float64)
        for start in self._shares[share]:
            stop = min(start + self.block_size, m)
            k = stop - start
            Xb = X[:, start:stop]  # (n, k): a view, or over tiles a C-contiguous copy
            yb = y[start:stop]  # (k,)
            U = U_flat[: K * k].reshape(K, k)
            V = V_flat[: K * k].reshape(K, k)
            np.matmul(neg_WT, Xb, out=U)  # (K, k) = -Wᵀ Xb
            U -= b_column  # U = -Z
            # Per example, softplus(Z) - Y Z = log(1 + exp(U)) + (Y - 1) U. The
            # linear part summed over the block is one GEMV, U (Y - 1)ᵀ, instead of
            # three passes over (K, k).
            sb = None if weights is None else weights[start:stop]  # (k,)
            np.subtract(yb, 1.0, out=y_minus_1[:k])
            if sb is not None:
                y_minus_1[:k] *= sb  # s (Y - 1): the linear part's weights
            np.matmul(U, y_minus_1[:k], out=linear_out)  # (K,)
            loss_sum += linear_out
            if U.max() > cap:  # rare: some Z below -cap, an extreme score
                # log(1 + exp(u)) = cap' + (u - cap) for u > cap, to rounding.
                np.subtract(U, cap, out=V)
                np.maximum(V, 0.0, out=V)
                if sb is not None:
                    V *= sb
                loss_sum += V.sum(axis=1, dtype=np.float64)
                np.minimum(U, cap, out=U)
            np.exp(U, out=U)
            U += 1.0  # 1 + exp(-Z), in [1, 1 + exp(cap)]: log and 1/U are safe
            np.log(U, out=V)
            if sb is not None:
                V *= sb
            loss_sum += V.sum(axis=1, dtype=np.float64)
            np.reciprocal(U, out=U)  # sigmoid(Z)
            U -= yb  # A - Y, (K, k)
            if sb is not None:
                U *= sb  # dZ = s ∘ (A - Y), in place
            db_sum += U.sum(axis=1, dtype=np.float64)
            np.matmul(Xb, U.T, out=gemm_out)  # (n, K), Xb is still in cache
            dW_sum += gemm_out
        return loss_sum, dW_sum, db_sum


@dataclass(frozen=True)
class GridFitResult:
    """What :func:`fit_many` returns.

    Candidate ``k`` is column ``k`` of ``w``, as ``X`` stacks examples.

    Attributes
    ----------
    w : ndarray of shape (n_features, K)
        Final weights of each candidate.
    b : ndarray of shape (K,), float64
        Final intercepts.
    l2, learning_rate : ndarray of shape (K,), float64
        Each candidate's values (``learning_rate`` is NaN for the optimizers that
        search their own steps: ``"lbfgs"``, ``"newton"``, ``"auto"``).
    cost_history, gradient_norm_history : tuple of K ndarrays, float64
        Candidate ``k``'s rows, of length ``n_iterations[k] + 1``, as in
        :class:`~lr_kernel.FitResult`.
    n_iterations : ndarray of shape (K,), int64
        Updates applied to each candidate.
    stop_reason : tuple of K of {"iterations", "tolerance", "diverged"}
        Per candidate, with :class:`~lr_kernel.FitResult`'s meaning; a stopped
        candidate is frozen while the others go on.
    """

    w: FloatArray
    b: NDArray[np.float64]
    l2: NDArray[np.float64]
    learning_rate: NDArray[np.float64]
    cost_history: tuple[FloatArray, ...]
    gradient_norm_history: tuple[FloatArray, ...]
    n_iterations: NDArray[np.int64]
    stop_reason: tuple[StopReason, ...]

    def __len__(self) -> int:
        return len(self.stop_reason)

    @property
    def converged(self) -> NDArray[np.bool_]:
        """``(K,)``: True where the tolerance rule stopped the candidate."""
        return np.array([reason == "tolerance" for reason in self.stop_reason])

    def candidate(self, k: int) -> FitResult:
        """Candidate ``k`` as the :class:`~lr_kernel.FitResult` of a single fit."""
        return FitResult(
            w=self.w[:, k : k + 1].copy(),
            b=float(self.b[k]),
            cost_history=self.cost_history[k],
            gradient_norm_history=self.gradient_norm_history[k],
            n_iterations=int(self.n_iterations[k]),
            converged=self.stop_reason[k] == "tolerance",
            stop_reason=self.stop_reason[k],
        )

    @classmethod
    def from_fits(
        cls, fits: Sequence[FitResult], l2: FloatArray, learning_rate: FloatArray
    ) -> GridFitResult:
        """Stack single fits (candidate ``k`` is ``fits[k]``)."""
        return cls(
            w=np.concatenate([f.w for f in fits], axis=1),
            b=np.array([f.b for f in fits], dtype=np.float64),
            l2=np.asarray(l2, dtype=np.float64),
            learning_rate=np.asarray(learning_rate, dtype=np.float64),
            cost_history=tuple(f.cost_history for f in fits),
            gradient_norm_history=tuple(f.gradient_norm_history for f in fits),
            n_iterations=np.array([f.n_iterations for f in fits], dtype=np.int64),
            stop_reason=tuple(f.stop_reason for f in fits),
        )


def grid_candidates(
    l2: Values, learning_rate: Values | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Every pair of an ``l2`` and a learning rate, ``l2``-major: two ``(K,)`` arrays.

    Candidate ``k = i * len(learning_rate) + j`` is ``(l2[i], learning_rate[j])``;
    a missing learning rate (``"lbfgs"``) is NaN.
    """
    l2_values = np.atleast_1d(np.asarray(l2, dtype=np.float64))
    rates = np.atleast_1d(
        np.asarray(math.nan if learning_rate is None else learning_rate, dtype=np.float64)
    )
    if l2_values.ndim != 1 or rates.ndim != 1 or not l2_values.size or not rates.size:
        raise ValueError("l2 and learning_rate must be numbers or non-empty 1-d sequences")
    return np.repeat(l2_values, rates.size), np.tile(rates, l2_values.size)


def fit_many(
    X: FloatArray | TiledMatrix,
    Y: FloatArray,
    *,
    learning_rate: Values | None = None,
    iterations: int,
    l2: Values = 0.0,
    tol: float = 0.0,
    w0: FloatArray | None = None,
    b0: float = 0.0,
    callback: Callable[[int, NDArray[np.float64]], None] | None = None,
    optimizer: Optimizer = "gd",
    block_size: int | None = None,
    n_threads: int = 1,
    engine: Engine = "auto",
    sample_weight: FloatArray | None = None,
) -> GridFitResult:
    """Train the grid of every ``l2`` times every learning rate, together on the same ``X``.

    Arguments are :func:`lr_kernel.fit`'s (``X`` may be a
    :class:`~lr_kernel.tiles.TiledMatrix`, as for :class:`FusedLossMany`),
    except that ``l2`` and ``learning_rate`` may be sequences (see
    :func:`grid_candidates` for the candidates' order) and ``callback`` gets
    ``(iteration, cost)`` with ``cost`` of shape ``(K,)``, NaN for candidates
    already stopped.

    With ``"gd"`` and ``"nesterov"`` each iteration is one call of
    :class:`FusedLossMany` (with this ``engine``) on the candidates still running, so ``X`` is read
    once per iteration for all of them, and each candidate's parameters equal a
    single :func:`lr_kernel.fit` with its values up to float rounding. A
    candidate that meets the stop rule (:class:`~lr_kernel.convergence.StopRule`,
    as in ``fit``) is frozen; the others go on. ``"lbfgs"``, ``"newton"`` and
    ``"auto"`` pick their own steps per
    candidate, so its candidates are fitted one after another (``l2`` grid
    only). One candidate is fitted by ``fit`` itself: the same result, bit for
    bit, as a single fit.

    Returns
    -------
    GridFitResult
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    searching = optimizer in SEARCHING  # no learning rate: candidates one at a time
    if searching and learning_rate is not None and np.size(learning_rate) > 1:
        raise ValueError(
            f"{optimizer} searches its own steps: a learning_rate grid needs gd or nesterov"
        )
    l2_values, rates = grid_candidates(l2, None if searching else learning_rate)
    K = l2_values.size
    n, m = X.shape
    for value in l2_values:
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"l2 must be >= 0 and finite, got {value}")
    if not searching:
        if learning_rate is None:
            raise ValueError("learning_rate must be a positive finite number, got None")
        for rate in rates:
            if not rate > 0 or not math.isfinite(rate):
                raise ValueError(f"learning_rate must be a positive finite number, got {rate}")

    def single(k: int) -> FitResult:
        def forward(iteration: int, cost: float) -> None:
            if callback is not None:
                costs = np.full(K, math.nan)
                costs[k] = cost
                callback(iteration, costs)

        return fit(
            X,
            Y,
            learning_rate=None if searching else float(rates[k]),
            iterations=iterations,
            l2=float(l2_values[k]),
            tol=tol,
            w0=w0,
            b0=b0,
            callback=forward if callback is not None else None,
            optimizer=optimizer,
            block_size=block_size,
            n_threads=n_threads,
            engine=engine,
            sample_weight=sample_weight,
        )

    if K == 1 or searching:
        return GridFitResult.from_fits([single(k) for k in range(K)], l2_values, rates)
    # fit's own checks, for the arguments it would see.
    if Y.shape != (1, m):
        raise ValueError(f"Y must have shape (1, {m}), got {Y.shape}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    W = np.zeros((n, K), dtype=X.dtype)
    if w0 is not None:
        if w0.shape != (n, 1):
            raise ValueError(f"w0 must have shape ({n}, 1), got {w0.shape}")
        W[:] = w0
    loss = FusedLossMany(
        X,
        Y,
        n_models=K,
        sample_weight=sample_weight,
        block_size=block_size,
        n_threads=n_threads,
        engine=engine,
    )
    return _descent_many(loss, W, float(b0), l2_values, rates, iterations, tol, optimizer, callback)


def _descent_many(
    loss: FusedLossMany,
    W: FloatArray,
    b0: float,
    l2: NDArray[np.float64],
    learning_rate: NDArray[np.float64],
    iterations: int,
    tol: float,
    optimizer: Optimizer,
    callback: Callable[[int, NDArray[np.float64]], None] | None,
) -> GridFitResult:
    """Gradient descent or Nesterov over K candidates, each with ``fit``'s stop rule.

    The arithmetic per candidate is that of ``_gradient_descent`` /
    ``_nesterov`` in ``lr_kernel.train``, in the same order and dtypes, so the
    only difference from single fits is the GEMM's summation order.
    """
    K = W.shape[1]
    dtype = loss.dtype
    # The step in X's dtype, as a Python float times a float32 array is float32.
    rates = learning_rate.astype(dtype)
    nesterov = optimizer == "nesterov"
    b = np.full(K, b0, dtype=np.float64)
    # Nesterov evaluates at (V, c) and steps from there; (W, b) is the last
    # gradient step. For gd, (V, c) is (W, b) itself.
    V, c = (W.copy(), b.copy()) if nesterov else (W, b)
    t = np.ones(K)
    costs: list[list[float]] = [[] for _ in range(K)]
    grad_norms: list[list[float]] = [[] for _ in range(K)]
    stop: list[StopReason] = ["iterations"] * K

    def record(iteration: int, active: NDArray[np.intp], cost: NDArray[np.float64],
               dW: FloatArray, db: NDArray[np.float64]) -> None:  # fmt: skip
        for j, k in enumerate(active):
            costs[k].append(float(cost[j]))
            grad_norms[k].append(gradient_max(dW[:, j], float(db[j])))
        if callback is not None:
            reported = np.full(K, math.nan)
            reported[active] = cost
            callback(iteration, reported)

    active = np.arange(K)
    cost, dW, db = loss(V, c, l2)
    record(0, active, cost, dW, db)
    rules = [StopRule(tol, dtype, float(cost[k])) for k in range(K)]

    def stopped(previous: NDArray[np.float64] | None) -> NDArray[np.bool_]:
        """Apply each active candidate's stop rule; True where it goes on."""
        keep = np.ones(active.size, dtype=bool)
        for j, k in enumerate(active):
            before = None if previous is None else float(previous[j])
            reason = rules[k].check(float(cost[j]), before, dW[:, j], float(db[j]))
            if reason is not None:
                stop[k], keep[j] = reason, False
        return keep

    keep = stopped(None)
    for iteration in range(1, iterations + 1):
        if not keep.all():
            active, cost, dW, db = active[keep], cost[keep], dW[:, keep], db[keep]
            if not active.size:
                break
        step = rates[active]  # (Ka,)
        W_next = V[:, active] - step * dW  # (n, Ka)
        b_next = c[active] - learning_rate[active] * db  # (Ka,)
        previous = cost
        if nesterov:
            restart = np.array([rules[k].rises > 0 for k in active], dtype=bool)
            t[active[restart]] = 1.0  # restart: no momentum after a rise
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t[active] * t[active]))
            momentum = (t[active] - 1.0) / t_next  # (Ka,)
            V[:, active] = W_next + momentum.astype(dtype) * (W_next - W[:, active])
            c[active] = b_next + momentum * (b_next - b[active])
            t[active] = t_next
        else:
            V[:, active] = W_next
            c[active] = b_next
        W[:, active] = W_next
        b[active] = b_next
        cost, dW, db = loss(V[:, active], c[active], l2[active])
        record(iteration, active, cost, dW, db)
        keep = stopped(previous)
    return GridFitResult(
        w=V,
        b=c,
        l2=l2,
        learning_rate=learning_rate,
        cost_history=tuple(np.asarray(h, dtype=np.float64) for h in costs),
        gradient_norm_history=tuple(np.asarray(h, dtype=np.float64) for h in grad_norms),
        n_iterations=np.array([len(h) - 1 for h in costs], dtype=np.int64),
        stop_reason=tuple(stop),
    )

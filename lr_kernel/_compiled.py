"""The fused pass as one compiled loop per thread (numba): the ``"numba"`` engine.

:class:`lr_kernel.FusedLoss` makes ~15 NumPy calls per column block, each
holding the GIL to start, so its threads serialize and its blocks must be large
(8 MiB, from the last-level cache) to amortize the calls. Here one call per
thread walks all of that thread's blocks without the GIL, so the threads never
wait for each other and blocks can be small enough to stay in a core's L2
cache between the two passes over them. At 1M x 100 on 2 cores that is
1.4-1.7x the NumPy engine, and 52-69% (float64) and 63-65% (float32) of the
speed of one all-core read of ``X`` (``benchmarks/RESULTS.md``, issue 14).

Per block of examples ``[s, e)``, with ``U = -Z``::

    U  = -(wᵀ Xb + b)                   8 rows of Xb per sweep of U, from memory
    l  = max(U, 0) + log1p(exp(-|U|)) - (1 - Y) U      = softplus(Z) - Y Z
    dZ = sigmoid(Z) - Y                 from the same exp
    dw += Xb dZᵀ, db += Σ dZ           8 rows per sweep, Xb still in L2

With row weights ``s``, ``l`` and ``dZ`` are multiplied by ``s`` in the same
element-wise step (a loop of its own, so the unweighted one is unchanged).

``exp`` and ``log1p`` are written out here (range reduction and a polynomial,
within 1 and 3 ulp of libm's over the whole range used) because LLVM vectorizes
the loop only when no library call is left in it; with libm's scalar calls the
element-wise step alone costs more than reading ``X``.

:func:`share_sums_many` is the same pass for ``K`` models
(:class:`lr_kernel.FusedLossMany`): per block both products for every model
while the block is in cache, so ``X`` is read from memory once for all of them.
Its products are LLVM vector code (numba intrinsics): the models of a group in
the lanes of one register, tiles of accumulators that stay in registers, at
95-100% (float64) and 65-75% (float32) of the FMA units' peak on a block in
cache, where the same loops through LLVM's loop vectorizer reached 40-65%;
and the next block is prefetched into L2 while the current one is worked on.
The element-wise step runs over a group's values as one array, in two loops,
and for float32 in float32 arithmetic. At 1M x 100 on 2 cores, K = 8 costs
1.6-2.0x one model per pass (float64 and float32), against 2.4-3.0x and
3.2-3.5x with the vectorizer's loops (``benchmarks/RESULTS.md``, issue 14,
run 4). :func:`share_sums_many_tiled` runs the same block over the tiles of a
:class:`lr_kernel.tiles.TiledMatrix`, a tile per block.

Importing this module imports numba and defines the kernels; each dtype is
compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Below this, exp(x) is a subnormal or zero: the kernel returns 0, so an
# example whose |Z| is this large contributes its exact loss max(U, 0) - (1-Y) U.
_EXP_MIN = -708.0
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
# Taylor series of exp(r), highest degree first: to degree 13, the truncation
# is below 1e-17 relative for |r| <= ln(2) / 2.
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))
# atanh(s) / s = Σ s^2j / (2j + 1), highest first: 12 terms, below 1e-17 relative
# for |s| <= 0.172.
_ATANH_SERIES = tuple(1.0 / (2 * j + 1) for j in range(11, -1, -1))
# The element-wise loops may fuse a multiply and an add into one FMA (one
# rounding instead of two, so no less accurate): the polynomials' chains then
# take 4 cycles a step instead of 6, 1.5x faster. Nothing else of fastmath:
# no reassociation, which could rewrite the polynomials or the sums.
_CONTRACT = {"contract"}
# Adding 1.5 * 2**52 rounds a double of magnitude < 2**51 to an integer, which
# then sits in the low bits of the sum's representation.
_ROUND = 6755399441055744.0


def _bitcast(source: Any, target: Any, target_ir: Any) -> Any:
    """An intrinsic: the ``target`` value with the same bits as its ``source`` argument."""

    def cast(typingctx: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], target_ir)

        return target(source), codegen

    return intrinsic(cast)


# IEEE-754 representations: a float from its bits, the bits of a float.
_float_from_bits = _bitcast(types.int64, types.float64, ir.DoubleType())
_bits_of_float = _bitcast(types.float64, types.int64, ir.IntType(64))


@nb.njit(inline="always", error_model="numpy", cache=True)
def _horner(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial with these coefficients (highest degree first) at ``x``."""
    p = 0.0
    for c in coefficients:  # a constant tuple: unrolled by the compiler
        p = p * x + c
    return p


@nb.njit(inline="always", error_model="numpy", cache=True)
def _exp_nonpositive(x: float) -> float:
    """``exp(x)`` for ``x <= 0``, within 1 ulp; 0.0 below ``_EXP_MIN`` (and for -inf, NaN)."""
    xc = x if x > _EXP_MIN else _EXP_MIN
    t = xc * _INV_LN2 + _ROUND
    kf = t - _ROUND  # round(x / ln 2), in [-1022, 0]
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO  # |r| <= ln(2) / 2
    p = _horner(_EXP_TAYLOR, r)
    k: int = _bits_of_float(t) - _bits_of_float(_ROUND)
    scale = _float_from_bits((k + 1023) << 52)  # 2**k, a normal number
    return p * scale if x >= _EXP_MIN else 0.0


@nb.njit(inline="always", error_model="numpy", cache=True)
def _log1p_unit(e: float) -> float:
    """``log(1 + e)`` for ``e`` in ``[0, 1]``, within 3 ulp."""
    v = 1.0 + e
    correction = (e - (v - 1.0)) / v  # what rounding 1 + e lost, to first order
    big = v > _SQRT2
    f = v * 0.5 if big else v  # v = 2**big * f, f in [0.70, 1.42)
    s = (f - 1.0) / (f + 1.0)  # |s| <= 0.172
    q = _horner(_ATANH_SERIES, s * s)  # log f = 2 atanh(s) = 2 s q
    return (_LN2 if big else 0.0) + 2.0 * s * q + correction


# The same two functions in float32 arithmetic, for the many-model engine's
# float32 element-wise step: 16 lanes per AVX-512 operation instead of 8, and
# shorter series (float32's 24 bits need exp to degree 7 and 6 atanh terms):
# 2-2.5x faster than the float64 functions on float32 scores. Their float32
# results are then as exact as the float32 scores they start from.
_F32 = np.float32
_EXP_MIN_32 = _F32(-87.0)  # exp(-87) = 1.6e-38, a normal float32
_INV_LN2_32 = _F32(_INV_LN2)
_LN2_HI_32 = _F32(0.693359375)  # 9 bits: k * _LN2_HI_32 is exact for |k| <= 126
_LN2_LO_32 = _F32(_LN2 - 0.693359375)
_LN2_32 = _F32(_LN2)
_SQRT2_32 = _F32(_SQRT2)
_ROUND_32 = _F32(1.5 * 2**23)  # rounds a float32 of magnitude < 2**22 to an integer
_EXP_TAYLOR_32 = tuple(_F32(1.0 / math.factorial(k)) for k in range(7, -1, -1))
_ATANH_SERIES_32 = tuple(_F32(1.0 / (2 * j + 1)) for j in range(5, -1, -1))
_ONE_32, _HALF_32, _ZERO_32, _TWO_32 = _F32(1.0), _F32(0.5), _F32(0.0), _F32(2.0)
_BIAS_32, _MANTISSA_32 = np.int32(127), np.int32(23)


_float32_from_bits = _bitcast(types.int32, types.float32, ir.FloatType())
_bits_of_float32 = _bitcast(types.float32, types.int32, ir.IntType(32))


@nb.njit(inline="always", error_model="numpy", cache=True)
def _horner_32(coefficients: tuple[Any, ...], x: Any) -> Any:
    """:func:`_horner` for float32 coefficients, in float32."""
    p = coefficients[0]
    for c in coefficients[1:]:
        p = p * x + c
    return p


@nb.njit(inline="always", error_model="numpy", cache=True)
def _exp_nonpositive_32(x: Any) -> Any:
    """:func:`_exp_nonpositive` of a float32 ``x <= 0``, in float32: 0 below -87."""
    xc = x if x > _EXP_MIN_32 else _EXP_MIN_32
    t = xc * _INV_LN2_32 + _ROUND_32
    kf = t - _ROUND_32  # round(x / ln 2), in [-126, 0]
    r = (xc - kf * _LN2_HI_32) - kf * _LN2_LO_32  # |r| <= ln(2) / 2
    p = _horner_32(_EXP_TAYLOR_32, r)
    k: int = _bits_of_float32(t) - _bits_of_float32(_ROUND_32)
    scale = _float32_from_bits(np.int32((k + _BIAS_32) << _MANTISSA_32))
    return p * scale if x >= _EXP_MIN_32 else _ZERO_32


@nb.njit(inline="always", error_model="numpy", cache=True)
def _log1p_unit_32(e: Any) -> Any:
    """:func:`_log1p_unit` of a float32 ``e`` in ``[0, 1]``, in float32."""
    v = _ONE_32 + e
    correction = (e - (v - _ONE_32)) / v
    big = v > _SQRT2_32
    f = v * _HALF_32 if big else v
    s = (f - _ONE_32) / (f + _ONE_32)
    q = _horner_32(_ATANH_SERIES_32, s * s)
    return (_LN2_32 if big else _ZERO_32) + _TWO_32 * s * q + correction


@nb.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)
def _forward(X: Any, neg_w: Any, b: float, s: int, e: int, u: Any) -> None:
    """``u[:e-s] = -(wᵀ X[:, s:e] + b)``, eight rows of ``X`` per sweep of ``u``."""
    n = X.shape[0]
    k = e - s
    n8 = n - n % 8
    for j in range(k):
        u[j] = -b
    for i in range(0, n8, 8):
        w0, w1, w2, w3 = neg_w[i], neg_w[i + 1], neg_w[i + 2], neg_w[i + 3]
        w4, w5, w6, w7 = neg_w[i + 4], neg_w[i + 5], neg_w[i + 6], neg_w[i + 7]
        r0, r1, r2, r3 = X[i, s:e], X[i + 1, s:e], X[i + 2, s:e], X[i + 3, s:e]
        r4, r5, r6, r7 = X[i + 4, s:e], X[i + 5, s:e], X[i + 6, s:e], X[i + 7, s:e]
        for j in range(k):
            u[j] += (w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j]) + (
                w4 * r4[j] + w5 * r5[j] + w6 * r6[j] + w7 * r7[j]
            )
    for i in range(n8, n):
        wi = neg_w[i]
        r0 = X[i, s:e]
        for j in range(k):
            u[j] += wi * r0[j]


@nb.njit(nogil=True, boundscheck=False, error_model="numpy", fastmath=_CONTRACT, cache=True)
def _pointwise(u: Any, y: Any, s: int, k: int, losses: Any) -> None:
    """Per example: ``losses = softplus(Z) - Y Z``, and ``u`` becomes ``dZ``.

    No reductions here (they would need reassociation to vectorize, which
    would also let the compiler rewrite the polynomials), and NumPy's error
    model: Python's checks every division for zero, a call per element that
    stops the loop from vectorizing.
    """
    for j in range(k):
        uj = u[j]
        yj = y[s + j]
        ex = _exp_nonpositive(-uj if uj > 0.0 else uj)  # exp(-|U|), in (0, 1]
        losses[j] = (uj if uj > 0.0 else 0.0) + _log1p_unit(ex) - (1.0 - yj) * uj
        # sigmoid(Z) = 1 / (1 + exp(U)): written with exp(-|U|), never overflows.
        u[j] = (1.0 if uj <= 0.0 else ex) / (1.0 + ex) - yj


@nb.njit(nogil=True, boundscheck=False, error_model="numpy", fastmath=_CONTRACT, cache=True)
def _pointwise_weighted(u: Any, y: Any, weights: Any, s: int, k: int, losses: Any) -> None:
    """:func:`_pointwise` with row weights: ``losses = s ℓ`` and ``u`` becomes ``s (A - Y)``.

    A loop of its own, so that the unweighted one stays as it was.
    """
    for j in range(k):
        uj = u[j]
        yj = y[s + j]
        sj = weights[s + j]
        ex = _exp_nonpositive(-uj if uj > 0.0 else uj)  # exp(-|U|), in (0, 1]
        losses[j] = sj * ((uj if uj > 0.0 else 0.0) + _log1p_unit(ex) - (1.0 - yj) * uj)
        u[j] = sj * ((1.0 if uj <= 0.0 else ex) / (1.0 + ex) - yj)


@nb.njit(nogil=True, boundscheck=False, error_model="numpy", fastmath=_CONTRACT, cache=True)
def _pointwise_split_32(u: Any, y: Any, weights: Any, weighted: bool, k: int, losses: Any) -> None:
    """:func:`_pointwise_split` for float32 scores, all in float32.

    The loss's linear part ``max(U, 0) - (1 - Y) U`` is exact in float32 for
    labels 0 and 1 (``max(U, 0)`` or ``max(-U, 0)``), so each loss is the
    float32 rounding of its exact value; ``losses`` may be float32 (1.6x
    faster than this step with the linear part in float64, for the
    many-model loops) or float64. The caller sums the losses in float64.
    """
    for j in range(k):
        uj = u[j]
        losses[j] = _exp_nonpositive_32(-uj if uj > _ZERO_32 else uj)  # exact in either dtype
    for j in range(k):
        uj = u[j]
        yj = y[j]
        ex = _F32(losses[j])
        linear = (uj if uj > _ZERO_32 else _ZERO_32) - (_ONE_32 - yj) * uj
        losses[j] = linear + _log1p_unit_32(ex)
        u[j] = (_ONE_32 if uj <= _ZERO_32 else ex) / (_ONE_32 + ex) - yj
    if weighted:
        for j in range(k):
            sj = weights[j]
            losses[j] *= sj
            u[j] *= sj


@nb.njit(nogil=True, boundscheck=False, error_model="numpy", fastmath=_CONTRACT, cache=True)
def _pointwise_split(u: Any, y: Any, weights: Any, weighted: bool, k: int, losses: Any) -> None:
    """:func:`_pointwise` (or :func:`_pointwise_weighted`) over ``[0, k)``, in two loops.

    First ``exp(-|U|)`` into ``losses``, then the rest from it: the same
    expressions, but each loop's dependency chain is about half as long, so the
    core overlaps more of its iterations (1.2-1.3x faster for the many-model
    engine's ``k x 8`` values). ``y`` and ``weights`` are indexed from 0.
    float32 scores take :func:`_pointwise_split_32`.
    """
    if u.itemsize == 4:
        _pointwise_split_32(u, y, weights, weighted, k, losses)
        return
    for j in range(k):
        uj = u[j]
        losses[j] = _exp_nonpositive(-uj if uj > 0.0 else uj)  # exp(-|U|), in (0, 1]
    if weighted:
        for j in range(k):
            uj = u[j]
            yj = y[j]
            sj = weights[j]
            ex = losses[j]
            losses[j] = sj * ((uj if uj > 0.0 else 0.0) + _log1p_unit(ex) - (1.0 - yj) * uj)
            u[j] = sj * ((1.0 if uj <= 0.0 else ex) / (1.0 + ex) - yj)
    else:
        for j in range(k):
            uj = u[j]
            yj = y[j]
            ex = losses[j]
            losses[j] = (uj if uj > 0.0 else 0.0) + _log1p_unit(ex) - (1.0 - yj) * uj
            u[j] = (1.0 if uj <= 0.0 else ex) / (1.0 + ex) - yj


@nb.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)
def _sums(losses: Any, dz: Any, k: int) -> tuple[float, float]:
    """``Σ losses[:k]`` and ``Σ dz[:k]`` in float64 (vectorized, reassociated)."""
    loss_sum = 0.0
    dz_sum = 0.0
    for j in range(k):
        loss_sum += losses[j]
        dz_sum += dz[j]
    return loss_sum, dz_sum


@nb.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)
def _backward(X: Any, s: int, e: int, dz: Any, zero: Any, dw: Any) -> None:
    """``dw += X[:, s:e] @ dz[:e-s]``, eight rows per sweep of ``dz``.

    ``zero`` fixes the accumulators' type: ``X``'s dtype within the block (as a
    BLAS GEMV does), float64 across blocks in ``dw``.
    """
    n = X.shape[0]
    k = e - s
    n8 = n - n % 8
    for i in range(0, n8, 8):
        r0, r1, r2, r3 = X[i, s:e], X[i + 1, s:e], X[i + 2, s:e], X[i + 3, s:e]
        r4, r5, r6, r7 = X[i + 4, s:e], X[i + 5, s:e], X[i + 6, s:e], X[i + 7, s:e]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
        for j in range(k):
            d = dz[j]
            a0 += r0[j] * d
            a1 += r1[j] * d
            a2 += r2[j] * d
            a3 += r3[j] * d
            a4 += r4[j] * d
            a5 += r5[j] * d
            a6 += r6[j] * d
            a7 += r7[j] * d
        dw[i] += a0
        dw[i + 1] += a1
        dw[i + 2] += a2
        dw[i + 3] += a3
        dw[i + 4] += a4
        dw[i + 5] += a5
        dw[i + 6] += a6
        dw[i + 7] += a7
    for i in range(n8, n):
        r0 = X[i, s:e]
        a0 = zero
        for j in range(k):
            a0 += r0[j] * dz[j]
        dw[i] += a0


@nb.njit(nogil=True, boundscheck=False, cache=True)
def share_sums(
    X: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_w: Any,
    b: float,
    start: int,
    stop: int,
    block: int,
    u: Any,
    losses: Any,
    dw: Any,
) -> tuple[float, float]:
    """One thread's share ``[start, stop)`` of the examples, block by block.

    Parameters
    ----------
    X : C-contiguous ndarray (n, m), float32 or float64
    y : ndarray (m,), ``X``'s dtype
    weights : ndarray (m,), ``X``'s dtype, the row weights; read only if ``weighted``
    weighted : bool
    neg_w : ndarray (n,), ``X``'s dtype, ``-w``
    b : float
    start, stop : int, the examples of this share
    block : int, examples per block
    u : ndarray (block,), ``X``'s dtype, scratch
    losses : ndarray (block,), float64, scratch
    dw : ndarray (n,), float64, zeroed by the caller; receives ``Σ X dZᵀ``

    Returns
    -------
    loss_sum, db_sum : float
        ``Σ s (softplus(z) - y z)`` and ``Σ dz`` over the share (``s = 1``
        unless ``weighted``).
    """
    zero = u.dtype.type(0)  # accumulators in X's dtype within a block
    loss_sum = 0.0
    db_sum = 0.0
    for s in range(start, stop, block):
        e = min(s + block, stop)
        k = e - s
        _forward(X, neg_w, b, s, e, u)
        if weighted:
            _pointwise_weighted(u, y, weights, s, k, losses)
        else:
            _pointwise(u, y, s, k, losses)
        block_loss, block_db = _sums(losses, u, k)
        loss_sum += block_loss
        db_sum += block_db
        _backward(X, s, e, u, zero, dw)
    return loss_sum, db_sum


@nb.njit(nogil=True, boundscheck=False, error_model="numpy", fastmath=_CONTRACT, cache=True)
def _pointwise_curvature(
    u: Any, y: Any, weights: Any, weighted: bool, s: int, k: int, losses: Any, curvature: Any
) -> None:
    """:func:`_pointwise_weighted` plus ``curvature = s a (1 - a)``, for the Hessian pass.

    ``a (1 - a) = e / (1 + e)²`` with ``e = exp(-|Z|)``: exact where ``a`` rounds to 1.
    """
    for j in range(k):
        uj = u[j]
        yj = y[s + j]
        sj = weights[s + j] if weighted else 1.0
        ex = _exp_nonpositive(-uj if uj > 0.0 else uj)  # exp(-|U|), in (0, 1]
        losses[j] = sj * ((uj if uj > 0.0 else 0.0) + _log1p_unit(ex) - (1.0 - yj) * uj)
        u[j] = sj * ((1.0 if uj <= 0.0 else ex) / (1.0 + ex) - yj)
        curvature[j] = sj * ex / ((1.0 + ex) * (1.0 + ex))


@nb.njit(nogil=True, boundscheck=False, cache=True)
def block_curvature(
    X: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_w: Any,
    b: float,
    s: int,
    e: int,
    u: Any,
    losses: Any,
    curvature: Any,
    dw: Any,
) -> tuple[float, float]:
    """One block ``[s, e)`` of the Hessian pass: :func:`share_sums`'s work plus the curvature.

    ``curvature[:e-s]`` receives ``s a (1 - a)`` (float64), for the caller's block
    product ``Xb diag(curvature) Xbᵀ`` (a BLAS call, while ``Xb`` is in cache).
    Other arguments and results as :func:`share_sums`.
    """
    zero = u.dtype.type(0)
    k = e - s
    _forward(X, neg_w, b, s, e, u)
    _pointwise_curvature(u, y, weights, weighted, s, k, losses, curvature)
    loss_sum, db_sum = _sums(losses, u, k)
    _backward(X, s, e, u, zero, dw)
    return loss_sum, db_sum


# The many-model engine's block products, written as LLVM vector code: models
# in the lanes of one vector (8 float64 lanes fill an AVX-512 register, 8
# float32 an AVX one), a tile of accumulators held in registers for a whole
# loop. LLVM's loop vectorizer, given the same loops in Python, keeps the
# accumulators of the forward product in memory (it cannot prove that U and X
# do not overlap) and ends each backward sweep with horizontal sums: both ran
# at 40-65% of the FMA units' peak in cache (float64 15 and 18 GFMA/s of 27.6
# here); these run at 95-100% (28 and 26) in float64, 65-75% in float32
# (over tiles, float32 groups take _tile_groups_32's loops instead: 57 and
# 50 GFMA/s in cache, of ~56 at this clock).
LANES = 8
# Examples per forward tile, rows per backward tile: one register per
# accumulator, a few left for the operands (32 vector registers with AVX-512;
# with 16, LLVM spills a few accumulators to the stack, which L1 absorbs).
_FORWARD_TILES = (24, 8, 1)
_BACKWARD_TILES = (12, 4, 1)


def _vector_type(element: ir.Type, lanes: int) -> ir.VectorType:
    return ir.VectorType(element, lanes)


def _splat(builder: ir.IRBuilder, x: ir.Value, lanes: int) -> ir.Value:
    """``x`` in every lane."""
    vt = _vector_type(x.type, lanes)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), zeros)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """``a * b + c`` lane by lane, rounded once (``llvm.fma``)."""
    vt = a.type
    suffix = "f64" if vt.element == ir.DoubleType() else "f32"
    fnty = ir.FunctionType(vt, [vt, vt, vt])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{vt.count}{suffix}")
    return builder.call(fn, [a, b, c])


def _prefetch(builder: ir.IRBuilder, pointer: ir.Value) -> None:
    """Start loading ``pointer``'s cache line into L2 (``llvm.prefetch``: never faults)."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # read, locality 2 (prefetcht1: L2, where the next block is wanted), data
    builder.call(fn, [builder.bitcast(pointer, i8p), i32(0), i32(2), i32(1)])


def _load(builder: ir.IRBuilder, pointer: ir.Value, vt: ir.VectorType, align: int) -> ir.Value:
    return builder.load(builder.bitcast(pointer, vt.as_pointer()), align=align)


def _store(builder: ir.IRBuilder, value: ir.Value, pointer: ir.Value, align: int) -> None:
    builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=align)


def _element_pointer(builder: ir.IRBuilder, array: Any, i: ir.Value, j: ir.Value) -> ir.Value:
    """``&array[i, j]`` of a 2D array whose rows have unit stride (``strides[0]`` in bytes)."""
    element = array.data.type.pointee
    row = builder.gep(
        builder.bitcast(array.data, ir.IntType(8).as_pointer()),
        [builder.mul(i, builder.extract_value(array.strides, 0))],
    )
    return builder.gep(builder.bitcast(row, element.as_pointer()), [j])


def _const(value: ir.Value, c: int) -> ir.Constant:
    return ir.Constant(value.type, c)


def _arrays(context: Any, builder: ir.IRBuilder, signature: Any, args: Any, *at: int) -> list[Any]:
    """The intrinsic's array arguments at positions ``at``, as LLVM array structures."""
    return [context.make_array(signature.args[i])(context, builder, args[i]) for i in at]


def _make_forward_tile(tile: int, lanes: int) -> Any:
    """An intrinsic: ``tile`` examples' scores for ``lanes`` models, prefetching ahead."""

    @intrinsic
    def forward_tile(
        typingctx: Any, X: Any, neg_W: Any, neg_b: Any, U: Any, col: Any, t0: Any, ahead: Any
    ) -> Any:
        """``U[t0 + t] = neg_b + Σ_i X[i, col + t] neg_W[i]`` for ``t < tile``.

        ``neg_W`` (n, lanes), ``neg_b`` (lanes,) and ``U`` (rows of ``lanes``)
        in ``X``'s dtype; the sum runs over ``i`` in order, one rounding per
        term, as the single model's. At each row it also prefetches the same
        examples ``ahead`` columns further on (the next block).
        """
        sig = types.void(X, neg_W, neg_b, U, types.intp, types.intp, types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element = context.get_value_type(signature.args[0].dtype)
            size = context.get_abi_sizeof(element)
            vt = _vector_type(element, lanes)
            Xa, Wa, ba, Ua = _arrays(context, builder, signature, args, 0, 1, 2, 3)
            col, t0, ahead = args[4], args[5], args[6]
            start = _load(builder, ba.data, vt, size)
            accumulators = [cgutils.alloca_once_value(builder, start) for _ in range(tile)]
            with cgutils.for_range(builder, builder.extract_value(Xa.shape, 0)) as loop:
                i = loop.index
                w = _load(
                    builder, builder.gep(Wa.data, [builder.mul(i, _const(i, lanes))]), vt, size
                )
                x_row = _element_pointer(builder, Xa, i, col)
                next_row = builder.gep(x_row, [ahead])
                for line in range(0, tile, 64 // size):
                    _prefetch(builder, builder.gep(next_row, [_const(i, line)]))
                for t, acc in enumerate(accumulators):
                    x = builder.load(builder.gep(x_row, [_const(i, t)]), align=size)
                    builder.store(
                        _fma(builder, _splat(builder, x, lanes), w, builder.load(acc)), acc
                    )
            for t, acc in enumerate(accumulators):
                row = builder.mul(builder.add(t0, _const(t0, t)), _const(t0, lanes))
                _store(builder, builder.load(acc), builder.gep(Ua.data, [row]), size)
            return context.get_dummy_value()

        return sig, codegen

    return forward_tile


def _make_backward_tile(rows: int, lanes: int) -> Any:
    """An intrinsic: ``rows`` rows of ``X dZᵀ`` for ``lanes`` models."""

    @intrinsic
    def backward_tile(typingctx: Any, X: Any, i0: Any, col: Any, k: Any, dZ: Any, dW: Any) -> Any:
        """``dW[i0 + r] += Σ_{t<k} X[i0 + r, col + t] dZ[t]`` for ``r < rows``.

        Accumulated over ``t`` in order in ``X``'s dtype (as a BLAS GEMV would),
        then added to ``dW`` (float64 rows of ``lanes``).
        """
        sig = types.void(X, types.intp, types.intp, types.intp, dZ, dW)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element = context.get_value_type(signature.args[0].dtype)
            size = context.get_abi_sizeof(element)
            vt = _vector_type(element, lanes)
            vt64 = _vector_type(ir.DoubleType(), lanes)
            Xa, Za, Wa = _arrays(context, builder, signature, args, 0, 4, 5)
            i0, col, k = args[1], args[2], args[3]
            x_rows = [
                _element_pointer(builder, Xa, builder.add(i0, _const(i0, r)), col)
                for r in range(rows)
            ]
            accumulators = [
                cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(rows)
            ]
            with cgutils.for_range(builder, k) as loop:
                t = loop.index
                dz = _load(
                    builder, builder.gep(Za.data, [builder.mul(t, _const(t, lanes))]), vt, size
                )
                for x_row, acc in zip(x_rows, accumulators, strict=True):
                    x = builder.load(builder.gep(x_row, [t]), align=size)
                    builder.store(
                        _fma(builder, _splat(builder, x, lanes), dz, builder.load(acc)), acc
                    )
            for r, acc in enumerate(accumulators):
                total = builder.load(acc)
                if element != ir.DoubleType():
                    total = builder.fpext(total, vt64)
                row = builder.gep(
                    Wa.data, [builder.mul(builder.add(i0, _const(i0, r)), _const(i0, lanes))]
                )
                _store(builder, builder.fadd(_load(builder, row, vt64, 8), total), row, 8)
            return context.get_dummy_value()

        return sig, codegen

    return backward_tile


def _make_lane_sums(lanes: int) -> Any:
    """An intrinsic: per-lane sums of the first ``k`` rows of a flat ``(rows, lanes)`` array."""

    @intrinsic
    def lane_sums(typingctx: Any, A: Any, k: Any, out: Any) -> Any:
        """``out += Σ_{t<k} A[t * lanes : (t + 1) * lanes]`` in float64, four partial sums."""
        sig = types.void(A, types.intp, out)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element = context.get_value_type(signature.args[0].dtype)
            size = context.get_abi_sizeof(element)
            vt = _vector_type(element, lanes)
            vt64 = _vector_type(ir.DoubleType(), lanes)
            Aa, Oa = _arrays(context, builder, signature, args, 0, 2)
            k = args[1]

            def row(t: ir.Value) -> ir.Value:
                v = _load(
                    builder, builder.gep(Aa.data, [builder.mul(t, _const(t, lanes))]), vt, size
                )
                return v if element == ir.DoubleType() else builder.fpext(v, vt64)

            partials = [
                cgutils.alloca_once_value(builder, ir.Constant(vt64, None)) for _ in range(4)
            ]
            quads = builder.sdiv(k, _const(k, 4))
            with cgutils.for_range(builder, quads) as loop:
                for p, partial in enumerate(partials):
                    t = builder.add(builder.mul(loop.index, _const(k, 4)), _const(k, p))
                    builder.store(builder.fadd(builder.load(partial), row(t)), partial)
            with cgutils.for_range(builder, k, start=builder.mul(quads, _const(k, 4))) as loop:
                builder.store(builder.fadd(builder.load(partials[0]), row(loop.index)), partials[0])
            a, b, c, d = (builder.load(p) for p in partials)
            total = builder.fadd(builder.fadd(a, b), builder.fadd(c, d))
            _store(builder, builder.fadd(_load(builder, Oa.data, vt64, 8), total), Oa.data, 8)
            return context.get_dummy_value()

        return sig, codegen

    return lane_sums


# Tiles for 8, 4 and 2 lanes: fewer models than 8 take a narrower group, whose
# element-wise step costs in proportion.
_fw8_24, _fw8_8, _fw8_1 = (_make_forward_tile(t, 8) for t in _FORWARD_TILES)
_fw4_24, _fw4_8, _fw4_1 = (_make_forward_tile(t, 4) for t in _FORWARD_TILES)
_fw2_24, _fw2_8, _fw2_1 = (_make_forward_tile(t, 2) for t in _FORWARD_TILES)
_bw8_12, _bw8_4, _bw8_1 = (_make_backward_tile(r, 8) for r in _BACKWARD_TILES)
_bw4_12, _bw4_4, _bw4_1 = (_make_backward_tile(r, 4) for r in _BACKWARD_TILES)
_bw2_12, _bw2_4, _bw2_1 = (_make_backward_tile(r, 2) for r in _BACKWARD_TILES)
_sums8, _sums4, _sums2 = (_make_lane_sums(lanes) for lanes in (8, 4, 2))


def lanes_for(n_models: int) -> int:
    """Lanes of a group for ``n_models`` models: 1, 2, 4 or 8 (then groups of 8).

    1: one model with the single-model loops (examples in the lanes), 1.1-1.2x
    :class:`lr_kernel.FusedLoss` where one model in two lanes was 1.2-1.5x.
    """
    return 1 if n_models == 1 else 2 if n_models <= 2 else 4 if n_models <= 4 else LANES


@nb.njit(nogil=True, boundscheck=False, cache=True)
def _forward_lanes(X: Any, neg_W: Any, neg_b: Any, s: int, e: int, U: Any, ahead: int) -> None:
    """``U[t] = -(W[:, g]ᵀ X[:, s + t] + b[g])`` for ``t < e - s``: tiles of 24, 8, 1 examples."""
    lanes = neg_W.shape[1]
    k = e - s
    t = 0
    while t + 24 <= k:
        if lanes == 8:
            _fw8_24(X, neg_W, neg_b, U, s + t, t, ahead)
        elif lanes == 4:
            _fw4_24(X, neg_W, neg_b, U, s + t, t, ahead)
        else:
            _fw2_24(X, neg_W, neg_b, U, s + t, t, ahead)
        t += 24
    while t + 8 <= k:
        if lanes == 8:
            _fw8_8(X, neg_W, neg_b, U, s + t, t, ahead)
        elif lanes == 4:
            _fw4_8(X, neg_W, neg_b, U, s + t, t, ahead)
        else:
            _fw2_8(X, neg_W, neg_b, U, s + t, t, ahead)
        t += 8
    while t < k:
        if lanes == 8:
            _fw8_1(X, neg_W, neg_b, U, s + t, t, ahead)
        elif lanes == 4:
            _fw4_1(X, neg_W, neg_b, U, s + t, t, ahead)
        else:
            _fw2_1(X, neg_W, neg_b, U, s + t, t, ahead)
        t += 1


@nb.njit(nogil=True, boundscheck=False, cache=True)
def _backward_lanes(X: Any, s: int, e: int, dZ: Any, dW: Any) -> None:
    """``dW[i] += Σ_t X[i, s + t] dZ[t]`` for every row ``i``: tiles of 12, 4, 1 rows."""
    lanes = dW.shape[1]
    n = X.shape[0]
    k = e - s
    i = 0
    while i + 12 <= n:
        if lanes == 8:
            _bw8_12(X, i, s, k, dZ, dW)
        elif lanes == 4:
            _bw4_12(X, i, s, k, dZ, dW)
        else:
            _bw2_12(X, i, s, k, dZ, dW)
        i += 12
    while i + 4 <= n:
        if lanes == 8:
            _bw8_4(X, i, s, k, dZ, dW)
        elif lanes == 4:
            _bw4_4(X, i, s, k, dZ, dW)
        else:
            _bw2_4(X, i, s, k, dZ, dW)
        i += 4
    while i < n:
        if lanes == 8:
            _bw8_1(X, i, s, k, dZ, dW)
        elif lanes == 4:
            _bw4_1(X, i, s, k, dZ, dW)
        else:
            _bw2_1(X, i, s, k, dZ, dW)
        i += 1


@nb.njit(nogil=True, boundscheck=False, cache=True)
def _lane_sums_any(A: Any, k: int, out: Any) -> None:
    """``out += Σ_{t<k}`` of the rows of ``len(out)`` lanes in ``A`` (flat)."""
    lanes = out.shape[0]
    if lanes == 8:
        _sums8(A, k, out)
    elif lanes == 4:
        _sums4(A, k, out)
    else:
        _sums2(A, k, out)


@nb.njit(nogil=True, boundscheck=False, cache=True)
def _block_many(
    X: Any,
    s: int,
    e: int,
    offset: int,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_W: Any,
    neg_b: Any,
    ahead: int,
    U: Any,
    losses: Any,
    y_lanes: Any,
    weight_lanes: Any,
    loss_sum: Any,
    db_sum: Any,
    dW: Any,
) -> None:
    """One block of :func:`share_sums_many`: columns ``[s, e)`` of ``X``, every group.

    The block's examples are ``[offset, offset + e - s)`` of ``y`` and
    ``weights`` (``offset = s`` for the ``(n, m)`` ``X``, the tile's first
    example for a tile). ``ahead`` (elements along a row, 0 for none) is where
    the first group's forward product prefetches the block read next: the
    next block's columns, or the same columns of a later tile. Other arguments
    as :func:`share_sums_many`.
    """
    groups, _, lanes = neg_W.shape
    k = e - s
    for t in range(k):
        for c in range(lanes):
            y_lanes[t * lanes + c] = y[offset + t]
    if weighted:
        for t in range(k):
            for c in range(lanes):
                weight_lanes[t * lanes + c] = weights[offset + t]
    if lanes == 1:
        # One model per group (see lanes_for): share_sums's loops on this block.
        zero = U.dtype.type(0)  # the single-model loops' accumulators, in X's dtype
        for g in range(groups):
            u = U[:k]
            _forward(X, neg_W[g, :, 0], -neg_b[g, 0], s, e, u)
            _pointwise_split(u, y_lanes, weight_lanes, weighted, k, losses)
            block_loss, block_db = _sums(losses, u, k)
            loss_sum[g, 0] += block_loss
            db_sum[g, 0] += block_db
            _backward(X, s, e, u, zero, dW[g, :, 0])
        return
    for g in range(groups):
        _forward_lanes(X, neg_W[g], neg_b[g], s, e, U, ahead if g == 0 else 0)
        _pointwise_split(U, y_lanes, weight_lanes, weighted, k * lanes, losses)
        _lane_sums_any(losses, k, loss_sum[g])
        _lane_sums_any(U, k, db_sum[g])
        _backward_lanes(X, s, e, U, dW[g])


@nb.njit(nogil=True, boundscheck=False, cache=True)
def share_sums_many(
    X: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_W: Any,
    neg_b: Any,
    start: int,
    stop: int,
    block: int,
    U: Any,
    losses: Any,
    y_lanes: Any,
    weight_lanes: Any,
    loss_sum: Any,
    db_sum: Any,
    dW: Any,
) -> None:
    """:func:`share_sums` for groups of ``LANES`` models: one thread's share, block by block.

    Per block ``[s, e)``, for each group ``g`` while the block is in L2
    (:func:`_block_many`)::

        U  = -(W_gᵀ Xb + b_g)     tiles of 24 examples x 8 models in registers;
                                  the next block's lines prefetched meanwhile
        l, dZ                     :func:`_pointwise_split` on U's k x 8 values
        dW_g += Xb dZᵀ            tiles of 12 rows x 8 models in registers

    ``U`` holds example ``t``'s scores of the group's models in
    ``U[t * lanes : (t + 1) * lanes]``, so the element-wise step runs over it
    as one flat array, with ``y`` (and the weights) repeated per lane. Groups
    of one lane run :func:`share_sums`'s loops instead.

    Parameters
    ----------
    X, y, weights, weighted, start, stop, block : as :func:`share_sums`
    neg_W : ndarray (G, n, lanes), ``X``'s dtype, ``-W`` by groups of ``lanes``
        (:func:`lanes_for`) models, padded with zeros
    neg_b : ndarray (G, lanes), ``X``'s dtype, ``-b``, padded with zeros
    U, y_lanes, weight_lanes : ndarray (block * LANES,), ``X``'s dtype, scratch
    losses : ndarray (block * LANES,), float64, scratch
    loss_sum, db_sum : ndarray (G, lanes), float64, zeroed by the caller; receive
        ``Σ s (softplus(z) - y z)`` and ``Σ dz`` per model
    dW : ndarray (G, n, lanes), float64, zeroed by the caller; receives ``X dZᵀ``
    """
    for s in range(start, stop, block):
        e = min(s + block, stop)
        # The next block of this share, or this one again (already cached) at its end.
        ahead = block if e < stop else 0
        _block_many(
            X, s, e, s, y, weights, weighted, neg_W, neg_b, ahead,
            U, losses, y_lanes, weight_lanes, loss_sum, db_sum, dW,
        )  # fmt: skip


# The scalar functions above as ufuncs over float64 arrays, for tests.
# Compiled with the element-wise loops' flags, so that the tests check what they run.
exp_nonpositive = nb.vectorize(["float64(float64)"], fastmath=_CONTRACT, cache=True)(
    _exp_nonpositive.py_func
)
log1p_unit = nb.vectorize(["float64(float64)"], fastmath=_CONTRACT, cache=True)(_log1p_unit.py_func)
exp_nonpositive_32 = nb.vectorize(["float32(float32)"], fastmath=_CONTRACT, cache=True)(
    _exp_nonpositive_32.py_func
)
log1p_unit_32 = nb.vectorize(["float32(float32)"], fastmath=_CONTRACT, cache=True)(
    _log1p_unit_32.py_func
)


# The single model over a TiledMatrix (lr_kernel.tiles): per tile of V lines of
# examples, the forward product over all rows with the tile's scores in V
# vector registers, the element-wise step, then the backward product into one
# vector of float64 lane sums per row (kept in L1), while the tile is in L2.
# Each product also prefetches half of the lines of the tile `ahead` elements
# on, so that the memory streams while the core computes (RESULTS.md, run 6).
def _tile_geometry(context: Any, X_type: Any) -> tuple[ir.Type, int, int]:
    element = context.get_value_type(X_type.dtype)
    size = context.get_abi_sizeof(element)
    return element, size, 64 // size


def _make_tile_forward(vectors: int) -> Any:
    """An intrinsic: a tile's ``U = -(wᵀ Xt + b)`` over all rows, ``vectors`` lines wide."""

    @intrinsic
    def tile_forward(typingctx: Any, Xt: Any, neg_w: Any, neg_b: Any, U: Any, ahead: Any) -> Any:
        """``U[:width] = neg_b + Σ_i neg_w[i] Xt[i, :]`` (``Xt`` ``(n, width)``, C order).

        The sum runs over ``i`` in order, one rounding per term (FMA). At row
        ``i`` it prefetches the first half of the row's lines ``ahead``
        elements on (the tile the share reaches next but some).
        """
        sig = types.void(Xt, neg_w, neg_b, U, types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            X_type, _, b_type = signature.args[:3]
            element, size, lanes = _tile_geometry(context, X_type)
            vt = _vector_type(element, lanes)
            Xa, Wa, Ua = _arrays(context, builder, signature, args, 0, 1, 3)
            start = _splat(builder, context.cast(builder, args[2], b_type, X_type.dtype), lanes)
            accumulators = [cgutils.alloca_once_value(builder, start) for _ in range(vectors)]
            zero = ir.Constant(ir.IntType(64), 0)
            with cgutils.for_range(builder, builder.extract_value(Xa.shape, 0)) as loop:
                i = loop.index
                w = _splat(builder, builder.load(builder.gep(Wa.data, [i])), lanes)
                x_row = _element_pointer(builder, Xa, i, zero)
                next_row = builder.gep(x_row, [args[4]])
                for line in range(vectors // 2):
                    _prefetch(builder, builder.gep(next_row, [_const(i, line * lanes)]))
                for v, acc in enumerate(accumulators):
                    x = _load(builder, builder.gep(x_row, [_const(i, v * lanes)]), vt, size)
                    builder.store(_fma(builder, x, w, builder.load(acc)), acc)
            for v, acc in enumerate(accumulators):
                target = builder.gep(Ua.data, [_const(zero, v * lanes)])
                _store(builder, builder.load(acc), target, size)
            return context.get_dummy_value()

        return sig, codegen

    return tile_forward


def _make_tile_backward(vectors: int) -> Any:
    """An intrinsic: a tile's ``X dZᵀ`` added to per-row float64 lane sums."""

    @intrinsic
    def tile_backward(typingctx: Any, Xt: Any, dZ: Any, DW: Any, ahead: Any) -> Any:
        """``DW[i, :] += Σ_v Xt[i, v-th line] * dZ[v-th line]`` for every row ``i``.

        Per row, the tile's products are summed in ``Xt``'s dtype (two chains,
        then one add: a block's rounding, as a GEMV), then added to ``DW``
        ``(n, lanes)`` float64, whose lanes the caller adds at the end. At row
        ``i`` it prefetches the second half of the row's lines ``ahead`` on.
        """
        sig = types.void(Xt, dZ, DW, types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element, size, lanes = _tile_geometry(context, signature.args[0])
            vt = _vector_type(element, lanes)
            Xa, Za, Wa = _arrays(context, builder, signature, args, 0, 1, 2)
            zero = ir.Constant(ir.IntType(64), 0)
            dz = [
                _load(builder, builder.gep(Za.data, [_const(zero, v * lanes)]), vt, size)
                for v in range(vectors)
            ]
            with cgutils.for_range(builder, builder.extract_value(Xa.shape, 0)) as loop:
                i = loop.index
                x_row = _element_pointer(builder, Xa, i, zero)
                next_row = builder.gep(x_row, [args[3]])
                for line in range(vectors // 2, vectors):
                    _prefetch(builder, builder.gep(next_row, [_const(i, line * lanes)]))
                x = [
                    _load(builder, builder.gep(x_row, [_const(i, v * lanes)]), vt, size)
                    for v in range(vectors)
                ]
                chains = [builder.fmul(x[0], dz[0]), builder.fmul(x[1], dz[1])]
                for v in range(2, vectors):
                    chains[v % 2] = _fma(builder, x[v], dz[v], chains[v % 2])
                total = builder.fadd(chains[0], chains[1])
                row = builder.gep(Wa.data, [builder.mul(i, _const(i, lanes))])
                if element == ir.DoubleType():
                    _store(builder, builder.fadd(_load(builder, row, vt, 8), total), row, 8)
                else:  # float32: sixteen lanes, added to float64 sums eight at a time
                    vt64 = _vector_type(ir.DoubleType(), 8)
                    for h in range(2):
                        indices = ir.Constant(
                            ir.VectorType(ir.IntType(32), 8), list(range(h * 8, h * 8 + 8))
                        )
                        half = builder.shuffle_vector(total, ir.Constant(vt, ir.Undefined), indices)
                        target = builder.gep(row, [_const(i, h * 8)])
                        wide = builder.fpext(half, vt64)
                        summed = builder.fadd(_load(builder, target, vt64, 8), wide)
                        _store(builder, summed, target, 8)
            return context.get_dummy_value()

        return sig, codegen

    return tile_backward


_tile_forward_24, _tile_forward_8 = (_make_tile_forward(v) for v in (24, 8))
_tile_backward_24, _tile_backward_8 = (_make_tile_backward(v) for v in (24, 8))


@nb.njit(nogil=True, boundscheck=False, cache=True)
def share_sums_tiled(
    tiles: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_w: Any,
    b: float,
    t0: int,
    t1: int,
    m: int,
    ahead_tiles: int,
    u: Any,
    losses: Any,
    curvature: Any,
    DW: Any,
) -> tuple[float, float]:
    """:func:`share_sums` over tiles ``[t0, t1)`` of a :class:`lr_kernel.tiles.TiledMatrix`,
    and for the Hessian pass each example's curvature.

    Parameters
    ----------
    tiles : C-contiguous ndarray (n_tiles, n, width), float32 or float64;
        ``width`` is 24 or 8 lines (64 bytes) of examples
    y, weights, weighted, neg_w, b : as :func:`share_sums`
    t0, t1 : int, the tiles of this share
    m : int, the examples (the last tile's columns past ``m`` are padding)
    ahead_tiles : int, how many tiles on the prefetches reach
    u : ndarray (width,), ``X``'s dtype, scratch
    losses : ndarray (width,), float64, scratch
    curvature : ndarray, float64: empty for the loss pass; else
        ``(t1 - t0) * width`` long, and ``curvature[(t - t0) * width + j]``
        receives ``s a (1 - a)`` of tile ``t``'s example ``j`` (the padding's
        entries are left as they were), for the caller's block product over
        the same tiles while they are in cache (:func:`scale_tiles`, then BLAS)
    DW : ndarray (n, 64 // itemsize), float64, zeroed by the caller; its rows'
        lane sums are ``Σ X dZᵀ``

    Returns
    -------
    loss_sum, db_sum : float, as :func:`share_sums`
    """
    n = tiles.shape[1]
    width = tiles.shape[2]
    lanes = 64 // tiles.itemsize
    stride = n * width
    loss_sum = 0.0
    db_sum = 0.0
    for t in range(t0, t1):
        s = t * width
        k = min(width, m - s)
        # Past the run's end too: the next run is taken next, by this thread or another.
        ahead = ahead_tiles * stride if t + ahead_tiles < tiles.shape[0] else 0
        if width == 24 * lanes:
            _tile_forward_24(tiles[t], neg_w, -b, u, ahead)
        else:
            _tile_forward_8(tiles[t], neg_w, -b, u, ahead)
        if curvature.shape[0]:
            o = (t - t0) * width
            _pointwise_curvature(u, y, weights, weighted, s, k, losses, curvature[o : o + k])
        else:
            # The two-loop element-wise step (float32 scores in float32): 1.4x
            # (float64) and 1.8x (float32) faster than one loop on a tile's values.
            tile_weights = weights[s : s + k] if weighted else weights
            _pointwise_split(u, y[s : s + k], tile_weights, weighted, k, losses)
        block_loss, block_db = _sums(losses, u, k)
        loss_sum += block_loss
        db_sum += block_db
        for j in range(k, width):
            u[j] = 0  # the padding's dZ: no part in X dZᵀ
        if width == 24 * lanes:
            _tile_backward_24(tiles[t], u, DW, ahead)
        else:
            _tile_backward_8(tiles[t], u, DW, ahead)
    return loss_sum, db_sum


# Groups of float32 models over tiles: examples in the lanes. Eight float32
# models fill only half of an AVX-512 register, which is what the loops above
# put in the lanes; here a register holds 16 examples of one model instead, so
# every FMA does 16 products (float64's 8 models fill a register: they keep the
# loops above). The forward product keeps `models x vectors` registers of
# scores across the rows; the backward product `rows x models` registers of
# products across the tile's examples, then adds each register's lanes (a
# transposing tree of shuffles) into the float64 gradient. In cache, one thread,
# 8 models, 100 x 384 tiles: the forward 7.4 -> 5.4 us, the backward
# 7.7 -> 6.1 us (RESULTS.md, run 7).
def _lane_sums_tree(builder: ir.IRBuilder, vectors: list[ir.Value], lanes: int) -> ir.Value:
    """One vector whose lane ``q * (lanes // len(vectors))`` is the sum of ``vectors[q]``'s lanes.

    ``len(vectors)`` is a power of two, at most ``lanes``. Each level adds the
    halves of every segment of a pair of vectors into one vector (two
    shuffles, one add); a last vector with segments of more than one lane
    adds within them.
    """
    i32 = ir.IntType(32)

    def indices(values: list[int]) -> ir.Constant:
        return ir.Constant(ir.VectorType(i32, len(values)), values)

    segment = lanes
    while len(vectors) > 1:
        half = segment // 2
        low = [o + s + t for o in (0, lanes) for s in range(0, lanes, segment) for t in range(half)]
        high = [i + half for i in low]
        vectors = [
            builder.fadd(
                builder.shuffle_vector(a, b, indices(low)),
                builder.shuffle_vector(a, b, indices(high)),
            )
            for a, b in zip(vectors[0::2], vectors[1::2], strict=True)
        ]
        segment = half
    v = vectors[0]
    while segment > 1:
        half = segment // 2
        partner = [p // segment * segment + (p % segment + half) % segment for p in range(lanes)]
        v = builder.fadd(v, builder.shuffle_vector(v, v, indices(partner)))
        segment = half
    return v


def _make_group_forward(models: int, vectors: int) -> Any:
    """An intrinsic: ``models`` models' scores of ``vectors`` lines of a tile's examples."""

    @intrinsic
    def group_forward(
        typingctx: Any, Xt: Any, neg_W: Any, neg_b: Any, U: Any, j0: Any, ahead: Any
    ) -> Any:
        """``U[c, j0 + j] = neg_b[c] + Σ_i neg_W[i, c] Xt[i, j0 + j]`` for ``j < vectors`` lines.

        ``Xt`` ``(n, width)`` C order; ``neg_W`` ``(n, models)``, ``neg_b``
        ``(models,)`` and ``U`` (flat, ``models`` rows of ``width``) in its
        dtype. The sum runs over ``i`` in order, one rounding per term (FMA).
        At row ``i`` it prefetches the same lines ``ahead`` elements on (0:
        the lines it reads).
        """
        sig = types.void(Xt, neg_W, neg_b, U, types.intp, types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element, size, lanes = _tile_geometry(context, signature.args[0])
            vt = _vector_type(element, lanes)
            Xa, Wa, ba, Ua = _arrays(context, builder, signature, args, 0, 1, 2, 3)
            j0, ahead = args[4], args[5]
            accumulators = [
                [
                    cgutils.alloca_once_value(
                        builder,
                        _splat(builder, builder.load(builder.gep(ba.data, [_const(j0, c)])), lanes),
                    )
                    for _ in range(vectors)
                ]
                for c in range(models)
            ]
            with cgutils.for_range(builder, builder.extract_value(Xa.shape, 0)) as loop:
                i = loop.index
                x_row = _element_pointer(builder, Xa, i, j0)
                next_row = builder.gep(x_row, [ahead])
                for v in range(vectors):
                    _prefetch(builder, builder.gep(next_row, [_const(i, v * lanes)]))
                x = [
                    _load(builder, builder.gep(x_row, [_const(i, v * lanes)]), vt, size)
                    for v in range(vectors)
                ]
                w_row = builder.gep(Wa.data, [builder.mul(i, _const(i, models))])
                for c, row in enumerate(accumulators):
                    w = _splat(builder, builder.load(builder.gep(w_row, [_const(i, c)])), lanes)
                    for xv, acc in zip(x, row, strict=True):
                        builder.store(_fma(builder, xv, w, builder.load(acc)), acc)
            width = builder.extract_value(Xa.shape, 1)
            for c, row in enumerate(accumulators):
                start = builder.add(builder.mul(_const(j0, c), width), j0)
                for v, acc in enumerate(row):
                    target = builder.gep(Ua.data, [builder.add(start, _const(j0, v * lanes))])
                    _store(builder, builder.load(acc), target, size)
            return context.get_dummy_value()

        return sig, codegen

    return group_forward


def _make_group_backward(models: int, rows: int) -> Any:
    """An intrinsic: ``rows`` rows of a tile's ``X dZᵀ`` for ``models`` models."""

    @intrinsic
    def group_backward(typingctx: Any, Xt: Any, dZ: Any, dW: Any, i0: Any) -> Any:
        """``dW[i0 + r, c] += Σ_j Xt[i0 + r, j] dZ[c, j]`` for ``r < rows``, ``c < models``.

        ``dZ`` flat, ``models`` rows of the tile's ``width`` (a multiple of a
        line), in ``Xt``'s dtype; ``dW`` ``(n, models)`` float64. Each lane
        sums every ``lanes``-th product in ``Xt``'s dtype, the lanes are then
        added in a tree (:func:`_lane_sums_tree`) and the sum in float64.
        """
        sig = types.void(Xt, dZ, dW, types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            element, size, lanes = _tile_geometry(context, signature.args[0])
            vt = _vector_type(element, lanes)
            Xa, Za, Wa = _arrays(context, builder, signature, args, 0, 1, 2)
            i0 = args[3]
            width = builder.extract_value(Xa.shape, 1)
            x_rows = [
                _element_pointer(builder, Xa, builder.add(i0, _const(i0, r)), _const(i0, 0))
                for r in range(rows)
            ]
            accumulators = [
                [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(models)]
                for _ in range(rows)
            ]
            with cgutils.for_range(builder, builder.sdiv(width, _const(width, lanes))) as loop:
                j = builder.mul(loop.index, _const(i0, lanes))
                dz = [
                    _load(
                        builder,
                        builder.gep(Za.data, [builder.add(builder.mul(_const(j, c), width), j)]),
                        vt,
                        size,
                    )
                    for c in range(models)
                ]
                for x_row, row in zip(x_rows, accumulators, strict=True):
                    x = _load(builder, builder.gep(x_row, [j]), vt, size)
                    for dzc, acc in zip(dz, row, strict=True):
                        builder.store(_fma(builder, x, dzc, builder.load(acc)), acc)
            # dW's rows i0.. are rows x models contiguous float64, in the accumulators' order.
            products = [builder.load(acc) for row in accumulators for acc in row]
            target_row = builder.gep(Wa.data, [builder.mul(i0, _const(i0, models))])
            i32 = ir.IntType(32)
            for g in range(0, len(products), lanes):
                group = products[g : g + lanes]
                sums = _lane_sums_tree(builder, group, lanes)
                step = lanes // len(group)
                for h in range(0, len(group), 8):
                    chosen = [q * step for q in range(h, min(h + 8, len(group)))]
                    part = builder.shuffle_vector(
                        sums, sums, ir.Constant(ir.VectorType(i32, len(chosen)), chosen)
                    )
                    if element != ir.DoubleType():
                        part = builder.fpext(part, _vector_type(ir.DoubleType(), len(chosen)))
                    target = builder.gep(target_row, [_const(i0, g + h)])
                    _store(
                        builder, builder.fadd(_load(builder, target, part.type, 8), part), target, 8
                    )
            return context.get_dummy_value()

        return sig, codegen

    return group_backward


# (models, vectors) of the forward product and (models, rows) of the backward:
# 16 accumulators, with the operands 19-26 of the 32 registers (24
# accumulators spilled: 8 models x 3 rows was 1.15x slower).
_gf8, _gf4, _gf2 = (_make_group_forward(c, 16 // c) for c in (8, 4, 2))
_gb8, _gb4, _gb2 = (_make_group_backward(c, 16 // c) for c in (8, 4, 2))
_gb8_1, _gb4_1, _gb2_1 = (_make_group_backward(c, 1) for c in (8, 4, 2))


@nb.njit(cache=True)
def examples_in_lanes(itemsize: int, lanes: int, width: int) -> bool:
    """Whether :func:`share_sums_many_tiled` puts examples in the lanes: float32
    groups of 2-8 models on tiles whose width is a multiple of a forward call's
    ``16 // lanes`` lines (the tiles of :func:`lr_kernel.tiles.tile_width` are)."""
    return itemsize == 4 and lanes > 1 and width % (16 * (16 // lanes)) == 0


@nb.njit(nogil=True, boundscheck=False, cache=True)
def _tile_groups_32(
    tile: Any,
    k: int,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_W: Any,
    neg_b: Any,
    ahead: int,
    U: Any,
    losses: Any,
    loss_sum: Any,
    db_sum: Any,
    dW: Any,
) -> None:
    """One tile of :func:`share_sums_many_tiled` with examples in the lanes (float32).

    Per group: ``U`` (``lanes`` rows of the tile's ``width``) from the forward
    product, the element-wise step on each model's ``k`` examples (``y`` and
    ``weights`` are the tile's), their sums, ``dZ = 0`` on the padding, then
    the backward product. The first group's forward product prefetches
    ``ahead`` elements on. ``losses`` is float32 scratch (the element-wise
    step in float32, summed in float64); other arguments as :func:`share_sums_many`.
    """
    groups, n, lanes = neg_W.shape
    width = tile.shape[1]
    step = (16 // lanes) * 16  # examples per forward call
    for g in range(groups):
        reach = ahead if g == 0 else 0
        for j0 in range(0, width, step):
            if lanes == 8:
                _gf8(tile, neg_W[g], neg_b[g], U, j0, reach)
            elif lanes == 4:
                _gf4(tile, neg_W[g], neg_b[g], U, j0, reach)
            else:
                _gf2(tile, neg_W[g], neg_b[g], U, j0, reach)
        for c in range(lanes):
            u = U[c * width : c * width + k]
            model_losses = losses[c * width : c * width + k]
            _pointwise_split(u, y, weights, weighted, k, model_losses)
            block_loss, block_db = _sums(model_losses, u, k)
            loss_sum[g, c] += block_loss
            db_sum[g, c] += block_db
            for j in range(k, width):
                U[c * width + j] = 0  # the padding's dZ: no part in X dZᵀ
        rows = 16 // lanes
        i = 0
        while i + rows <= n:
            if lanes == 8:
                _gb8(tile, U, dW[g], i)
            elif lanes == 4:
                _gb4(tile, U, dW[g], i)
            else:
                _gb2(tile, U, dW[g], i)
            i += rows
        while i < n:
            if lanes == 8:
                _gb8_1(tile, U, dW[g], i)
            elif lanes == 4:
                _gb4_1(tile, U, dW[g], i)
            else:
                _gb2_1(tile, U, dW[g], i)
            i += 1


@nb.njit(nogil=True, boundscheck=False, cache=True)
def share_sums_many_tiled(
    tiles: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_W: Any,
    neg_b: Any,
    t0: int,
    t1: int,
    m: int,
    ahead_tiles: int,
    U: Any,
    losses: Any,
    y_lanes: Any,
    weight_lanes: Any,
    loss_sum: Any,
    db_sum: Any,
    dW: Any,
) -> None:
    """:func:`share_sums_many` over tiles ``[t0, t1)`` of a :class:`lr_kernel.tiles.TiledMatrix`.

    Each tile is a block (:func:`_block_many` on ``tiles[t]``, its columns
    ``[0, k)``): read from memory by the first group's forward product, which
    prefetches the same lines ``ahead_tiles`` tiles on, then from L2 by the
    other products. The last tile's columns past ``m`` (padding) add no loss
    and no ``dZ``. Float32 groups put examples in the lanes
    (:func:`_tile_groups_32`, where :func:`examples_in_lanes`), float64
    groups their models (:func:`_block_many`). One model (``lanes == 1``) runs
    :func:`share_sums_tiled`, the single model's tile loop (which zeroes the
    padding's ``dZ``), where the tiles are 24 or 8 lines wide
    (:func:`lr_kernel.tiles.tile_width`'s), else :func:`share_sums`'s loops
    tile by tile.

    Parameters
    ----------
    tiles : C-contiguous ndarray (n_tiles, n, width), float32 or float64
    t0, t1, m, ahead_tiles : as :func:`share_sums_tiled`
    U, y_lanes, weight_lanes : ndarray (width * LANES,), ``X``'s dtype, scratch
    losses : ndarray (width * LANES,), float64, scratch
    y, weights, weighted, neg_W, neg_b, loss_sum, db_sum, dW : as :func:`share_sums_many`
    """
    groups, n, lanes = neg_W.shape
    width = tiles.shape[2]
    line = 64 // tiles.itemsize
    if lanes == 1 and (width == 24 * line or width == 8 * line):
        lane_sums = np.zeros((n, line))  # (n, lanes of a line), float64
        for g in range(groups):
            lane_sums[:] = 0.0
            block_loss, block_db = share_sums_tiled(
                tiles, y, weights, weighted, neg_W[g, :, 0], -float(neg_b[g, 0]), t0, t1, m,
                ahead_tiles, U[:width], losses[:width], losses[:0], lane_sums,
            )  # fmt: skip
            loss_sum[g, 0] += block_loss
            db_sum[g, 0] += block_db
            for i in range(n):
                dW[g, i, 0] += lane_sums[i].sum()
        return
    stride = n * width  # elements from a row of one tile to the same row of the next
    in_lanes = examples_in_lanes(tiles.itemsize, lanes, width)
    for t in range(t0, t1):
        offset = t * width
        k = min(width, m - offset)
        # Past the run's end too: the next run is taken next, by this thread or another.
        ahead = ahead_tiles * stride if t + ahead_tiles < tiles.shape[0] else 0
        if in_lanes:
            # y_lanes (float32, unused by these loops) holds their float32 losses.
            tile_weights = weights[offset : offset + k] if weighted else weights
            _tile_groups_32(
                tiles[t], k, y[offset : offset + k], tile_weights, weighted, neg_W, neg_b,
                ahead, U, y_lanes, loss_sum, db_sum, dW,
            )  # fmt: skip
        else:
            _block_many(
                tiles[t], 0, k, offset, y, weights, weighted, neg_W, neg_b, ahead,
                U, losses, y_lanes, weight_lanes, loss_sum, db_sum, dW,
            )  # fmt: skip


@nb.njit(nogil=True, boundscheck=False, fastmath=_CONTRACT, cache=True)
def scale_tiles(tiles: Any, t0: int, t1: int, m: int, scale: Any, B: Any) -> None:
    """``B[:n, :k] = X[:, t0 w : t0 w + k] diag(scale[:k])`` from tiles ``[t0, t1)``.

    ``k`` is the tiles' examples (less the padding); ``B`` is ``(n + 1, >= k)``
    C-contiguous in ``X``'s dtype; ``scale`` float64. One pass over the tiles
    (from cache, after :func:`share_sums_tiled` with the curvature), no other copy of ``X``.
    """
    n = tiles.shape[1]
    width = tiles.shape[2]
    for t in range(t0, t1):
        o = (t - t0) * width
        k = min(width, m - t * width)
        for i in range(n):
            for j in range(k):
                B[i, o + j] = tiles[t, i, j] * scale[o + j]

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

Importing this module imports numba and defines the kernels; each dtype is
compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
from llvmlite import ir
from numba import types
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


@intrinsic
def _float_from_bits(typingctx: Any, bits: Any) -> Any:
    """The float64 whose IEEE-754 representation is ``bits`` (an int64)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _bits_of_float(typingctx: Any, x: Any) -> Any:
    """The IEEE-754 representation of the float64 ``x``, as an int64."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


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
    # (mypy reads numba's intrinsics as taking the typing context too.)
    k: int = _bits_of_float(t) - _bits_of_float(_ROUND)  # type: ignore[call-arg]
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


@nb.njit(inline="always", nogil=True, boundscheck=False, cache=True)
def _add8(
    out: Any, i: int, a0: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any, a6: Any, a7: Any
) -> None:
    """``out[i:i+8] += (a0, ..., a7)``."""
    out[i] += a0
    out[i + 1] += a1
    out[i + 2] += a2
    out[i + 3] += a3
    out[i + 4] += a4
    out[i + 5] += a5
    out[i + 6] += a6
    out[i + 7] += a7


@nb.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)
def _forward_many(X: Any, neg_WT: Any, b: Any, s: int, e: int, U: Any) -> None:
    """``U[c, :e-s] = -(W[:, c]ᵀ X[:, s:e] + b[c])`` for each model ``c`` of ``neg_WT``.

    Eight rows of the block per step, and every model's sweep of its ``U`` row
    while those rows are in L1: the block is read from memory once for all
    models. Models go in pairs, so that each element of ``X`` loaded feeds two
    multiply-adds (one per model loads as many values as it multiplies, and the
    loads set the pace: 1.6x slower).
    """
    n = X.shape[0]
    K = neg_WT.shape[0]
    k = e - s
    n8 = n - n % 8
    for c in range(K):
        u = U[c]
        bc = b[c]
        for j in range(k):
            u[j] = -bc
    for i in range(0, n8, 8):
        r0, r1, r2, r3 = X[i, s:e], X[i + 1, s:e], X[i + 2, s:e], X[i + 3, s:e]
        r4, r5, r6, r7 = X[i + 4, s:e], X[i + 5, s:e], X[i + 6, s:e], X[i + 7, s:e]
        for c in range(0, K - 1, 2):
            v, q = neg_WT[c], neg_WT[c + 1]
            w0, w1, w2, w3 = v[i], v[i + 1], v[i + 2], v[i + 3]
            w4, w5, w6, w7 = v[i + 4], v[i + 5], v[i + 6], v[i + 7]
            p0, p1, p2, p3 = q[i], q[i + 1], q[i + 2], q[i + 3]
            p4, p5, p6, p7 = q[i + 4], q[i + 5], q[i + 6], q[i + 7]
            u, t = U[c], U[c + 1]
            for j in range(k):
                x0, x1, x2, x3 = r0[j], r1[j], r2[j], r3[j]
                x4, x5, x6, x7 = r4[j], r5[j], r6[j], r7[j]
                u[j] += (w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3) + (
                    w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7
                )
                t[j] += (p0 * x0 + p1 * x1 + p2 * x2 + p3 * x3) + (
                    p4 * x4 + p5 * x5 + p6 * x6 + p7 * x7
                )
        if K % 2:
            v = neg_WT[K - 1]
            w0, w1, w2, w3 = v[i], v[i + 1], v[i + 2], v[i + 3]
            w4, w5, w6, w7 = v[i + 4], v[i + 5], v[i + 6], v[i + 7]
            u = U[K - 1]
            for j in range(k):
                u[j] += (w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j]) + (
                    w4 * r4[j] + w5 * r5[j] + w6 * r6[j] + w7 * r7[j]
                )
    for i in range(n8, n):
        r0 = X[i, s:e]
        for c in range(K):
            wi = neg_WT[c, i]
            u = U[c]
            for j in range(k):
                u[j] += wi * r0[j]


@nb.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)
def _backward_many(X: Any, s: int, e: int, dZ: Any, K: int, zero: Any, dW: Any) -> None:
    """``dW[c] += X[:, s:e] @ dZ[c, :e-s]`` for ``c < K``, eight rows per step.

    Accumulators as :func:`_backward`'s: ``X``'s dtype within the block,
    float64 across blocks in ``dW`` of shape ``(K, n)``. Models in pairs, as in
    :func:`_forward_many`.
    """
    n = X.shape[0]
    k = e - s
    n8 = n - n % 8
    for i in range(0, n8, 8):
        r0, r1, r2, r3 = X[i, s:e], X[i + 1, s:e], X[i + 2, s:e], X[i + 3, s:e]
        r4, r5, r6, r7 = X[i + 4, s:e], X[i + 5, s:e], X[i + 6, s:e], X[i + 7, s:e]
        for c in range(0, K - 1, 2):
            dz, dq = dZ[c], dZ[c + 1]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero
            for j in range(k):
                d, g = dz[j], dq[j]
                x0, x1, x2, x3 = r0[j], r1[j], r2[j], r3[j]
                x4, x5, x6, x7 = r4[j], r5[j], r6[j], r7[j]
                a0 += x0 * d
                a1 += x1 * d
                a2 += x2 * d
                a3 += x3 * d
                a4 += x4 * d
                a5 += x5 * d
                a6 += x6 * d
                a7 += x7 * d
                b0 += x0 * g
                b1 += x1 * g
                b2 += x2 * g
                b3 += x3 * g
                b4 += x4 * g
                b5 += x5 * g
                b6 += x6 * g
                b7 += x7 * g
            _add8(dW[c], i, a0, a1, a2, a3, a4, a5, a6, a7)
            _add8(dW[c + 1], i, b0, b1, b2, b3, b4, b5, b6, b7)
        if K % 2:
            dz = dZ[K - 1]
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
            _add8(dW[K - 1], i, a0, a1, a2, a3, a4, a5, a6, a7)
    for i in range(n8, n):
        r0 = X[i, s:e]
        for c in range(K):
            dz = dZ[c]
            a0 = zero
            for j in range(k):
                a0 += r0[j] * dz[j]
            dW[c, i] += a0


@nb.njit(nogil=True, boundscheck=False, cache=True)
def share_sums_many(
    X: Any,
    y: Any,
    weights: Any,
    weighted: bool,
    neg_WT: Any,
    b: Any,
    start: int,
    stop: int,
    block: int,
    U: Any,
    losses: Any,
    loss_sum: Any,
    db_sum: Any,
    dW: Any,
) -> None:
    """:func:`share_sums` for ``K`` models: one thread's share, block by block.

    Per block, both products for every model while the block is in cache:
    :func:`_forward_many`, then per model the element-wise step of
    :func:`share_sums` on its row of ``U``, then :func:`_backward_many`.

    Parameters
    ----------
    X, y, weights, weighted, start, stop, block : as :func:`share_sums`
    neg_WT : ndarray (K, n), ``X``'s dtype, ``-Wᵀ``
    b : ndarray (K,), ``X``'s dtype, the intercepts
    U : ndarray (K', block), ``X``'s dtype, ``K' >= K``, scratch
    losses : ndarray (block,), float64, scratch
    loss_sum, db_sum : ndarray (K,), float64, zeroed by the caller; receive
        ``Σ s (softplus(z) - y z)`` and ``Σ dz`` per model
    dW : ndarray (K, n), float64, zeroed by the caller; receives ``(X dZᵀ)ᵀ``
    """
    K = neg_WT.shape[0]
    zero = U.dtype.type(0)  # X's dtype
    for s in range(start, stop, block):
        e = min(s + block, stop)
        k = e - s
        _forward_many(X, neg_WT, b, s, e, U)
        for c in range(K):
            u = U[c]
            if weighted:
                _pointwise_weighted(u, y, weights, s, k, losses)
            else:
                _pointwise(u, y, s, k, losses)
            block_loss, block_db = _sums(losses, u, k)
            loss_sum[c] += block_loss
            db_sum[c] += block_db
        _backward_many(X, s, e, U, K, zero, dW)


# The scalar functions above as ufuncs over float64 arrays, for tests.
# Compiled with the element-wise loops' flags, so that the tests check what they run.
exp_nonpositive = nb.vectorize(["float64(float64)"], fastmath=_CONTRACT, cache=True)(
    _exp_nonpositive.py_func
)
log1p_unit = nb.vectorize(["float64(float64)"], fastmath=_CONTRACT, cache=True)(_log1p_unit.py_func)

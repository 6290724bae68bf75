"""The training loop (the only loop: over iterations), its stop rules and FitResult."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lr_kernel.loss import FloatArray, loss_and_gradients

StopReason = Literal["iterations", "tolerance", "diverged"]

# A rise of the cost larger than rounding, this many updates in a row, is divergence.
# One rise alone is not: near the optimum the cost moves by a few ulps either way.
DIVERGENCE_PATIENCE = 3


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    w : ndarray of shape (n_features, 1)
        Final weights (those whose cost is ``cost_history[-1]``).
    b : float
        Final intercept.
    cost_history : ndarray of shape (n_iterations + 1,), float64
        ``cost_history[i]`` is the cost before update ``i + 1``.
    gradient_norm_history : ndarray of shape (n_iterations + 1,), float64
        Euclidean norm of ``(dw, db)`` at the same parameters.
    n_iterations : int
        Updates applied.
    converged : bool
        True when the tolerance rule stopped the run.
    stop_reason : {"iterations", "tolerance", "diverged"}
        ``"diverged"``: the cost became NaN or infinite, rose above the initial
        cost, or rose for ``DIVERGENCE_PATIENCE`` updates in a row. A step that is
        stable for this data (below 2/L) lowers the cost at every update, so each
        of these means the learning rate is too large; the parameters are then
        not usable.
    """

    w: FloatArray
    b: float
    cost_history: FloatArray
    gradient_norm_history: FloatArray
    n_iterations: int
    converged: bool
    stop_reason: StopReason


def fit(
    X: FloatArray,
    Y: FloatArray,
    *,
    learning_rate: float,
    iterations: int,
    l2: float = 0.0,
    tol: float = 0.0,
    w0: FloatArray | None = None,
    b0: float = 0.0,
    callback: Callable[[int, float], None] | None = None,
    monitor: Callable[[int, FloatArray, float], None] | None = None,
) -> FitResult:
    """Full-batch gradient descent on the regularized log-loss.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples)
        Column-stacked, float32 or float64; never written.
    Y : ndarray of shape (1, n_examples)
        0.0/1.0 labels in ``X``'s dtype.
    learning_rate : float
        Step size ``alpha`` of ``w -= alpha * dw``; must be > 0.
    iterations : int
        Most updates to apply; must be >= 1.
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    tol : float, default 0.0
        Stop when ``|J_k - J_{k-1}| < tol`` (0 disables the rule).
    w0 : ndarray of shape (n_features, 1), optional
        Initial weights (zeros by default); copied, never modified.
    b0 : float, default 0.0
        Initial intercept.
    callback : callable ``(iteration, cost) -> None``, optional
        Called after each update with the update's number (from 1) and the new cost;
        also once with ``(0, initial cost)``.
    monitor : callable ``(iteration, w, b) -> None``, optional
        Called at the same points as ``callback`` with the parameters whose cost
        that is (e.g. to track a held-out cost). ``w`` is the live
        ``(n_features, 1)`` array: read it, never keep or modify it.

    Returns
    -------
    FitResult
    """
    n, m = X.shape
    if Y.shape != (1, m):
        raise ValueError(f"Y must have shape (1, {m}), got {Y.shape}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate}")
    if not l2 >= 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be >= 0 and finite, got {l2}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if w0 is None:
        w = np.zeros((n, 1), dtype=X.dtype)
    else:
        if w0.shape != (n, 1):
            raise ValueError(f"w0 must have shape ({n}, 1), got {w0.shape}")
        w = np.array(w0, dtype=X.dtype)
    b = float(b0)
    # Rounding noise on a float64-summed cost whose terms are in X's dtype.
    rise_rtol = 64 * float(np.finfo(X.dtype).eps)

    cost, dw, db = loss_and_gradients(X, Y, w, b, l2)
    costs = [cost]
    grad_norms = [math.hypot(float(np.linalg.norm(dw)), db)]
    if callback is not None:
        callback(0, cost)
    if monitor is not None:
        monitor(0, w, b)
    stop_reason: StopReason = "iterations"
    rises = 0
    iteration = 0
    for iteration in range(1, iterations + 1):
        w -= learning_rate * dw
        b -= learning_rate * db
        previous = cost
        cost, dw, db = loss_and_gradients(X, Y, w, b, l2)
        costs.append(cost)
        grad_norms.append(math.hypot(float(np.linalg.norm(dw)), db))
        if callback is not None:
            callback(iteration, cost)
        if monitor is not None:
            monitor(iteration, w, b)
        if not math.isfinite(cost) or not math.isfinite(grad_norms[-1]):
            stop_reason = "diverged"
            break
        rises = rises + 1 if cost > previous + rise_rtol * abs(previous) else 0
        if rises >= DIVERGENCE_PATIENCE or cost > costs[0] + rise_rtol * abs(costs[0]):
            stop_reason = "diverged"
            break
        if abs(cost - previous) < tol:
            stop_reason = "tolerance"
            break
    return FitResult(
        w=w,
        b=b,
        cost_history=np.asarray(costs, dtype=np.float64),
        gradient_norm_history=np.asarray(grad_norms, dtype=np.float64),
        n_iterations=iteration,
        converged=stop_reason == "tolerance",
        stop_reason=stop_reason,
    )

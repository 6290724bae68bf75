"""The loop formulations of the same math: test oracles and the speed baseline.

Written as in the course notes, one Python operation at a time, so that the
vectorized kernel can be checked against an independent implementation. Far too
slow for real data; do not use them outside tests and benchmarks.
"""

import math

import numpy as np

from lr_kernel.loss import FloatArray


def _log_loss(z: float, y: float) -> float:
    # -(y log a + (1 - y) log(1 - a)) with a = sigmoid(z), as softplus(z) - y z so
    # that the oracle stays finite where the textbook form would take log(0).
    return max(z, 0.0) + math.log1p(math.exp(-abs(z))) - y * z


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _weight(sample_weight: FloatArray | None, i: int) -> float:
    return 1.0 if sample_weight is None else float(sample_weight[0, i])


def loss_and_gradients_loop(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    l2: float = 0.0,
    sample_weight: FloatArray | None = None,
) -> tuple[float, FloatArray, float]:
    """One loop over examples, features as vectors ("one loop" of the notes).

    Same arguments and results as :func:`lr_kernel.loss_and_gradients`; with
    ``sample_weight`` (shape ``(1, m)``) example ``i`` counts ``s_i`` times and
    the sums are divided by ``Σ s`` instead of ``m``.
    """
    n, m = X.shape
    total = 0.0
    J = 0.0
    dw = np.zeros((n, 1))
    db = 0.0
    w_t = np.asarray(w.T, dtype=np.float64)  # (1, n), float64 sums whatever X's dtype
    for i in range(m):
        x_i = np.asarray(X[:, i : i + 1], dtype=np.float64)  # (n, 1), a view for float64
        z_i = (w_t @ x_i).item() + b
        a_i = _sigmoid(z_i)
        s_i = _weight(sample_weight, i)
        total += s_i
        J += s_i * _log_loss(z_i, float(Y[0, i]))
        dz_i = s_i * (a_i - float(Y[0, i]))
        dw += x_i * dz_i
        db += dz_i
    J = J / total + l2 / (2 * total) * float(np.sum(w.astype(np.float64) ** 2))
    dw = dw / total + (l2 / total) * w
    return J, dw, db / total


def loss_and_gradients_double_loop(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    l2: float = 0.0,
    sample_weight: FloatArray | None = None,
) -> tuple[float, FloatArray, float]:
    """Two loops, over examples and then features, all scalars ("two loops").

    Same arguments and results as :func:`loss_and_gradients_loop`.
    """
    n, m = X.shape
    total = 0.0
    J = 0.0
    dw = [0.0] * n
    db = 0.0
    for i in range(m):
        z_i = b
        for j in range(n):
            z_i += float(w[j, 0]) * float(X[j, i])
        a_i = _sigmoid(z_i)
        y_i = float(Y[0, i])
        s_i = _weight(sample_weight, i)
        total += s_i
        J += s_i * _log_loss(z_i, y_i)
        dz_i = s_i * (a_i - y_i)
        for j in range(n):
            dw[j] += float(X[j, i]) * dz_i
        db += dz_i
    penalty = 0.0
    for j in range(n):
        penalty += float(w[j, 0]) ** 2
    J = J / total + l2 / (2 * total) * penalty
    grad = np.array([[dw[j] / total + l2 / total * float(w[j, 0])] for j in range(n)])
    return J, grad, db / total

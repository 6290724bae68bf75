"""The forward pass, the cost and its gradients: one vectorized pass, no loops."""

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating]


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


def loss_and_gradients(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    l2: float = 0.0,
) -> tuple[float, FloatArray, float]:
    """Cost and its gradients at ``(w, b)``, fused: the forward pass is shared.

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

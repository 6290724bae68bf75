"""Classification metrics computed from scores, in NumPy alone."""

import numpy as np

from lr_kernel.loss import FloatArray


def binary_metrics(Z: FloatArray, Y: FloatArray, threshold: float = 0.5) -> dict[str, float]:
    """Log-loss and accuracy of scores ``Z`` against 0/1 labels ``Y``.

    Parameters
    ----------
    Z : ndarray of shape (1, n_examples)
        Scores ``wᵀX + b`` (log-odds), not probabilities: the log-loss is computed
        as ``softplus(Z) - Y Z``, finite however confident a wrong prediction is.
    Y : ndarray of shape (1, n_examples)
        Labels, 0.0 or 1.0.
    threshold : float, default 0.5
        Probability at or above which an example is predicted positive.

    Returns
    -------
    dict with ``log_loss``, ``accuracy``, ``n_examples`` and ``positive_rate``.
    """
    Z64 = Z.astype(np.float64, copy=False)
    Y64 = Y.astype(np.float64, copy=False)
    losses = np.maximum(Z64, 0.0) + np.log1p(np.exp(-np.abs(Z64))) - Y64 * Z64  # (1, m)
    # sigmoid(Z) >= t  <=>  Z >= logit(t), with no rounding of the probability.
    if threshold <= 0.0:
        predicted = np.ones_like(Y64, dtype=bool)
    elif threshold >= 1.0:
        predicted = np.zeros_like(Y64, dtype=bool)
    else:
        predicted = Z64 >= np.log(threshold) - np.log1p(-threshold)
    return {
        "log_loss": float(np.mean(losses)),
        "accuracy": float(np.mean(predicted == (Y64 == 1.0))),
        "n_examples": float(Y64.shape[1]),
        "positive_rate": float(np.mean(Y64)),
    }

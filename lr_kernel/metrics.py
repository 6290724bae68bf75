"""Classification metrics computed from scores, in NumPy alone."""

import numpy as np

from lr_kernel.loss import FloatArray

METRIC_NAMES = (
    "log_loss",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "n_examples",
    "positive_rate",
)


def _weights(sample_weight: FloatArray | None, size: int) -> FloatArray | None:
    """``sample_weight`` as a float64 ``(size,)`` vector, or None."""
    if sample_weight is None:
        return None
    s = np.asarray(sample_weight, dtype=np.float64).reshape(-1)  # (m,)
    if s.size != size:
        raise ValueError(f"sample_weight must have {size} entries, got {s.size}")
    return s


def log_loss(Z: FloatArray, Y: FloatArray, sample_weight: FloatArray | None = None) -> float:
    """Mean log-loss of scores ``Z`` against 0/1 labels ``Y``, with no penalty term.

    Parameters
    ----------
    Z : ndarray of shape (1, n_examples)
        Scores ``wᵀX + b`` (log-odds), not probabilities: the loss is computed as
        ``softplus(Z) - Y Z``, finite however confident a wrong prediction is.
    Y : ndarray of shape (1, n_examples)
        Labels, 0.0 or 1.0.
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s``: the mean becomes ``Σ s ℓ / Σ s``.

    Returns
    -------
    float, in float64 whatever the inputs' dtype.
    """
    Z64 = Z.astype(np.float64, copy=False)
    losses = np.maximum(Z64, 0.0) + np.log1p(np.exp(-np.abs(Z64))) - Y * Z64  # (1, m)
    s = _weights(sample_weight, losses.size)
    if s is None:
        return float(np.mean(losses))
    return float(np.dot(losses.reshape(-1), s) / np.sum(s))


def roc_auc(Z: FloatArray, Y: FloatArray, sample_weight: FloatArray | None = None) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative.

    Rank-based (Mann-Whitney U): a tied positive/negative pair counts one half,
    which is what the trapezoidal area under scikit-learn's ROC curve gives.
    Unweighted, counts are summed in integers, so the result is exact up to one
    division; with weights, a pair counts ``s_i s_j`` (as scikit-learn's
    ``roc_auc_score(..., sample_weight=s)``).

    Parameters
    ----------
    Z : ndarray of shape (1, n_examples) or (n_examples,)
        Any scores that order the examples (log-odds or probabilities).
    Y : ndarray of the same size
        Labels, 0.0 or 1.0.
    sample_weight : ndarray of the same size, optional
        Row weights.

    Returns
    -------
    float in ``[0, 1]``; NaN when ``Y`` holds only one class (with positive
    weight): the area is undefined.
    """
    scores = np.ravel(Z)
    positive = np.ravel(Y) == 1.0
    s = _weights(sample_weight, scores.size)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_positive = positive[order]
    # Group equal scores: `starts` are the first index of each run of ties.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    if s is None:
        positives_in_group = np.add.reduceat(sorted_positive.astype(np.int64), starts)
        sizes = np.diff(np.r_[starts, scores.size])
        negatives_in_group = sizes - positives_in_group
    else:
        sorted_weights = s[order]
        positives_in_group = np.add.reduceat(sorted_weights * sorted_positive, starts)
        negatives_in_group = np.add.reduceat(sorted_weights * ~sorted_positive, starts)
    total_positive = positives_in_group.sum()
    total_negative = negatives_in_group.sum()
    if total_positive == 0 or total_negative == 0:
        return float("nan")
    negatives_below = np.cumsum(negatives_in_group) - negatives_in_group
    # Each positive beats every negative in a lower group and ties half of its own.
    twice_wins = np.sum(
        2 * positives_in_group * negatives_below + positives_in_group * negatives_in_group
    )
    if s is None:
        return float(int(twice_wins) / (2 * int(total_positive) * int(total_negative)))
    return float(twice_wins / (2 * total_positive * total_negative))


def binary_metrics(
    Z: FloatArray,
    Y: FloatArray,
    threshold: float = 0.5,
    sample_weight: FloatArray | None = None,
) -> dict[str, float]:
    """Every metric of the output contract, from scores ``Z`` and 0/1 labels ``Y``.

    Parameters
    ----------
    Z : ndarray of shape (1, n_examples)
        Scores ``wᵀX + b`` (log-odds), not probabilities.
    Y : ndarray of shape (1, n_examples)
        Labels, 0.0 or 1.0.
    threshold : float, default 0.5
        Probability at or above which an example is predicted positive.
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s``: every metric but ``n_examples`` counts example ``i``
        ``s_i`` times (scikit-learn's ``sample_weight`` in its metrics).

    Returns
    -------
    dict with the keys of ``METRIC_NAMES``, in that order. ``precision`` is 0.0
    when nothing is predicted positive, ``recall`` when there is no positive and
    ``f1`` when both are 0 (scikit-learn's ``zero_division`` default);
    ``roc_auc`` is NaN when ``Y`` holds one class. ``n_examples`` is the number
    of rows, weighted or not.
    """
    Z64 = Z.astype(np.float64, copy=False)
    Y64 = Y.astype(np.float64, copy=False)
    # sigmoid(Z) >= t  <=>  Z >= logit(t), with no rounding of the probability.
    if threshold <= 0.0:
        predicted = np.ones_like(Y64, dtype=bool)
    elif threshold >= 1.0:
        predicted = np.zeros_like(Y64, dtype=bool)
    else:
        predicted = Z64 >= np.log(threshold) - np.log1p(-threshold)
    actual = Y64 == 1.0
    s = _weights(sample_weight, Y64.size)
    true_positives: float
    n_predicted: float
    n_actual: float
    if s is None:
        true_positives = int(np.count_nonzero(predicted & actual))
        n_predicted = int(np.count_nonzero(predicted))
        n_actual = int(np.count_nonzero(actual))
        accuracy = float(np.mean(predicted == actual))
        positive_rate = float(np.mean(Y64))
    else:
        total = float(np.sum(s))
        true_positives = float(np.dot(s, (predicted & actual).reshape(-1)))
        n_predicted = float(np.dot(s, predicted.reshape(-1)))
        n_actual = float(np.dot(s, actual.reshape(-1)))
        accuracy = float(np.dot(s, (predicted == actual).reshape(-1))) / total
        positive_rate = n_actual / total
    precision = true_positives / n_predicted if n_predicted else 0.0
    recall = true_positives / n_actual if n_actual else 0.0
    # 2 TP / (2 TP + FP + FN), the same value as 2 P R / (P + R) with one rounding.
    f1 = 2 * true_positives / (n_predicted + n_actual) if true_positives else 0.0
    return {
        "log_loss": log_loss(Z64, Y64, s),
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(Z64, Y64, s),
        "n_examples": float(Y64.shape[1]),
        "positive_rate": positive_rate,
    }


class HeldOutCost:
    """A ``fit(monitor=...)`` hook: the log-loss on held-out data every ``every``-th update.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_held_out)
        Held-out examples, scaled as the training ``X``; only read.
    Y : ndarray of shape (1, n_held_out)
        Their 0/1 labels.
    every : int, default 1
        Evaluate at iterations ``0, every, 2 every, ...``; the others stay NaN.
    sample_weight : ndarray of shape (1, n_held_out), optional
        Row weights: the cost is the weighted mean log-loss.

    Use :meth:`history` after the fit: it also evaluates the final parameters.
    """

    def __init__(
        self,
        X: FloatArray,
        Y: FloatArray,
        every: int = 1,
        sample_weight: FloatArray | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.X = X
        self.Y = Y
        self.every = every
        self.sample_weight = sample_weight
        self._costs: dict[int, float] = {}

    def cost(self, w: FloatArray, b: float) -> float:
        """Log-loss (no penalty) of ``(w, b)`` on the held-out examples."""
        # (1, n_held_out) scores
        return log_loss(w.T @ self.X + b, self.Y, self.sample_weight)

    def __call__(self, iteration: int, w: FloatArray, b: float) -> None:
        if iteration % self.every == 0:
            self._costs[iteration] = self.cost(w, b)

    def history(self, n_iterations: int, w: FloatArray, b: float) -> FloatArray:
        """Held-out cost per iteration, NaN where not evaluated.

        Parameters
        ----------
        n_iterations : int
            Updates the fit applied (``FitResult.n_iterations``).
        w : ndarray of shape (n_features, 1), b : float
            The final parameters, always evaluated.

        Returns
        -------
        ndarray of shape (n_iterations + 1,), float64
        """
        costs = np.full(n_iterations + 1, np.nan)
        for iteration, value in self._costs.items():
            if iteration <= n_iterations:
                costs[iteration] = value
        costs[n_iterations] = self.cost(w, b)
        return costs

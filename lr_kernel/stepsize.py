"""A step size that is stable for the data: the loss's smoothness bound, by power iteration.

The Hessian of ``J`` with respect to ``(w, b)`` is::

    H = ([X; 1] diag(s a (1 - a)) [X; 1]ᵀ + l2 diag(1, ..., 1, 0)) / Σs

and ``a (1 - a) <= 1/4``, so ``H ⪯ G/4 + (l2/Σs) I`` with
``G = [X; 1] diag(s) [X; 1]ᵀ / Σs`` the ``(n + 1, n + 1)`` (weighted) Gram
matrix of the data with a row of ones for the intercept (``s = 1`` without
weights, ``Σs = m``). ``L = λ_max(G)/4 + l2/Σs`` bounds the curvature
everywhere, and gradient descent lowers the cost at every update for any step
below ``2/L``.
"""

import numpy as np

from lr_kernel.loss import FloatArray

# Power-iteration budget of :func:`stable_learning_rate`.
STEP_RTOL = 1e-3
STEP_MAX_ITERATIONS = 100


def gram_largest_eigenvalue(
    X: FloatArray,
    *,
    rtol: float = 1e-6,
    max_iterations: int = 1000,
    block_size: int = 4,
    seed: int = 0,
    sample_weight: FloatArray | None = None,
) -> float:
    """Largest eigenvalue of ``G = [X; 1] diag(s) [X; 1]ᵀ / Σs`` by block power iteration.

    ``G`` is never formed.

    Each iteration costs two passes over ``X`` (``[X; 1]ᵀ V``, then ``[X; 1] U``)
    with a few vectors at once: the passes are memory-bound, so ``block_size``
    vectors cost about what one does, and a start that happens to be nearly
    orthogonal to the top eigenvector (single-vector power iteration then
    settles on the second eigenvalue for a long while) becomes improbable.
    ``G`` itself would cost ``n² m`` and ``(n + 1)²`` memory.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples)
        Column-stacked data, float32 or float64; only read.
    rtol : float, default 1e-6
        Stop when the estimate changes by less than ``rtol`` times itself.
    max_iterations : int, default 1000
        Most iterations.
    block_size : int, default 4
        Vectors iterated together (at most ``n_features + 1``).
    seed : int, default 0
        Seed of the random start block: the same data always gives the same estimate.
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s`` (finite, >= 0); 1 each by default.

    Returns
    -------
    float
        The largest Ritz value at the last iterate. It does not exceed
        ``λ_max(G)`` (up to rounding) and converges to it from below; ``G``'s
        last diagonal entry is 1, so ``λ_max(G) >= 1``.
    """
    n, m = X.shape
    s = None if sample_weight is None else np.asarray(sample_weight, dtype=X.dtype).reshape(1, m)
    total = float(m) if s is None else float(np.sum(s, dtype=np.float64))
    p = max(1, min(block_size, n + 1))
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((n + 1, p)))  # (n + 1, p), orthonormal columns
    eigenvalue = 0.0
    for _ in range(max_iterations):
        # Products in X's dtype: float64 vectors would make NumPy upcast a float32
        # X, a full (n, m) copy per iteration.
        # (p, n) @ (n, m) keeps X on the fast side of GEMM; X.T @ V is ~3x slower.
        Vt = V.T.astype(X.dtype)  # (p, n + 1)
        Ut = Vt[:, :n] @ X + Vt[:, n:]  # (p, m) = ([X; 1]ᵀ V)ᵀ
        if s is not None:
            Ut *= s  # (p, m) = (diag(s) [X; 1]ᵀ V)ᵀ
        W = np.empty((n + 1, p))  # (n + 1, p) = G V, float64
        W[:n] = X @ Ut.T / total
        W[n] = np.sum(Ut, axis=1, dtype=np.float64) / total
        # Rayleigh-Ritz on the block: the largest eigenvalue of Vᵀ G V (p, p).
        previous = eigenvalue
        eigenvalue = float(np.linalg.eigvalsh((V.T @ W + W.T @ V) / 2)[-1])
        if not np.all(np.isfinite(W)):
            break
        V, _ = np.linalg.qr(W)
        if abs(eigenvalue - previous) <= rtol * abs(eigenvalue):
            break
    return eigenvalue


def stable_learning_rate(
    X: FloatArray, l2: float = 0.0, sample_weight: FloatArray | None = None
) -> float:
    """A gradient-descent step that lowers the cost at every update: ``1/L``.

    ``L = λ_max(G)/4 + l2/Σs`` bounds the curvature of ``J`` (see the module
    docstring). Steps below ``2/L`` are stable; ``1/L`` leaves a factor of two
    for the estimate of ``λ_max``, which power iteration approaches from below.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples)
        The matrix training will use (standardized or not); only read.
    l2 : float, default 0.0
        L2 penalty strength, as passed to ``fit``.
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights, as passed to ``fit``.

    Returns
    -------
    float
        A positive learning rate.
    """
    total = (
        float(X.shape[1])
        if sample_weight is None
        else float(np.sum(sample_weight, dtype=np.float64))
    )
    # A factor-of-two estimate is all the step needs, and power iteration stalls on
    # data whose top eigenvalues are close (e.g. independent standardized
    # features); a loose tolerance and a cap keep this at most ~200 passes over X.
    eigenvalue = gram_largest_eigenvalue(
        X, rtol=STEP_RTOL, max_iterations=STEP_MAX_ITERATIONS, sample_weight=sample_weight
    )
    smoothness = eigenvalue / 4.0 + float(l2) / total
    return 1.0 / smoothness

"""Statistics of a fitted model from its Hessian: covariance, Wald tests, aliasing, separation.

Conventions: parameters are ``θ = [w; b]`` of length ``n + 1``, the intercept
last, as in :meth:`lr_kernel.FusedLoss.hessian`. ``H`` is that method's
normalized Hessian of ``J`` (``(H_sum + l2 I') / Σs``), so the Hessian of the
unnormalized objective ``Σ s ℓ + (l2/2) ||w||²`` is ``Σs · H`` and its inverse is
the covariance with frequency-weight semantics (a row of weight 2 counts as two
rows), as statsmodels' ``Logit`` and ``GLM(..., freq_weights=s)`` compute it.
With ``l2 > 0`` it is the inverse of the penalized Hessian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

from lr_kernel.loss import FloatArray

# A term whose part of the Hessian not explained by the terms before it is below
# this share of its own diagonal entry is aliased (1 - R² < ALIAS_RTOL in the
# curvature-weighted metric): exact collinearity leaves rounding, ~1e-16.
ALIAS_RTOL = 1e-9
# Fitted probabilities within this of 0 or 1 count as at the boundary.
BOUNDARY_ATOL = 1e-10


@dataclass(frozen=True)
class CoefficientTable:
    """Wald statistics of every parameter, on the scale given (intercept last).

    Attributes
    ----------
    estimate, std_error, z_value, p_value, ci_lower, ci_upper : ndarray of shape (n + 1,), float64
        ``z = estimate / std_error``; ``p`` two-sided from the standard normal;
        the interval is ``estimate ± q std_error`` with ``q`` the normal
        quantile of ``(1 + confidence) / 2``.
    covariance : ndarray of shape (n + 1, n + 1), float64
    confidence : float
    """

    estimate: NDArray[np.float64]
    std_error: NDArray[np.float64]
    z_value: NDArray[np.float64]
    p_value: NDArray[np.float64]
    ci_lower: NDArray[np.float64]
    ci_upper: NDArray[np.float64]
    covariance: NDArray[np.float64]
    confidence: float


@dataclass(frozen=True)
class Aliasing:
    """Terms that are (within rounding) linear combinations of earlier terms.

    Attributes
    ----------
    aliased : tuple of int
        Indices into ``θ`` (``n`` is the intercept), in order.
    depends_on : tuple of tuple of int
        For each aliased term, the earlier, non-aliased terms it is a
        combination of (coefficient not zero to rounding).
    rank : int
        Number of non-aliased parameters.
    """

    aliased: tuple[int, ...]
    depends_on: tuple[tuple[int, ...], ...]
    rank: int


@dataclass(frozen=True)
class Separation:
    """Terms and rows whose fit sits at a probability of 0 or 1.

    Attributes
    ----------
    terms : tuple of int
        Indicator terms (indices into ``w``) whose rows (where the term is
        non-zero, with positive weight) all have the same label: the level
        predicts the label perfectly, and with ``l2 = 0`` its coefficient has
        no finite optimum.
    labels : tuple of float
        The label (0.0 or 1.0) shared by each such term's rows.
    n_boundary : int
        Rows (with positive weight) whose fitted probability is within
        ``BOUNDARY_ATOL`` of 0 or 1.
    """

    terms: tuple[int, ...]
    labels: tuple[float, ...]
    n_boundary: int

    @property
    def found(self) -> bool:
        return bool(self.terms) or self.n_boundary > 0


def covariance(H: NDArray[np.float64], weight_sum: float) -> NDArray[np.float64]:
    """``(Σs · H)⁻¹``: the covariance of ``θ`` (frequency-weight semantics).

    Parameters
    ----------
    H : ndarray of shape (n + 1, n + 1)
        The normalized Hessian at the optimum (:meth:`lr_kernel.FusedLoss.hessian`).
    weight_sum : float
        ``Σ s`` (``m`` unweighted).

    Raises
    ------
    numpy.linalg.LinAlgError
        When ``H`` is not positive definite (see :func:`aliased_terms`).
    """
    import scipy.linalg

    unnormalized = np.asarray(H, dtype=np.float64) * float(weight_sum)
    factor = scipy.linalg.cho_factor(unnormalized)
    inverse = scipy.linalg.cho_solve(factor, np.eye(unnormalized.shape[0]))
    return np.asarray((inverse + inverse.T) / 2, dtype=np.float64)  # symmetric to the last bit


def to_raw_scale(
    theta: NDArray[np.float64],
    cov: NDArray[np.float64],
    mean: NDArray[np.float64],
    scale: NDArray[np.float64],
    standardized: NDArray[np.bool_],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Parameters and covariance of the standardized problem, carried exactly to raw features.

    A standardized term is ``x̃_j = (x_j - mean_j) / scale_j``; the others are
    used as they are. Then ``wᵀx̃ + b = w_rawᵀ x + b_raw`` with
    ``w_raw_j = w_j / scale_j`` and ``b_raw = b - Σ_j w_j mean_j / scale_j``
    (standardized ``j``): ``θ_raw = T θ``, linear, so ``cov_raw = T cov Tᵀ``.

    Parameters
    ----------
    theta : ndarray of shape (n + 1,), intercept last
    cov : ndarray of shape (n + 1, n + 1)
    mean, scale : ndarray of shape (n,)
        The standardization; read only where ``standardized``.
    standardized : ndarray of shape (n,), bool
        Which terms were standardized (indicator terms are not).

    Returns
    -------
    theta_raw : ndarray of shape (n + 1,)
    cov_raw : ndarray of shape (n + 1, n + 1)
    """
    n = theta.shape[0] - 1
    mask = np.asarray(standardized, dtype=bool).reshape(n)
    inverse_scale = np.where(mask, 1.0 / np.where(mask, scale, 1.0), 1.0)  # (n,)
    T = np.zeros((n + 1, n + 1))
    T[np.arange(n), np.arange(n)] = inverse_scale
    T[n, :n] = np.where(mask, -np.asarray(mean, dtype=np.float64) * inverse_scale, 0.0)
    T[n, n] = 1.0
    return T @ theta, T @ cov @ T.T


def wald_table(
    theta: NDArray[np.float64], cov: NDArray[np.float64], confidence: float = 0.95
) -> CoefficientTable:
    """Standard errors, ``z``, two-sided ``p`` and Wald intervals from ``θ`` and its covariance.

    Parameters
    ----------
    theta : ndarray of shape (n + 1,)
    cov : ndarray of shape (n + 1, n + 1)
    confidence : float in (0, 1), default 0.95
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    estimate = np.asarray(theta, dtype=np.float64)
    std_error = np.sqrt(np.diag(cov))
    z_value = estimate / std_error
    # The standard normal from the standard library (scipy.stats takes ~0.7 s to
    # import): 2 sf(|z|) = erfc(|z| / √2), exact in the far tail, NaN stays NaN.
    p_value = np.array([math.erfc(abs(z) / math.sqrt(2.0)) for z in z_value.tolist()])
    quantile = NormalDist().inv_cdf(0.5 + confidence / 2)
    return CoefficientTable(
        estimate=estimate,
        std_error=std_error,
        z_value=z_value,
        p_value=p_value,
        ci_lower=estimate - quantile * std_error,
        ci_upper=estimate + quantile * std_error,
        covariance=np.asarray(cov, dtype=np.float64),
        confidence=float(confidence),
    )


def coefficient_table(
    w: FloatArray,
    b: float,
    H: NDArray[np.float64],
    weight_sum: float,
    *,
    mean: NDArray[np.float64] | None = None,
    scale: NDArray[np.float64] | None = None,
    standardized: NDArray[np.bool_] | None = None,
    confidence: float = 0.95,
) -> CoefficientTable:
    """The Wald table of a fitted model, on the raw feature scale.

    Parameters
    ----------
    w : ndarray of shape (n, 1), b : float
        The fit on the scale of ``X`` (standardized or not).
    H : ndarray of shape (n + 1, n + 1)
        ``FusedLoss.hessian(w, b, l2)[3]`` at the fit (penalized if ``l2 > 0``).
    weight_sum : float
        ``Σ s``.
    mean, scale, standardized : ndarray of shape (n,), optional
        The standardization of ``X`` (see :func:`to_raw_scale`); None: ``X``
        is on the raw scale.
    confidence : float, default 0.95

    Returns
    -------
    CoefficientTable, intercept last.
    """
    theta = np.concatenate([np.asarray(w, dtype=np.float64).ravel(), [float(b)]])
    cov = covariance(H, weight_sum)
    if standardized is not None:
        if mean is None or scale is None:
            raise ValueError("standardized needs mean and scale")
        theta, cov = to_raw_scale(theta, cov, mean, scale, standardized)
    return wald_table(theta, cov, confidence)


def aliased_terms(H: NDArray[np.float64], rtol: float = ALIAS_RTOL) -> Aliasing:
    """Aliased parameters, found from the Hessian as R's ``glm`` finds them: in order.

    A Cholesky factorization taken term by term (the intercept, last in ``θ``,
    first, as R orders it): a term whose Schur complement (its Hessian
    diagonal not explained by the terms kept before it) is at most ``rtol``
    times its diagonal entry is aliased and skipped. Use the unpenalized
    Hessian (``l2 = 0``): a penalty hides aliasing.

    Parameters
    ----------
    H : ndarray of shape (n + 1, n + 1), positive semi-definite
    rtol : float, default ``ALIAS_RTOL``

    Returns
    -------
    Aliasing
    """
    import scipy.linalg

    size = H.shape[0]
    order = [size - 1, *range(size - 1)]  # the intercept first
    kept: list[int] = []
    aliased: list[int] = []
    depends: list[tuple[int, ...]] = []
    L = np.zeros((0, 0))
    for j in order:
        diagonal = float(H[j, j])
        column = H[kept, j]  # (r,)
        solved = scipy.linalg.solve_triangular(L, column, lower=True) if kept else column
        residual = diagonal - float(solved @ solved)
        if diagonal <= 0.0 or residual <= rtol * diagonal:
            aliased.append(j)
            # The combination: H_KK c = H_Kj; a coefficient counts where its share
            # of the term's scale is more than rounding.
            c = scipy.linalg.solve_triangular(L.T, solved, lower=False) if kept else solved
            scale = np.sqrt(np.maximum(np.diag(H)[kept], 0.0) / max(diagonal, 1e-300))
            significant = np.abs(c) * scale > 1e-6
            depends.append(tuple(sorted(k for k, s in zip(kept, significant, strict=True) if s)))
            continue
        r = len(kept)
        grown = np.zeros((r + 1, r + 1))
        grown[:r, :r] = L
        grown[r, :r] = solved
        grown[r, r] = np.sqrt(residual)
        L = grown
        kept.append(j)
    return Aliasing(aliased=tuple(aliased), depends_on=tuple(depends), rank=len(kept))


def separation(
    X: FloatArray,
    Y: FloatArray,
    w: FloatArray,
    b: float,
    *,
    indicator: NDArray[np.bool_],
    sample_weight: FloatArray | None = None,
) -> Separation:
    """Separation at a fit: perfectly predicting indicator levels and rows at 0 or 1.

    Parameters
    ----------
    X : ndarray of shape (n, m), the matrix the model was fitted on
    Y : ndarray of shape (1, m), 0/1 labels
    w : ndarray of shape (n, 1), b : float, the fit
    indicator : ndarray of shape (n,), bool
        Which terms are 0/1 indicators (a level of a categorical, a Boolean).
    sample_weight : ndarray of shape (1, m), optional
        Rows of weight 0 are left out.

    Returns
    -------
    Separation
    """
    n, m = X.shape
    y = np.asarray(Y, dtype=np.float64).reshape(m)
    used = np.ones(m, dtype=bool) if sample_weight is None else np.ravel(sample_weight) > 0
    terms: list[int] = []
    labels: list[float] = []
    for j in np.flatnonzero(np.asarray(indicator, dtype=bool).reshape(n)):
        rows = (X[j] != 0) & used  # (m,)
        if rows.any():
            level = y[rows]
            if np.all(level == level[0]):
                terms.append(int(j))
                labels.append(float(level[0]))
    Z = (np.asarray(w, dtype=np.float64).T @ X).reshape(m) + b  # (m,)
    # sigmoid(Z) within atol of 0 or 1 <=> |Z| >= logit(1 - atol).
    boundary = np.abs(Z) >= np.log1p(-BOUNDARY_ATOL) - np.log(BOUNDARY_ATOL)
    return Separation(
        terms=tuple(terms), labels=tuple(labels), n_boundary=int(np.count_nonzero(boundary & used))
    )

"""The one stop rule every solver uses: the gradient criterion, divergence, and why a run ended."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from lr_kernel.loss import FloatArray

StopReason = Literal["iterations", "tolerance", "diverged", "stalled"]

# A rise of the cost larger than rounding, this many updates in a row, is divergence.
# One rise alone is not: near the optimum the cost moves by a few ulps either way.
DIVERGENCE_PATIENCE = 3


def gradient_max(dw: FloatArray, db: float) -> float:
    """``max |∇J|``: the largest absolute component of ``(dw, db)``, as a float.

    Parameters
    ----------
    dw : ndarray of shape (n_features, 1) or (n_features,)
    db : float

    Returns
    -------
    float; NaN if any component is NaN.
    """
    if np.isnan(db) or np.isnan(dw).any():
        return math.nan
    return max(float(np.max(np.abs(dw), initial=0.0)), abs(float(db)))


def rise_rtol(dtype: np.dtype[np.floating]) -> float:
    """Relative rise of the cost that is rounding noise, for terms in ``dtype``."""
    return 64 * float(np.finfo(dtype).eps)


class StopRule:
    """Whether a run should stop, and why: the one definition every solver uses.

    - ``"tolerance"`` (converged): ``max |∇J| <= tol``, every component of the
      gradient of ``J`` (all terms and the intercept), on the scale the solver
      works in. Nothing else converges a run.
    - ``"diverged"``: the cost or gradient is NaN or infinite; or, for solvers
      whose steps do not search (``monotone=False``: ``gd``, ``nesterov``),
      the cost rose above its initial value or rose more than rounding
      ``DIVERGENCE_PATIENCE`` updates in a row. A stable step lowers the cost
      at every update, so each of these means the step is too large.
    - ``"iterations"`` (the cap) and ``"stalled"`` (a line search found no
      lower cost before the gradient met ``tol``: ``tol`` is below what the
      data's rounding allows) are decided by the solvers, never here.

    Parameters
    ----------
    tol : float
        ``>= 0``; 0 never converges.
    dtype : the data's dtype (sets what a rise of the cost by rounding is).
    initial_cost : float
        The cost at the run's first parameters.
    rises : int, default 0
        Rises in a row so far (a resumed run's, from its history).
    """

    def __init__(
        self, tol: float, dtype: np.dtype[np.floating], initial_cost: float, rises: int = 0
    ) -> None:
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.tol = float(tol)
        self.rise_rtol = rise_rtol(dtype)
        self.initial_cost = initial_cost
        self.rises = rises

    def converged(self, dw: FloatArray, db: float) -> bool:
        """``max |∇J| <= tol`` (and ``tol > 0``)."""
        return self.tol > 0 and gradient_max(dw, db) <= self.tol

    def check(
        self,
        cost: float,
        previous: float | None,
        dw: FloatArray,
        db: float,
        *,
        monotone: bool = False,
    ) -> StopReason | None:
        """The reason to stop at a point with this cost and gradient, or None to go on.

        Parameters
        ----------
        cost : float
            The cost at the new point.
        previous : float or None
            The cost at the point before (None at the first point).
        dw : ndarray of shape (n_features, 1), db : float
            The gradient at the new point.
        monotone : bool, default False
            True for solvers whose line search already guarantees descent
            (``lbfgs``, ``newton``): only non-finite values diverge.
        """
        if not math.isfinite(cost) or not math.isfinite(gradient_max(dw, db)):
            return "diverged"
        if not monotone and previous is not None:
            rtol = self.rise_rtol
            self.rises = self.rises + 1 if cost > previous + rtol * abs(previous) else 0
            initial = self.initial_cost
            if self.rises >= DIVERGENCE_PATIENCE or cost > initial + rtol * abs(initial):
                return "diverged"
        if self.converged(dw, db):
            return "tolerance"
        return None

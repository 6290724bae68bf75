"""Vectorized binary logistic regression on column-stacked data, in NumPy (and numba).

Conventions
-----------
- ``X`` is ``(n_features, n_examples)``: one example per column, C-contiguous, so
  each feature is one contiguous row. The kernel only reads ``X``. Or ``X`` is a
  :class:`TiledMatrix`, the same matrix stored in tiles of examples (each tile
  one contiguous run of memory), which the compiled engine reads at the speed
  of a plain sequential read; the memory backend of the flows holds its
  training rows so.
- ``Y`` is ``(1, n_examples)`` of 0.0/1.0 in ``X``'s dtype.
- ``w`` is ``(n_features, 1)``; ``b`` is a Python float. The intercept is never
  penalized.
- ``sample_weight`` (optional) is ``(1, n_examples)``: row weights ``s``, finite,
  >= 0; 1 each by default.
- The objective, everywhere in the project::

      J(w, b) = (Σ_i s_i ℓ_i + (l2 / 2) ||w||²) / Σ_i s_i
      ℓ_i = -[y_i log a_i + (1 - y_i) log(1 - a_i)],   a_i = sigmoid(wᵀ x_i + b)

  ``scikit-learn``'s ``LogisticRegression(C=1/l2)`` fitted with
  ``sample_weight=s`` minimizes ``Σs`` times it (``m`` times, unweighted).
- Many models at once (:func:`fit_many`, given sequences of ``l2`` /
  learning rates): ``W`` is ``(n_features, K)``, column ``k`` is
  candidate ``k``, and ``b`` is ``(K,)``.
- ``cost_history[i]`` is ``J`` at the parameters before update ``i + 1``; row 0 is
  the cost of the initial parameters.

``LogisticRegressionGD`` (scikit-learn's estimator API, needs ``lrflow[sklearn]``)
is importable from here but loaded on first use, so that ``import lr_kernel``
never imports scikit-learn. Likewise numba is imported only by a
:class:`FusedLoss` or :class:`FusedLossMany` that runs the compiled engine
(``engine="numba"``, or ``"auto"`` on large data with several threads).
"""

from typing import Any

from lr_kernel.convergence import StopReason, StopRule, gradient_max
from lr_kernel.grid import FusedLossMany, GridFitResult, fit_many, grid_candidates
from lr_kernel.loss import (
    ENGINES,
    Engine,
    FusedLoss,
    LossFunction,
    SecondOrderLoss,
    compiled_engine_available,
    default_block_size,
    hessian_from_sums,
    loss_and_gradients,
    loss_and_gradients_naive,
    loss_from_sums,
    predict_proba,
    sigmoid,
)
from lr_kernel.tiles import TiledMatrix
from lr_kernel.train import (
    OPTIMIZERS,
    FitResult,
    Optimizer,
    TrainState,
    fit,
    fit_loss,
)

__all__ = [
    "ENGINES",
    "OPTIMIZERS",
    "Engine",
    "FitResult",
    "FusedLoss",
    "FusedLossMany",
    "GridFitResult",
    "LossFunction",
    "Optimizer",
    "SecondOrderLoss",
    "StopReason",
    "StopRule",
    "TiledMatrix",
    "TrainState",
    "compiled_engine_available",
    "default_block_size",
    "fit",
    "fit_loss",
    "fit_many",
    "gradient_max",
    "grid_candidates",
    "hessian_from_sums",
    "loss_and_gradients",
    "loss_and_gradients_naive",
    "loss_from_sums",
    "predict_proba",
    "sigmoid",
]


def __getattr__(name: str) -> Any:
    # PEP 562: scikit-learn is optional and slow to import; load it only when asked.
    if name == "LogisticRegressionGD":
        from lr_kernel.estimator import LogisticRegressionGD

        return LogisticRegressionGD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

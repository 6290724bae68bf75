"""What a fit can be trusted for: its Wald table, aliased terms, separation and convergence.

After every fit, on every backend, one Hessian pass at the fitted parameters
(``TrainingData.loss(...).hessian``) gives

- the aliased terms (exactly collinear within rounding, from the unpenalized
  Hessian, as R's ``glm`` finds them): the run fails naming them, or with
  ``--drop-aliased`` they are dropped, the model refitted and their estimates
  recorded as null;
- the covariance ``H⁻¹`` (penalized when ``l2 > 0``; frequency weights), carried
  exactly to the raw feature scale: standard errors, ``z``, ``p`` and Wald
  intervals (:mod:`lr_kernel.inference`). A fit that did not converge gets
  none of them (null, with the reason).

Two gradient passes at ``w = 0, b = ±SEPARATION_LOGIT`` give each term's
weighted sums of positive and of negative labels (there ``A`` is 0 or 1 to
``e^-40``, so ``dw`` is ``-X (s∘Y)ᵀ / Σs`` or ``X (s∘(1 - Y))ᵀ / Σs``): an
indicator term (a level, a Boolean) whose rows all have one label separates
the data, found exactly on every backend. A standardized numeric term with a
coefficient above ``SEPARATION_COEFFICIENT`` per standard deviation puts
fitted probabilities at 0 or 1 and is named as (quasi-)separating.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from flows.config import TrainConfig
from flows.errors import DataError
from lr_kernel import FitResult, GridFitResult, LossFunction
from lr_kernel.inference import aliased_terms, coefficient_table
from lr_kernel.train import resolve_optimizer

if TYPE_CHECKING:
    from flows.backends import Grid, TrainingData
    from flows.features import FeaturePlan

STATISTICS = ("std_error", "z_value", "p_value", "ci_lower", "ci_upper")
# The intercept where the label sums are taken: sigmoid(±40) is 0 or 1 to 4e-18.
SEPARATION_LOGIT = 40.0
# A level whose weighted count of one label is below this share of its rows has none.
SEPARATION_RTOL = 1e-9
# Log-odds per standard deviation beyond which a numeric term's fit sits at 0 or 1
# (e^10: 22,000 times the odds per standard deviation).
SEPARATION_COEFFICIENT = 10.0
INTERCEPT = "(Intercept)"
# Terms an aliased term depends on that its error names (the rest are counted).
ALIAS_NAMES_SHOWN = 5

Refit = Callable[["TrainingData", TrainConfig], tuple[FitResult, np.ndarray | None]]


@dataclass(frozen=True)
class FitInference:
    """The statistics and diagnostics of one fit, on the raw feature scale, intercept last.

    Attributes
    ----------
    statistics : dict of str to ndarray of shape (n_terms + 1,), float64
        :data:`STATISTICS`, NaN where null (a dropped term; all of them when
        ``null_reason`` is set).
    null_reason : str or None
        Why the statistics are null (not converged, Hessian not positive definite).
    dropped : tuple of int
        Terms dropped as aliased (``--drop-aliased``); their estimates are null.
    warnings : tuple of str
        One line each: not converged, aliased terms dropped, separation.
    metadata : dict
        What the run's metadata records under ``fit`` (JSON-ready).
    """

    statistics: dict[str, np.ndarray]
    null_reason: str | None
    dropped: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@contextmanager
def opened_loss(data: TrainingData, n_threads: int = 1, engine: str = "auto") -> Iterator[Any]:
    """``data.loss(...)``, closed afterwards where it holds something (a file, a cluster's)."""
    loss = data.loss(n_threads=n_threads, engine=engine)
    try:
        yield loss
    finally:
        close = getattr(loss, "close", None)
        if close is not None:
            close()


def hessian_at(
    data: TrainingData,
    w: np.ndarray,
    b: float,
    n_threads: int = 1,
    engine: str = "auto",
    *,
    known: np.ndarray | None = None,
    l2: float = 0.0,
) -> tuple[np.ndarray, float, str]:
    """The unpenalized Hessian of ``J`` at ``(w, b)``, ``Σs``, and the optimizer
    ``auto`` resolves to on this data.

    One pass over the data, unless ``known`` is the Hessian of the ``l2``-penalized
    ``J`` there already (a Newton fit's last one: ``FitResult.hessian``).

    Returns
    -------
    H : ndarray of shape (n_terms + 1, n_terms + 1), float64, intercept last
    weight_sum : float
    auto_optimizer : str
    """
    with opened_loss(data, n_threads, engine) as loss:
        weight_sum = float(loss.weight_sum)
        if known is not None:
            H = penalized(known, -l2, weight_sum)
        else:
            H = loss.hessian(np.asarray(w, dtype=loss.dtype), float(b), 0.0)[3]
        return H, weight_sum, resolve_optimizer("auto", loss)


def penalized(H: np.ndarray, l2: float, weight_sum: float) -> np.ndarray:
    """``H + l2 diag(1, ..., 1, 0) / Σs``: the Hessian of the penalized ``J``."""
    H = np.array(H, dtype=np.float64)
    n = H.shape[0] - 1
    H[np.arange(n), np.arange(n)] += l2 / weight_sum
    return H


def indicator_terms(plan: FeaturePlan) -> np.ndarray:
    """``(n_terms,)`` bool: the 0/1 terms (levels, Booleans, ``(missing)`` indicators)."""
    mask: list[bool] = []
    for feature in plan.features:
        if feature.kind == "numeric":
            mask += [False, *([True] * feature.missing_term)]
        else:
            mask += [True] * len(feature.terms)
    return np.array(mask, dtype=bool)


def column_of(plan: FeaturePlan, term: int) -> str:
    """The column a term comes from (what ``--exclude`` takes)."""
    k = 0
    for feature in plan.features:
        k += len(feature.terms)
        if term < k:
            return feature.name
    raise IndexError(term)


def _name(plan: FeaturePlan, index: int) -> str:
    return INTERCEPT if index == plan.n_terms else plan.terms[index]


def aliasing_error(
    plan: FeaturePlan, aliased: tuple[int, ...], depends: tuple[tuple[int, ...], ...]
) -> DataError:
    """The one-line error for aliased terms: which, on what they depend, the remedies."""

    def names(indices: tuple[int, ...]) -> str:
        shown = ", ".join(repr(_name(plan, k)) for k in indices[:ALIAS_NAMES_SHOWN])
        more = len(indices) - ALIAS_NAMES_SHOWN
        return shown + (f" and {more} more" if more > 0 else "")

    parts = [
        f"{_name(plan, j)!r} = a combination of {names(on)}"
        for j, on in zip(aliased, depends, strict=True)
    ]
    columns = sorted({column_of(plan, j) for j in aliased})
    return DataError(
        f"aliased terms (exactly collinear, within rounding): {'; '.join(parts)}: their "
        f"estimates are not identified; leave them out (--exclude {','.join(columns)}) or "
        "pass --drop-aliased to drop them and record null estimates"
    )


class TermSubsetLoss:
    """A loss of some terms only: the others are held at zero (a :class:`SecondOrderLoss`).

    The pass still runs over every term of the wrapped loss; the solvers see
    ``keep`` and the intercept only.
    """

    def __init__(self, loss: Any, keep: np.ndarray) -> None:
        self._loss = loss
        self._keep = np.asarray(keep, dtype=np.intp)
        self._size = loss.n_features
        self._rows = np.append(self._keep, self._size)  # kept terms, then the intercept

    @property
    def n_features(self) -> int:
        return int(self._keep.size)

    @property
    def dtype(self) -> np.dtype:
        return self._loss.dtype

    @property
    def weight_sum(self) -> float:
        return float(self._loss.weight_sum)

    def _full(self, w: np.ndarray) -> np.ndarray:
        full = np.zeros((self._size, 1), dtype=self.dtype)
        full[self._keep] = np.asarray(w).reshape(-1, 1)
        return full

    def __call__(self, w: np.ndarray, b: float, l2: float = 0.0) -> tuple[float, np.ndarray, float]:
        cost, dw, db = self._loss(self._full(w), b, l2)
        return cost, dw[self._keep], db

    def hessian(
        self, w: np.ndarray, b: float, l2: float = 0.0
    ) -> tuple[float, np.ndarray, float, np.ndarray]:
        cost, dw, db, H = self._loss.hessian(self._full(w), b, l2)
        return cost, dw[self._keep], db, H[np.ix_(self._rows, self._rows)]

    def close(self) -> None:
        close = getattr(self._loss, "close", None)
        if close is not None:
            close()


@dataclass
class WithoutTerms:
    """:class:`flows.backends.TrainingData` with some terms held at zero: the refit of
    ``--drop-aliased``. Its losses see the kept terms only; everything else is ``data``'s."""

    data: TrainingData
    keep: np.ndarray

    @property
    def backend(self) -> str:
        return self.data.backend

    @property
    def plan(self) -> FeaturePlan:
        return self.data.plan

    @property
    def files(self) -> tuple[PurePath, ...]:
        return self.data.files

    @property
    def validation_files(self) -> tuple[PurePath, ...]:
        return self.data.validation_files

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    @property
    def n_examples(self) -> int:
        return self.data.n_examples

    @property
    def n_validation(self) -> int:
        return self.data.n_validation

    def full(self, w: np.ndarray) -> np.ndarray:
        """``(n_kept, 1)`` -> ``(n_terms, 1)``, zeros at the dropped terms."""
        full = np.zeros((self.data.plan.n_terms, 1), dtype=np.asarray(w).dtype)
        full[self.keep] = np.asarray(w).reshape(-1, 1)
        return full

    def loss(self, n_threads: int = 1, engine: str = "auto") -> LossFunction:
        return TermSubsetLoss(self.data.loss(n_threads, engine), self.keep)

    def validation_loss(self) -> LossFunction | None:
        held_out = self.data.validation_loss()
        return None if held_out is None else TermSubsetLoss(held_out, self.keep)

    def metrics(self, w: np.ndarray, b: float) -> dict[str, dict[str, float]]:
        return self.data.metrics(self.full(w), b)

    def fit_candidates(self, grid: Grid) -> GridFitResult:
        raise NotImplementedError("a refit without aliased terms fits one model")

    def stable_learning_rate(self, l2: float) -> float:
        from flows.backends import curvature_learning_rate

        loss = TermSubsetLoss(self.data.loss(), self.keep)
        try:
            return curvature_learning_rate(loss, l2, loss.weight_sum)
        finally:
            loss.close()

    def kernel_setting(self, threads: int, engine: str) -> tuple[int, str]:
        return self.data.kernel_setting(threads, engine)

    def validation_log_loss(self, w: np.ndarray, b: float) -> float | None:
        return self.data.validation_log_loss(self.full(w), b)

    def close(self) -> None:
        """The wrapped data is the caller's to close."""


def label_sums(data: TrainingData, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each term's weighted sums ``Σ s x y`` and ``Σ s x (1 - y)``: two gradient passes.

    Returns
    -------
    positives, negatives : ndarray of shape (n_terms,), float64
    """
    with opened_loss(data, n_threads) as loss:
        zeros = np.zeros((loss.n_features, 1), dtype=loss.dtype)
        total = float(loss.weight_sum)
        _, low, _ = loss(zeros, -SEPARATION_LOGIT, 0.0)  # A ≈ 0: dw = -Σ s x y / Σs
        _, high, _ = loss(zeros, SEPARATION_LOGIT, 0.0)  # A ≈ 1: dw = Σ s x (1 - y) / Σs
    positives = -np.asarray(low, dtype=np.float64).ravel() * total
    negatives = np.asarray(high, dtype=np.float64).ravel() * total
    return positives, negatives


def separation_findings(
    data: TrainingData, w: np.ndarray, n_threads: int = 1
) -> list[dict[str, Any]]:
    """Terms that separate the labels: indicator levels (exact) and numeric terms
    whose coefficient is beyond :data:`SEPARATION_COEFFICIENT` (from the fit).

    Returns ``{"term", "kind": "level" | "coefficient", "label" | "coefficient"}`` rows.
    """
    plan = data.plan
    indicator = indicator_terms(plan)
    found: list[dict[str, Any]] = []
    if indicator.any():
        positives, negatives = label_sums(data, n_threads)
        rows = positives + negatives
        for j in np.flatnonzero(indicator):
            if rows[j] <= 0:
                continue
            for label, count in ((1.0, negatives[j]), (0.0, positives[j])):
                if count <= SEPARATION_RTOL * rows[j]:
                    found.append({"term": plan.terms[j], "kind": "level", "label": label})
    standardized = plan.standardized_terms
    w_plan = np.asarray(w, dtype=np.float64).ravel()
    for j in np.flatnonzero(standardized & (np.abs(w_plan) > SEPARATION_COEFFICIENT)):
        found.append({"term": plan.terms[j], "kind": "coefficient", "coefficient": w_plan[j]})
    return found


def separation_warning(found: list[dict[str, Any]], plan: FeaturePlan, l2: float) -> str:
    """One line naming every separating term, and what it means for the fit."""
    named = []
    for row in found:
        if row["kind"] == "level":
            only = "positive" if row["label"] == 1.0 else "negative"
            named.append(f"{row['term']!r} (every row {only})")
        else:
            named.append(f"{row['term']!r} ({row['coefficient']:.3g} log-odds per sd)")
    consequence = (
        f"the fit is finite only because of the penalty (l2 = {l2:g})"
        if l2 > 0
        else "their estimates have no finite optimum and their standard errors mean nothing"
    )
    columns = ",".join(sorted({column_of(plan, plan.terms.index(r["term"])) for r in found}))
    return (
        f"separation: {', '.join(named)} predict the label perfectly (fitted probabilities "
        f"at 0 or 1); {consequence}; consider --exclude {columns} or --l2 > 0"
    )


def not_converged_warning(result: FitResult, tol: float) -> str:
    """One line: why the fit stopped short of ``max |∇J| <= tol`` and what to try."""
    gradient = float(result.gradient_norm_history[-1])
    if result.stop_reason == "stalled":
        advice = (
            "the line search could lower the cost no further: tol is below the data's "
            "rounding; try a larger --tol or --dtype float64"
        )
    else:
        advice = "try --optimizer newton or more --iterations"
    return (
        f"not converged ({result.stop_reason}): max |gradient| {gradient:.2g} > tol {tol:.2g} "
        f"after {result.n_iterations} iterations; {advice}"
    )


def _null_statistics(n: int) -> dict[str, np.ndarray]:
    return {name: np.full(n, np.nan) for name in STATISTICS}


def check_fit(
    data: TrainingData,
    result: FitResult,
    validation_cost: np.ndarray | None,
    config: TrainConfig,
    *,
    refit: Refit,
    n_threads: int = 1,
    engine: str = "auto",
) -> tuple[FitResult, np.ndarray | None, FitInference]:
    """A fit's aliasing, Wald table, separation and convergence (see the module's docstring).

    Parameters
    ----------
    data : the run's training data; ``result`` its fit (plan scale), with ``config.l2``.
    validation_cost : ndarray of shape (n_iterations + 1,) or None, the fit's.
    refit : ``(data, config) -> (result, validation_cost)``
        Fits again (on the data without the aliased terms, for ``--drop-aliased``).

    Returns
    -------
    result, validation_cost : the fit (the refit, with zeros at dropped terms, if any)
    inference : FitInference

    Raises
    ------
    DataError
        Aliased terms without ``config.drop_aliased``.
    """
    plan = data.plan
    n = plan.n_terms
    l2 = float(config.l2)  # type: ignore[arg-type]  # one value: a search has selected one
    H, weight_sum, auto = hessian_at(
        data, result.w, result.b, n_threads, engine, known=result.hessian, l2=l2
    )
    aliasing = aliased_terms(H)
    dropped: tuple[int, ...] = ()
    warnings: list[str] = []
    if aliasing.aliased:
        if not config.drop_aliased:
            raise aliasing_error(plan, aliasing.aliased, aliasing.depends_on)
        dropped = aliasing.aliased
        keep = np.array([j for j in range(n) if j not in dropped], dtype=np.intp)
        reduced = WithoutTerms(data, keep)
        single = config.model_copy(update={"checkpoint_every": 0, "resume": False})
        sub, validation_cost = refit(reduced, single)
        full = reduced.full(sub.w).astype(sub.w.dtype)
        result = dataclasses.replace(sub, w=full, hessian=None)  # its Hessian is of the kept terms
        H, weight_sum, _ = hessian_at(data, result.w, result.b, n_threads, engine)
        warnings.append(
            "aliased terms dropped and their estimates recorded as null: "
            + ", ".join(repr(_name(plan, j)) for j in dropped)
        )
    kept = np.array([j for j in range(n + 1) if j not in dropped], dtype=np.intp)
    statistics = _null_statistics(n + 1)
    null_reason: str | None = None
    if not result.converged:
        null_reason = f"the fit did not converge ({result.stop_reason})"
        warnings.insert(0, not_converged_warning(result, config.tol))
    else:
        mean, scale = plan.term_mean_scale()
        terms = kept[:-1]
        try:
            table = coefficient_table(
                np.asarray(result.w, dtype=np.float64)[terms],
                result.b,
                penalized(H, l2, weight_sum)[np.ix_(kept, kept)],
                weight_sum,
                mean=mean[terms],
                scale=scale[terms],
                standardized=plan.standardized_terms[terms],
                confidence=config.confidence,
            )
        except np.linalg.LinAlgError:
            null_reason = "the Hessian at the fit is not positive definite"
            warnings.append(f"no standard errors: {null_reason}")
        else:
            for name in STATISTICS:
                statistics[name][kept] = getattr(table, name)
    found = separation_findings(data, result.w, n_threads)
    if found:
        warnings.append(separation_warning(found, plan, l2))
    metadata = {
        "converged": result.converged,
        "stop_reason": result.stop_reason,
        "gradient_max": float(result.gradient_norm_history[-1]),
        "tol": config.tol,
        "optimizer": auto if config.optimizer == "auto" else config.optimizer,
        "diagnostics": list(warnings),
        "statistics": {
            "method": "wald",
            "confidence": config.confidence,
            "scale": "raw",
            "hessian": f"penalized (l2 = {l2:g})" if l2 > 0 else "unpenalized",
            "weights": "frequency" if plan.weighted else None,
            "null_reason": null_reason,
        },
        "aliased": [
            {"term": _name(plan, j), "depends_on": [_name(plan, k) for k in on]}
            for j, on in zip(aliasing.aliased, aliasing.depends_on, strict=True)
        ],
        "dropped_terms": [_name(plan, j) for j in dropped],
        "separation": found,
    }
    inference = FitInference(
        statistics=statistics,
        null_reason=null_reason,
        dropped=dropped,
        warnings=tuple(warnings),
        metadata=_json_ready(metadata),
    )
    return result, validation_cost, inference


def _json_ready(value: Any) -> Any:
    """NaN and infinities as strings; NumPy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

"""The training loops of one model (the only loops: over iterations) and FitResult.

Every solver stops by :class:`lr_kernel.convergence.StopRule`; the grid of
many models (:mod:`lr_kernel.grid`) builds on this module, never the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from lr_kernel.convergence import StopReason, StopRule, gradient_max
from lr_kernel.loss import Engine, FloatArray, FusedLoss, LossFunction, SecondOrderLoss
from lr_kernel.tiles import TiledMatrix

Optimizer = Literal["gd", "nesterov", "lbfgs", "newton", "auto"]
OPTIMIZERS: tuple[Optimizer, ...] = ("gd", "nesterov", "lbfgs", "newton", "auto")
# Optimizers that search their own steps (no learning rate).
SEARCHING: tuple[Optimizer, ...] = ("lbfgs", "newton", "auto")

# "auto" is Newton up to this many features, else L-BFGS. The Hessian pass
# costs (n + 1)² multiply-adds per example against the gradient's 2n, and is
# compute-bound where the gradient is memory-bound: measured on 2 cores
# (numba engine, 2 threads) one Hessian pass costs 3.5 gradient passes at
# n = 20, 11 at n = 100, 18 at n = 300 and 51 at n = 1000. Newton needs about
# 5-10 of them to max |∇J| <= 1e-8; L-BFGS needs 50-200 gradient passes on
# correlated data and may stall above a tight tol. Up to 200 features Newton
# is the cheaper way to the optimum and the surer one.
NEWTON_MAX_FEATURES = 200
# Armijo's sufficient decrease, and the smallest step Newton's line search tries.
ARMIJO = 1e-4
MIN_STEP = 2.0**-30


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
        ``max |∇J|``, the largest absolute component of ``(dw, db)``, at the
        same parameters: what the stop rule compares with ``tol``.
    n_iterations : int
        Updates applied.
    converged : bool
        True exactly when ``stop_reason == "tolerance"``: ``max |∇J| <= tol``.
    stop_reason : {"iterations", "tolerance", "diverged", "stalled"}
        See :class:`~lr_kernel.convergence.StopRule`. ``"iterations"``: the cap
        was reached first. ``"diverged"``: the parameters are not usable (the
        learning rate is too large). ``"stalled"``: a line search could lower
        the cost no further while ``max |∇J| > tol``; the parameters are as
        good as the data's rounding allows, ``tol`` is below that.
    hessian : ndarray of shape (n_features + 1, n_features + 1), float64, or None
        The Hessian of the (penalized) ``J`` at ``(w, b)``, intercept last,
        where the solver computed it there (``"newton"``); None otherwise.
        Standard errors after a Newton fit need no further pass over ``X``.
    """

    w: FloatArray
    b: float
    cost_history: FloatArray
    gradient_norm_history: FloatArray
    n_iterations: int
    converged: bool
    stop_reason: StopReason
    hessian: NDArray[np.float64] | None = None


@dataclass(frozen=True)
class TrainState:
    """Everything a solver needs to go on from an iteration as if never stopped.

    A checkpoint is one of these; ``fit(..., resume=state)`` continues from it.
    For ``"gd"`` and ``"nesterov"`` the continued run is bitwise the run that was
    never interrupted (same data, ``block_size`` and ``n_threads``); ``"lbfgs"``
    restarts its curvature memory at ``w``, so it continues correctly, not bitwise.

    Attributes
    ----------
    optimizer : {"gd", "nesterov", "lbfgs", "newton"}
    iteration : int
        Updates applied so far.
    w : ndarray of shape (n_features, 1)
        The reported parameters at ``iteration`` (``cost_history[-1]``'s).
    b : float
    cost_history, gradient_norm_history : ndarray of shape (iteration + 1,), float64
    momentum : dict of str to ndarray or float
        Solver state beyond ``(w, b)``: for ``"nesterov"`` the last gradient step
        ``w_step`` ``(n_features, 1)``, ``b_step`` and the momentum schedule ``t``.
    """

    optimizer: Optimizer
    iteration: int
    w: FloatArray
    b: float
    cost_history: FloatArray
    gradient_norm_history: FloatArray
    momentum: dict[str, FloatArray | float] = field(default_factory=dict)


class _History:
    """Cost and gradient-norm rows as a solver produces them, the callback and checkpoints."""

    def __init__(
        self,
        callback: Callable[[int, float], None] | None,
        resume: TrainState | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[TrainState], None] | None = None,
        monitor: Callable[[int, FloatArray, float], None] | None = None,
    ) -> None:
        self.costs: list[float] = [] if resume is None else resume.cost_history.tolist()
        self.grad_norms: list[float] = (
            [] if resume is None else resume.gradient_norm_history.tolist()
        )
        self.callback = callback
        self.checkpoint_every = checkpoint_every if on_checkpoint is not None else 0
        self.on_checkpoint = on_checkpoint
        self.monitor = monitor

    @property
    def n_iterations(self) -> int:
        return len(self.costs) - 1

    def start(self, cost: float, dw: FloatArray, db: float, w: FloatArray, b: float) -> None:
        """Record the starting point, unless a resumed history already holds it."""
        if not self.costs:
            self.record(cost, dw, db, w, b)

    def record(self, cost: float, dw: FloatArray, db: float, w: FloatArray, b: float) -> None:
        """Add the row of the parameters ``(w, b)``, whose cost and gradients these are."""
        self.costs.append(cost)
        self.grad_norms.append(gradient_max(dw, db))
        if self.callback is not None:
            self.callback(len(self.costs) - 1, cost)
        if self.monitor is not None:
            self.monitor(len(self.costs) - 1, w, b)

    def stop_rule(self, tol: float, dtype: np.dtype[np.floating]) -> StopRule:
        """The run's stop rule, with a resumed run's divergence counter rebuilt."""
        rule = StopRule(tol, dtype, self.costs[0])
        rule.rises = self.trailing_rises(rule.rise_rtol)
        return rule

    def trailing_rises(self, rise_rtol: float) -> int:
        """Rises in a row at the end of the history: the divergence counter, rebuilt."""
        rises = 0
        for k in range(len(self.costs) - 1, 0, -1):
            if self.costs[k] > self.costs[k - 1] + rise_rtol * abs(self.costs[k - 1]):
                rises += 1
            else:
                break
        return rises

    def checkpoint(
        self,
        optimizer: Optimizer,
        w: FloatArray,
        b: float,
        momentum: dict[str, FloatArray | float] | None = None,
    ) -> None:
        """Hand a :class:`TrainState` (copies) to ``on_checkpoint`` every ``checkpoint_every``."""
        if self.on_checkpoint is None or not self.checkpoint_every:
            return
        if self.n_iterations % self.checkpoint_every:
            return
        self.on_checkpoint(
            TrainState(
                optimizer=optimizer,
                iteration=self.n_iterations,
                w=np.array(w),
                b=float(b),
                cost_history=np.asarray(self.costs, dtype=np.float64),
                gradient_norm_history=np.asarray(self.grad_norms, dtype=np.float64),
                momentum={
                    k: np.array(v) if isinstance(v, np.ndarray) else v
                    for k, v in (momentum or {}).items()
                },
            )
        )

    def result(
        self,
        w: FloatArray,
        b: float,
        stop_reason: StopReason,
        hessian: NDArray[np.float64] | None = None,
    ) -> FitResult:
        return FitResult(
            w=w,
            b=b,
            cost_history=np.asarray(self.costs, dtype=np.float64),
            gradient_norm_history=np.asarray(self.grad_norms, dtype=np.float64),
            n_iterations=len(self.costs) - 1,
            converged=stop_reason == "tolerance",
            stop_reason=stop_reason,
            hessian=hessian,
        )


def fit(
    X: FloatArray | TiledMatrix,
    Y: FloatArray,
    *,
    learning_rate: float | None = None,
    iterations: int,
    l2: float = 0.0,
    tol: float = 0.0,
    w0: FloatArray | None = None,
    b0: float = 0.0,
    callback: Callable[[int, float], None] | None = None,
    optimizer: Optimizer = "gd",
    block_size: int | None = None,
    n_threads: int = 1,
    engine: Engine = "auto",
    sample_weight: FloatArray | None = None,
    resume: TrainState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    monitor: Callable[[int, FloatArray, float], None] | None = None,
) -> FitResult:
    """Fit one model: minimize the regularized log-loss by gradient descent or a faster solver.

    Every solver calls one :class:`~lr_kernel.FusedLoss` built here, so each
    iteration reads ``X`` once and allocates nothing of size ``n_examples``.

    Parameters
    ----------
    X : ndarray of shape (n_features, n_examples), or a :class:`~lr_kernel.TiledMatrix`
        Column-stacked, float32 or float64; never written.
    Y : ndarray of shape (1, n_examples)
        0.0/1.0 labels in ``X``'s dtype.
    learning_rate : float
        Step size ``alpha`` of ``w -= alpha * dw``; must be > 0. Required by
        ``"gd"`` and ``"nesterov"``; ignored by ``"lbfgs"``, which searches its steps.
    iterations : int
        Most updates to apply; must be >= 1.
    l2 : float, default 0.0
        L2 penalty strength (>= 0).
    tol : float, default 0.0
        Converged when ``max |∇J| <= tol``: every component of the gradient
        (terms and intercept, on ``X``'s scale) at most ``tol``, for every
        solver (:class:`~lr_kernel.convergence.StopRule`); 0 never converges.
    w0 : ndarray of shape (n_features, 1), optional
        Initial weights (zeros by default); copied, never modified.
    b0 : float, default 0.0
        Initial intercept.
    callback : callable ``(iteration, cost) -> None``, optional
        Called after each update with the update's number (from 1) and the new cost;
        also once with ``(0, initial cost)``.
    optimizer : {"gd", "nesterov", "lbfgs", "newton", "auto"}, default "gd"
        ``"gd"``: ``w -= alpha * dw``. ``"nesterov"``: accelerated gradient with
        an adaptive restart (momentum is dropped whenever the cost rises).
        ``"lbfgs"``: ``scipy.optimize.minimize(method="L-BFGS-B", jac=True)``;
        one history row per L-BFGS iteration (each may evaluate the loss more
        than once; the row is the cost at the accepted iterate).
        ``"newton"``: Newton's method, the Hessian from the same fused pass
        (:meth:`~lr_kernel.FusedLoss.hessian`), a Cholesky solve and a
        backtracking line search. ``"auto"``: ``"newton"`` up to
        ``NEWTON_MAX_FEATURES`` features, else ``"lbfgs"``
        (:func:`resolve_optimizer`). The last three ignore ``learning_rate``.
    block_size, n_threads, engine : see :class:`~lr_kernel.FusedLoss` (and
        :class:`~lr_kernel.FusedLossMany` for a grid's).
    sample_weight : ndarray of shape (1, n_examples), optional
        Row weights ``s`` (finite, >= 0): the objective becomes
        ``(Σ s ℓ + (l2/2) ||w||²) / Σs``, whose minimizer is scikit-learn's
        ``LogisticRegression(C=1/l2)`` fitted with ``sample_weight=s``.
    resume : TrainState, optional
        Go on from this state (a checkpoint) instead of ``(w0, b0)``: its history
        is kept, and ``iterations`` counts the updates of the whole run, so a run
        resumed at iteration 300 of 1000 applies 700 more.
    checkpoint_every : int, default 0
        Every this many updates, call ``on_checkpoint`` with the
        :class:`TrainState` (0: never).
    on_checkpoint : callable ``(TrainState) -> None``, optional
        Receives copies; it may save them anywhere.
    monitor : callable ``(iteration, w, b) -> None``, optional
        Called at the same points as ``callback`` with the parameters whose cost
        that is (e.g. to track a held-out cost). ``w`` is the live
        ``(n_features, 1)`` array: read it, never keep or modify it.

    Returns
    -------
    FitResult

    A grid of ``l2`` values or learning rates is :func:`~lr_kernel.fit_many`'s.
    """
    if not isinstance(l2, int | float) or not isinstance(learning_rate, int | float | None):
        raise TypeError("fit fits one model: l2 and learning_rate are numbers (a grid: fit_many)")
    m = X.shape[1]
    if Y.shape != (1, m):
        raise ValueError(f"Y must have shape (1, {m}), got {Y.shape}")
    loss = FusedLoss(
        X,
        Y,
        sample_weight=sample_weight,
        block_size=block_size,
        n_threads=n_threads,
        engine=engine,
    )
    return fit_loss(
        loss,
        learning_rate=learning_rate,
        iterations=iterations,
        l2=l2,
        tol=tol,
        w0=w0,
        b0=b0,
        callback=callback,
        optimizer=optimizer,
        resume=resume,
        checkpoint_every=checkpoint_every,
        on_checkpoint=on_checkpoint,
        monitor=monitor,
    )


def fit_loss(
    loss: LossFunction,
    *,
    learning_rate: float | None = None,
    iterations: int,
    l2: float = 0.0,
    tol: float = 0.0,
    w0: FloatArray | None = None,
    b0: float = 0.0,
    callback: Callable[[int, float], None] | None = None,
    optimizer: Optimizer = "gd",
    resume: TrainState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    monitor: Callable[[int, FloatArray, float], None] | None = None,
) -> FitResult:
    """:func:`fit` on any source of the cost and gradients: the backend seam.

    ``loss`` is anything that follows :class:`~lr_kernel.LossFunction` (the
    in-memory :class:`~lr_kernel.FusedLoss`, a streamed or sharded sum); the
    solvers see nothing else of the data. Other arguments as :func:`fit`.
    """
    n = loss.n_features
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    optimizer = resolve_optimizer(optimizer, loss)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if optimizer not in SEARCHING and (
        learning_rate is None or not learning_rate > 0 or not math.isfinite(learning_rate)
    ):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate}")
    if not l2 >= 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be >= 0 and finite, got {l2}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    momentum: dict[str, FloatArray | float] = {}
    if resume is not None:
        if resume.optimizer != optimizer:
            raise ValueError(f"resume state is for {resume.optimizer!r}, not {optimizer!r}")
        if resume.w.shape != (n, 1):
            raise ValueError(f"resume state's w must have shape ({n}, 1), got {resume.w.shape}")
        w0, b0, momentum = resume.w, resume.b, resume.momentum
    if w0 is None:
        w = np.zeros((n, 1), dtype=loss.dtype)
    else:
        if w0.shape != (n, 1):
            raise ValueError(f"w0 must have shape ({n}, 1), got {w0.shape}")
        w = np.array(w0, dtype=loss.dtype)
    history = _History(callback, resume, checkpoint_every, on_checkpoint, monitor)
    if history.n_iterations >= iterations:  # resumed at or past the end: nothing left
        return history.result(w, float(b0), "iterations")
    if optimizer == "lbfgs":
        return _lbfgs(loss, w, float(b0), l2, iterations, tol, history)
    if optimizer == "newton":
        assert isinstance(loss, SecondOrderLoss)  # resolve_optimizer checked it
        return _newton(loss, w, float(b0), l2, iterations, tol, history)
    assert learning_rate is not None  # checked above
    if optimizer == "nesterov":
        return _nesterov(loss, w, float(b0), l2, learning_rate, iterations, tol, history, momentum)
    return _gradient_descent(loss, w, float(b0), l2, learning_rate, iterations, tol, history)


def auto_optimizer(n_features: int, second_order: bool = True) -> Optimizer:
    """What ``"auto"`` stands for over ``n_features`` features: ``"newton"`` when the loss
    gives its Hessian and ``n_features <= NEWTON_MAX_FEATURES``, else ``"lbfgs"``."""
    return "newton" if second_order and n_features <= NEWTON_MAX_FEATURES else "lbfgs"


def resolve_optimizer(optimizer: Optimizer, loss: LossFunction) -> Optimizer:
    """The optimizer ``"auto"`` stands for: ``"newton"`` when ``loss`` gives its
    Hessian (:class:`~lr_kernel.loss.SecondOrderLoss`) and has at most
    ``NEWTON_MAX_FEATURES`` features, else ``"lbfgs"``. ``"newton"`` on a loss
    without a Hessian is an error; other names are returned as they are."""
    second_order = isinstance(loss, SecondOrderLoss)
    if optimizer == "auto":
        return auto_optimizer(loss.n_features, second_order)
    if optimizer == "newton" and not second_order:
        raise ValueError("optimizer 'newton' needs a loss with a hessian() (SecondOrderLoss)")
    return optimizer


def _newton(
    loss: SecondOrderLoss,
    w: FloatArray,
    b: float,
    l2: float,
    iterations: int,
    tol: float,
    history: _History,
) -> FitResult:
    """Newton's method: a Cholesky solve of ``H p = -∇J`` and a backtracking line search.

    Each iteration's first trial point is evaluated with the Hessian pass, so
    the usual full step costs one pass over ``X``; a rejected step halves,
    with gradient-only passes, and the accepted point then gets its Hessian.
    A step is accepted on Armijo's sufficient decrease or, where the decrease
    it predicts is below the cost's rounding (at the optimum), when the cost
    does not rise beyond rounding and ``max |∇J|`` falls. ``H`` that is not
    positive definite (no ``l2`` and collinear terms, or separation) gets the
    smallest multiple of the identity, from ``1e-12`` of its trace up, that
    makes it so.
    """
    import scipy.linalg

    n = loss.n_features
    dtype = loss.dtype
    cost, dw, db, H = loss.hessian(w, b, l2)
    history.start(cost, dw, db, w, b)
    rule = history.stop_rule(tol, dtype)
    stop_reason = rule.check(cost, None, dw, db, monotone=True)
    theta = np.concatenate([w.ravel().astype(np.float64), [b]])  # (n + 1,)

    def split(t: FloatArray) -> tuple[FloatArray, float]:
        return t[:n].reshape(n, 1).astype(dtype), float(t[n])

    while stop_reason is None and history.n_iterations < iterations:
        g = np.concatenate([dw.ravel().astype(np.float64), [db]])  # (n + 1,)
        shift = 0.0
        while True:
            try:
                factor = scipy.linalg.cho_factor(H + shift * np.eye(n + 1), check_finite=False)
                break
            except np.linalg.LinAlgError:
                shift = max(10 * shift, 1e-12 * float(np.trace(H)) / (n + 1))
        direction = -scipy.linalg.cho_solve(factor, g, check_finite=False)  # (n + 1,)
        slope = float(g @ direction)  # < 0
        rounding = rule.rise_rtol * abs(cost)
        gradient_now = gradient_max(dw, db)
        step = 1.0
        trial = theta + direction
        new_H: NDArray[np.float64] | None
        new_cost, new_dw, new_db, new_H = loss.hessian(*split(trial), l2)
        while not (
            new_cost <= cost + ARMIJO * step * slope
            or (new_cost <= cost + rounding and gradient_max(new_dw, new_db) < gradient_now)
        ):
            step /= 2
            if step < MIN_STEP:
                break
            trial = theta + step * direction
            new_cost, new_dw, new_db = loss(*split(trial), l2)
            new_H = None
        if step < MIN_STEP:
            stop_reason = "stalled"
            break
        if new_H is None:
            new_cost, new_dw, new_db, new_H = loss.hessian(*split(trial), l2)
        theta, cost, dw, db, H = trial, new_cost, new_dw, new_db, new_H
        history.record(cost, dw, db, *split(theta))
        stop_reason = rule.check(cost, None, dw, db, monotone=True)
        if stop_reason is None:
            history.checkpoint("newton", *split(theta))
    # H is always the Hessian at theta: computed with each accepted point.
    return history.result(*split(theta), stop_reason or "iterations", hessian=H)


def _gradient_descent(
    loss: LossFunction,
    w: FloatArray,
    b: float,
    l2: float,
    learning_rate: float,
    iterations: int,
    tol: float,
    history: _History,
) -> FitResult:
    cost, dw, db = loss(w, b, l2)
    history.start(cost, dw, db, w, b)
    rule = history.stop_rule(tol, loss.dtype)
    stop_reason = rule.check(cost, None, dw, db)
    for _ in range(iterations - history.n_iterations):
        if stop_reason is not None:
            break
        w -= learning_rate * dw
        b -= learning_rate * db
        previous = cost
        cost, dw, db = loss(w, b, l2)
        history.record(cost, dw, db, w, b)
        stop_reason = rule.check(cost, previous, dw, db)
        if stop_reason is None:
            history.checkpoint("gd", w, b)
    return history.result(w, b, stop_reason or "iterations")


def _nesterov(
    loss: LossFunction,
    w: FloatArray,
    b: float,
    l2: float,
    learning_rate: float,
    iterations: int,
    tol: float,
    history: _History,
    momentum_state: dict[str, FloatArray | float],
) -> FitResult:
    """Accelerated gradient (FISTA's momentum schedule) with function-value restart.

    The loss is evaluated once per iteration, at the extrapolated point
    ``(v, c)``; that point is the iterate the history and the result report,
    so ``cost_history[-1]`` is the cost of the returned parameters. When the
    cost rises, momentum is dropped (O'Donoghue & Candès 2015), so the next
    update is a plain gradient step: a rise that survives
    ``convergence.DIVERGENCE_PATIENCE`` updates in a row is a step that is too large, as
    for ``"gd"``, and so is a cost above the initial cost.
    """
    v, c = w, b  # the evaluation point (v, c); (w, b) is the last gradient step
    t = 1.0
    if momentum_state:
        w = np.array(momentum_state["w_step"], dtype=v.dtype)
        b = float(momentum_state["b_step"])
        t = float(momentum_state["t"])
    cost, dw, db = loss(v, c, l2)
    history.start(cost, dw, db, v, c)
    rule = history.stop_rule(tol, loss.dtype)
    stop_reason = rule.check(cost, None, dw, db)
    for _ in range(iterations - history.n_iterations):
        if stop_reason is not None:
            break
        w_next = v - learning_rate * dw
        b_next = c - learning_rate * db
        previous = cost
        if rule.rises:
            t = 1.0  # restart: the step after a rise carries no momentum
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        momentum = (t - 1.0) / t_next
        v = w_next + momentum * (w_next - w)
        c = b_next + momentum * (b_next - b)
        w, b, t = w_next, b_next, t_next
        cost, dw, db = loss(v, c, l2)
        history.record(cost, dw, db, v, c)
        stop_reason = rule.check(cost, previous, dw, db)
        if stop_reason is None:
            history.checkpoint("nesterov", v, c, {"w_step": w, "b_step": b, "t": t})
    return history.result(v, c, stop_reason or "iterations")


def _lbfgs(
    loss: LossFunction,
    w: FloatArray,
    b: float,
    l2: float,
    iterations: int,
    tol: float,
    history: _History,
) -> FitResult:
    """``scipy.optimize.minimize(method="L-BFGS-B", jac=True)`` over the fused loss.

    SciPy works on ``theta = [w; b]`` in float64; the loss is evaluated in
    ``X``'s dtype. The callback receives each accepted iterate; its cost and
    gradient come from the evaluation the line search ended on (kept here), so
    recording the history costs no extra pass over ``X``.
    """
    n = loss.n_features
    dtype = loss.dtype
    # The latest evaluation: (theta, cost, dw, db).
    last: list[tuple[FloatArray, float, FloatArray, float]] = []

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        w_eval = theta[:n].reshape(n, 1).astype(dtype)
        cost, dw, db = loss(w_eval, float(theta[n]), l2)
        grad = np.empty(n + 1, dtype=np.float64)
        grad[:n] = dw.ravel()
        grad[n] = db
        last[:] = [(theta.copy(), cost, dw, db)]
        # A non-finite cost makes the line search step back instead of failing.
        return (cost if math.isfinite(cost) else math.inf), grad

    def evaluated_at(theta: FloatArray) -> tuple[float, FloatArray, float]:
        if not last or not np.array_equal(last[0][0], theta):
            objective(theta)
        _, cost, dw, db = last[0]
        return cost, dw, db

    def parameters(theta: FloatArray) -> tuple[FloatArray, float]:
        return theta[:n].reshape(n, 1).astype(dtype), float(theta[n])

    theta0 = np.concatenate([w.ravel().astype(np.float64), [b]])
    history.start(*evaluated_at(theta0), *parameters(theta0))
    rule = history.stop_rule(tol, dtype)
    accepted = [theta0]
    cost0, dw0, db0 = evaluated_at(theta0)
    stop_reason = rule.check(cost0, None, dw0, db0, monotone=True)
    if stop_reason is not None:
        return history.result(*parameters(theta0), stop_reason)

    def on_iteration(intermediate_result: Any) -> None:  # a scipy OptimizeResult
        nonlocal stop_reason
        theta = np.asarray(intermediate_result.x, dtype=np.float64)
        accepted.append(theta.copy())
        cost, dw, db = evaluated_at(theta)
        history.record(cost, dw, db, *parameters(theta))
        stop_reason = rule.check(cost, None, dw, db, monotone=True)
        if stop_reason is not None:
            raise StopIteration  # SciPy ends the run at this iterate
        history.checkpoint("lbfgs", *parameters(theta))

    # Imported here: scipy.optimize takes half a second to import, and only
    # this solver needs it.
    import scipy.optimize

    result = scipy.optimize.minimize(
        objective,
        theta0,
        method="L-BFGS-B",
        jac=True,
        callback=on_iteration,
        options={
            "maxiter": max(1, iterations - history.n_iterations),
            "maxfun": max(15_000, 20 * iterations),
            # SciPy's own rules off: the run converges only by the StopRule
            # (raised from the callback). ftol = 0 still ends a run whose cost
            # no longer decreases at all.
            "ftol": 0.0,
            "gtol": 0.0,
        },
    )
    theta = accepted[-1]
    if stop_reason is None:
        if not math.isfinite(history.costs[-1]):
            stop_reason = "diverged"
        elif result.status == 1:  # iteration or evaluation budget spent
            stop_reason = "iterations"
        else:
            # 0 (no decrease of the cost) or 2 (ABNORMAL: the line search found
            # no lower cost) while max |∇J| > tol: rounding stops it.
            stop_reason = "stalled"
    return history.result(*parameters(theta), stop_reason)

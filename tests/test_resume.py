"""Checkpoints from the kernel, and runs resumed from them, against uninterrupted runs."""

import numpy as np
import pytest

from lr_kernel import TrainState, fit


def problem(seed=0, n=6, m=3000):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m))
    X[1] = 0.8 * X[0] + 0.2 * X[1]  # some correlation, so nesterov's momentum matters
    Y = (rng.random((1, m)) < 1 / (1 + np.exp(-(X[0] - 0.5 * X[2])))).astype(np.float64)
    return X, Y


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_a_resumed_run_is_bitwise_the_uninterrupted_run(optimizer, engine):
    X, Y = problem()
    kwargs = dict(
        learning_rate=0.7, iterations=120, l2=0.5, optimizer=optimizer, n_threads=2,
        block_size=512, engine=engine,
    )  # fmt: skip
    whole = fit(X, Y, **kwargs)
    states: list[TrainState] = []
    fit(X, Y, **{**kwargs, "iterations": 50}, checkpoint_every=25, on_checkpoint=states.append)
    assert [s.iteration for s in states] == [25, 50]
    resumed = fit(X, Y, **kwargs, resume=states[0])
    np.testing.assert_array_equal(resumed.w, whole.w)
    assert resumed.b == whole.b
    np.testing.assert_array_equal(resumed.cost_history, whole.cost_history)
    np.testing.assert_array_equal(resumed.gradient_norm_history, whole.gradient_norm_history)
    assert resumed.n_iterations == whole.n_iterations == 120


def test_checkpoints_are_copies_taken_at_their_iteration():
    X, Y = problem(1)
    states: list[TrainState] = []
    result = fit(
        X, Y, learning_rate=0.5, iterations=30, checkpoint_every=10, on_checkpoint=states.append
    )
    assert [s.iteration for s in states] == [10, 20, 30]
    assert states[0].cost_history.shape == (11,)
    np.testing.assert_array_equal(states[-1].w, result.w)
    assert not np.array_equal(states[0].w, result.w)  # not a view of the live parameters
    np.testing.assert_array_equal(states[1].cost_history, result.cost_history[:21])


def test_lbfgs_resumes_to_the_same_optimum():
    X, Y = problem(2)
    whole = fit(X, Y, iterations=200, l2=1.0, tol=1e-14, optimizer="lbfgs")
    states: list[TrainState] = []
    fit(
        X,
        Y,
        iterations=5,
        l2=1.0,
        optimizer="lbfgs",
        checkpoint_every=5,
        on_checkpoint=states.append,
    )
    resumed = fit(X, Y, iterations=200, l2=1.0, tol=1e-14, optimizer="lbfgs", resume=states[-1])
    np.testing.assert_allclose(resumed.w, whole.w, rtol=1e-6, atol=1e-8)
    assert resumed.cost_history[:6].tolist() == states[-1].cost_history.tolist()


def test_resume_at_the_end_applies_nothing_and_mismatches_are_refused():
    X, Y = problem(3)
    states: list[TrainState] = []
    fit(X, Y, learning_rate=0.5, iterations=10, checkpoint_every=10, on_checkpoint=states.append)
    done = fit(X, Y, learning_rate=0.5, iterations=10, resume=states[-1])
    assert done.n_iterations == 10
    np.testing.assert_array_equal(done.w, states[-1].w)
    with pytest.raises(ValueError, match="resume state is for 'gd', not 'nesterov'"):
        fit(X, Y, learning_rate=0.5, iterations=20, optimizer="nesterov", resume=states[-1])
    with pytest.raises(ValueError, match="shape"):
        fit(X[:3], Y, learning_rate=0.5, iterations=20, resume=states[-1])

"""Metrics in NumPy: ROC AUC with ties, every contracted metric, the held-out cost tracker."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_kernel import fit
from lr_kernel.metrics import METRIC_NAMES, HeldOutCost, binary_metrics, log_loss, roc_auc

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_log_loss_of_zero_scores_is_log_2():
    Y = np.array([[0.0, 1.0, 1.0, 0.0]])
    assert log_loss(np.zeros((1, 4)), Y) == pytest.approx(np.log(2), rel=1e-15)


def test_log_loss_stays_finite_for_confident_mistakes():
    # sigmoid(-800) underflows to 0, so log(A) would be -inf; softplus does not.
    assert log_loss(np.array([[-800.0]]), np.array([[1.0]])) == pytest.approx(800.0, rel=1e-15)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 1.0),
        ([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied: every pair counts one half
        ([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),  # one tied pair among four
    ],
)
def test_roc_auc_closed_forms(scores, labels, expected):
    assert roc_auc(np.array([scores]), np.array([labels], dtype=float)) == expected


def test_roc_auc_of_one_class_is_nan():
    assert np.isnan(roc_auc(np.array([[0.1, 0.2]]), np.array([[1.0, 1.0]])))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 300),
    distinct=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_roc_auc_matches_scikit_learn_with_ties(m, distinct, seed):
    rng = np.random.default_rng(seed)
    Z = rng.integers(0, distinct, size=(1, m)).astype(float)  # few values: many ties
    Y = rng.integers(0, 2, size=(1, m)).astype(float)
    if Y.min() == Y.max():
        Y[0, 0] = 1.0 - Y[0, 0]
    expected = sklearn_metrics.roc_auc_score(Y.ravel(), Z.ravel())
    assert roc_auc(Z, Y) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_depends_on_the_order_only():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(1, 500))
    Y = (rng.random((1, 500)) < 1 / (1 + np.exp(-Z))).astype(float)
    assert roc_auc(Z, Y) == roc_auc(1 / (1 + np.exp(-Z)), Y) == roc_auc(3 * Z - 7, Y)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_binary_metrics_match_scikit_learn(threshold):
    rng = np.random.default_rng(2)
    Z = rng.normal(scale=2, size=(1, 1000))
    Y = (rng.random((1, 1000)) < 1 / (1 + np.exp(-Z + 0.3))).astype(float)
    ours = binary_metrics(Z, Y, threshold)
    assert list(ours) == list(METRIC_NAMES)
    y, p = Y.ravel(), 1 / (1 + np.exp(-Z.ravel()))
    predicted = (p >= threshold).astype(float)
    expected = {
        "log_loss": sklearn_metrics.log_loss(y, p),
        "accuracy": sklearn_metrics.accuracy_score(y, predicted),
        "precision": sklearn_metrics.precision_score(y, predicted),
        "recall": sklearn_metrics.recall_score(y, predicted),
        "f1": sklearn_metrics.f1_score(y, predicted),
        "roc_auc": sklearn_metrics.roc_auc_score(y, p),
        "n_examples": 1000.0,
        "positive_rate": float(np.mean(y)),
    }
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_zero_division_follows_scikit_learn():
    # Nothing predicted positive: precision, recall and f1 are 0 (zero_division=0).
    Z = np.full((1, 4), -5.0)
    Y = np.array([[0.0, 1.0, 0.0, 1.0]])
    ours = binary_metrics(Z, Y)
    predicted = np.zeros(4)
    assert ours["precision"] == sklearn_metrics.precision_score(Y[0], predicted, zero_division=0)
    assert ours["recall"] == ours["f1"] == 0.0
    assert ours["accuracy"] == 0.5


def test_held_out_cost_records_every_kth_and_the_last():
    rng = np.random.default_rng(3)
    X, X_val = rng.normal(size=(3, 200)), rng.normal(size=(3, 50))
    Y = (rng.random((1, 200)) < 0.5).astype(float)
    Y_val = (rng.random((1, 50)) < 0.5).astype(float)
    monitor = HeldOutCost(X_val, Y_val, every=4)
    result = fit(X, Y, learning_rate=0.1, iterations=10, monitor=monitor)
    history = monitor.history(result.n_iterations, result.w, result.b)
    assert history.shape == (11,)
    assert np.flatnonzero(~np.isnan(history)).tolist() == [0, 4, 8, 10]
    assert history[0] == pytest.approx(np.log(2), rel=1e-15)  # w = 0, b = 0
    final = log_loss(result.w.T @ X_val + result.b, Y_val)
    assert history[10] == pytest.approx(final, rel=1e-15)


def test_monitor_sees_the_parameters_whose_cost_the_callback_gets():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(2, 100))
    Y = (rng.random((1, 100)) < 0.5).astype(float)
    costs: dict[int, float] = {}
    recomputed: dict[int, float] = {}

    def monitor(iteration, w, b):
        recomputed[iteration] = log_loss(w.T @ X + b, Y)

    fit(X, Y, learning_rate=0.5, iterations=5, callback=costs.__setitem__, monitor=monitor)
    assert costs.keys() == recomputed.keys() == set(range(6))
    for iteration, cost in costs.items():  # l2 = 0: the cost is the log-loss
        assert recomputed[iteration] == pytest.approx(cost, rel=1e-12)

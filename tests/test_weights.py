"""Row weights in the kernel: the fused passes, the solvers, metrics and the step size."""

import numpy as np
import pytest

from lr_kernel import FusedLoss, FusedLossMany, fit, fit_many, loss_from_sums
from lr_kernel.metrics import HeldOutCost, binary_metrics, log_loss
from lr_kernel.reference import loss_and_gradients_double_loop, loss_and_gradients_loop
from lr_kernel.stepsize import stable_learning_rate
from tests.conftest import real_binary_dataset

ENGINES = ["numpy", "numba"]


def weighted_problem(n=5, m=700, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m)).astype(dtype)
    true_w = rng.normal(size=(n, 1))
    Y = (rng.random((1, m)) < 1 / (1 + np.exp(-(true_w.T @ X + 0.3)))).astype(dtype)
    s = rng.uniform(0.0, 3.0, size=(1, m))  # (1, m) float64
    s[0, :7] = 0.0  # zero weights are allowed
    w = rng.normal(size=(n, 1)).astype(dtype)
    return X, Y, s, w


def standardized(name):
    data, labels = real_binary_dataset(name)
    X = ((data - data.mean(axis=0)) / data.std(axis=0)).T.copy()  # (n, m)
    Y = (labels == np.unique(labels)[1]).astype(np.float64).reshape(1, -1)
    return X, Y


@pytest.mark.parametrize("engine", ENGINES)
def test_weighted_pass_equals_the_loop_formula(engine):
    X, Y, s, w = weighted_problem()
    loss = FusedLoss(X, Y, sample_weight=s, engine=engine, block_size=128, n_threads=2)
    cost, dw, db = loss(w, 0.4, 2.0)
    ref_cost, ref_dw, ref_db = loss_and_gradients_loop(X, Y, w, 0.4, 2.0, sample_weight=s)
    two_cost, two_dw, two_db = loss_and_gradients_double_loop(X, Y, w, 0.4, 2.0, sample_weight=s)
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-13)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db, ref_db, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([two_cost, two_db], [ref_cost, ref_db], rtol=1e-13)
    np.testing.assert_allclose(two_dw, ref_dw, rtol=1e-12)
    assert loss.weight_sum == pytest.approx(float(s.sum()), rel=1e-15)


@pytest.mark.parametrize("engine", ENGINES)
def test_weighted_gradient_matches_finite_differences(engine):
    X, Y, s, w = weighted_problem(n=4, m=300, seed=1)
    loss = FusedLoss(X, Y, sample_weight=s, engine=engine)
    b, l2, h = -0.2, 0.7, 1e-6
    _, dw, db = loss(w, b, l2)
    for j in range(w.shape[0]):
        step = np.zeros_like(w)
        step[j] = h
        numeric = (loss(w + step, b, l2)[0] - loss(w - step, b, l2)[0]) / (2 * h)
        assert dw[j, 0] == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    numeric_b = (loss(w, b + h, l2)[0] - loss(w, b - h, l2)[0]) / (2 * h)
    assert db == pytest.approx(numeric_b, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_engines_agree_with_weights_to_rounding(dtype):
    X, Y, s, w = weighted_problem(n=11, m=5000, seed=2, dtype=dtype)
    X[:, :3] *= 400.0  # extreme scores on a few examples
    results = [
        FusedLoss(X, Y, sample_weight=s, engine=engine, block_size=512, n_threads=2)(w, 0.1, 1.0)
        for engine in ENGINES
    ]
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=rtol)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("engine", ENGINES)
def test_unit_weights_give_the_unweighted_bits(engine):
    X, Y, _, w = weighted_problem(m=2000, seed=3)
    ones = np.ones((1, X.shape[1]))
    plain = FusedLoss(X, Y, engine=engine, block_size=256, n_threads=2)
    weighted = FusedLoss(X, Y, sample_weight=ones, engine=engine, block_size=256, n_threads=2)
    assert plain.weight_sum == weighted.weight_sum == X.shape[1]
    a, b = plain.partial_sums(w, 0.2), weighted.partial_sums(w, 0.2)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("engine", ENGINES)
def test_integer_weights_equal_repeated_rows(engine):
    X, Y, _, w = weighted_problem(m=400, seed=4)
    counts = np.random.default_rng(4).integers(0, 4, size=X.shape[1])
    counts[0] = 2
    repeated = np.repeat(np.arange(X.shape[1]), counts)
    X_rep, Y_rep = np.ascontiguousarray(X[:, repeated]), np.ascontiguousarray(Y[:, repeated])
    s = counts.astype(np.float64).reshape(1, -1)
    weighted = FusedLoss(X, Y, sample_weight=s, engine=engine)
    plain = FusedLoss(X_rep, Y_rep, engine=engine)
    assert weighted.weight_sum == plain.weight_sum == repeated.size
    for got, want in zip(weighted(w, 0.3, 1.5), plain(w, 0.3, 1.5), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    fit_weighted = fit(X, Y, optimizer="lbfgs", iterations=200, l2=1.5, sample_weight=s)
    fit_repeated = fit(X_rep, Y_rep, optimizer="lbfgs", iterations=200, l2=1.5)
    np.testing.assert_allclose(fit_weighted.w, fit_repeated.w, rtol=1e-6)
    # The step size bounds the same curvature.
    assert stable_learning_rate(X, 1.5, sample_weight=s) == pytest.approx(
        stable_learning_rate(X_rep, 1.5), rel=1e-9
    )


def test_loss_from_sums_divides_by_the_total_weight():
    X, Y, s, w = weighted_problem(m=300, seed=5)
    loss = FusedLoss(X, Y, sample_weight=s)
    loss_sum, dw_sum, db_sum = loss.partial_sums(w, 0.1)
    cost, dw, db = loss_from_sums(loss_sum, dw_sum, db_sum, w, 2.0, loss.weight_sum, X.dtype)
    total = float(s.sum())
    assert cost == pytest.approx((loss_sum + w.ravel() @ w.ravel()) / total, rel=1e-14)
    np.testing.assert_allclose(dw, (dw_sum.reshape(-1, 1) + 2.0 * w) / total, rtol=1e-14)
    assert db == pytest.approx(db_sum / total, rel=1e-14)


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_weighted_fit_equals_sklearn_sample_weight(name):
    from sklearn.linear_model import LogisticRegression

    X, Y = standardized(name)
    s = np.random.default_rng(6).uniform(0.2, 3.0, size=(1, X.shape[1]))
    l2 = 1.0
    result = fit(X, Y, optimizer="lbfgs", iterations=5000, l2=l2, tol=0.0, sample_weight=s)
    oracle = LogisticRegression(C=1 / l2, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    oracle.fit(X.T, Y.ravel(), sample_weight=s.ravel())
    np.testing.assert_allclose(result.w.ravel(), oracle.coef_.ravel(), rtol=1e-6, atol=1e-8)
    assert result.b == pytest.approx(oracle.intercept_[0], rel=1e-6, abs=1e-8)


def test_balanced_class_weights_equal_sklearn():
    from sklearn.linear_model import LogisticRegression

    X, Y = standardized("breast_cancer")
    m = Y.size
    positives = Y.sum()
    # scikit-learn's 'balanced': m / (2 m_c) for an example of class c.
    s = np.where(Y == 1.0, m / (2 * positives), m / (2 * (m - positives)))  # (1, m)
    result = fit(X, Y, optimizer="lbfgs", iterations=5000, l2=0.5, tol=0.0, sample_weight=s)
    oracle = LogisticRegression(
        C=2.0, class_weight="balanced", solver="newton-cholesky", tol=1e-12, max_iter=1000
    )
    oracle.fit(X.T, Y.ravel())
    np.testing.assert_allclose(result.w.ravel(), oracle.coef_.ravel(), rtol=1e-6, atol=1e-8)
    assert result.b == pytest.approx(oracle.intercept_[0], rel=1e-6, abs=1e-8)


def test_fused_loss_many_weighted_equals_single_models():
    X, Y, s, _ = weighted_problem(n=6, m=3000, seed=7)
    W = np.random.default_rng(7).normal(size=(6, 3))
    b = np.array([0.1, -0.4, 0.0])
    l2 = np.array([0.0, 1.0, 5.0])
    many = FusedLossMany(X, Y, n_models=3, sample_weight=s, block_size=1024, n_threads=2)
    cost, dW, db = many(W, b, l2)
    single = FusedLoss(X, Y, sample_weight=s)
    assert many.weight_sum == single.weight_sum
    for k in range(3):
        c, dw, d = single(W[:, k : k + 1], float(b[k]), float(l2[k]))
        assert cost[k] == pytest.approx(c, rel=1e-12)
        np.testing.assert_allclose(dW[:, k : k + 1], dw, rtol=1e-10, atol=1e-14)
        assert db[k] == pytest.approx(d, rel=1e-10, abs=1e-14)


def test_fit_many_weighted_candidates_equal_separate_fits():
    X, Y, s, _ = weighted_problem(n=4, m=800, seed=8)
    grid = fit_many(X, Y, learning_rate=0.5, iterations=60, l2=[0.0, 2.0], tol=0.0, sample_weight=s)
    for k, l2 in enumerate([0.0, 2.0]):
        alone = fit(X, Y, learning_rate=0.5, iterations=60, l2=l2, tol=0.0, sample_weight=s)
        np.testing.assert_allclose(grid.w[:, k : k + 1], alone.w, rtol=1e-10, atol=1e-13)


def test_weighted_metrics_equal_sklearn():
    from sklearn import metrics

    rng = np.random.default_rng(9)
    m = 500
    Z = rng.normal(size=(1, m)).round(1)  # ties on purpose
    Y = (rng.random((1, m)) < 0.3).astype(np.float64)
    s = rng.uniform(0, 2, size=(1, m))
    got = binary_metrics(Z, Y, sample_weight=s)
    y, p, sw = Y.ravel(), 1 / (1 + np.exp(-Z.ravel())), s.ravel()
    predicted = (p >= 0.5).astype(float)
    assert got["log_loss"] == pytest.approx(metrics.log_loss(y, p, sample_weight=sw), rel=1e-12)
    assert got["accuracy"] == pytest.approx(
        metrics.accuracy_score(y, predicted, sample_weight=sw), rel=1e-12
    )
    for name, score in [
        ("precision", metrics.precision_score),
        ("recall", metrics.recall_score),
        ("f1", metrics.f1_score),
    ]:
        assert got[name] == pytest.approx(score(y, predicted, sample_weight=sw), rel=1e-12)
    assert got["roc_auc"] == pytest.approx(metrics.roc_auc_score(y, p, sample_weight=sw), rel=1e-12)
    assert got["positive_rate"] == pytest.approx(np.average(y, weights=sw), rel=1e-12)
    assert got["n_examples"] == m


def test_weighted_metrics_equal_repeated_rows():
    rng = np.random.default_rng(10)
    m = 300
    Z = rng.normal(size=(1, m)).round(1)
    Y = (rng.random((1, m)) < 0.4).astype(np.float64)
    counts = rng.integers(0, 3, size=m)
    rows = np.repeat(np.arange(m), counts)
    got = binary_metrics(Z, Y, sample_weight=counts.astype(float).reshape(1, -1))
    want = binary_metrics(Z[:, rows], Y[:, rows])
    for name in got:
        if name != "n_examples":
            assert got[name] == pytest.approx(want[name], rel=1e-12), name


def test_held_out_cost_is_weighted():
    X, Y, s, w = weighted_problem(m=200, seed=11)
    monitor = HeldOutCost(X, Y, sample_weight=s)
    assert monitor.cost(w, 0.5) == pytest.approx(log_loss(w.T @ X + 0.5, Y, s), rel=1e-15)
    assert monitor.cost(w, 0.5) == pytest.approx(FusedLoss(X, Y, sample_weight=s)(w, 0.5)[0])


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((1, 5)),
        -np.ones((1, 10)),
        np.full((1, 10), np.nan),
        np.zeros((1, 10)),
        np.ones((1, 10), dtype=np.int64),
    ],
)
def test_bad_weights_are_refused(bad):
    X, Y, _, _ = weighted_problem(m=10)
    with pytest.raises(ValueError, match="sample_weight"):
        FusedLoss(X, Y, sample_weight=bad)

"""The Hessian pass, Newton's method, and the statistics of a fit against statsmodels."""

import warnings

import numpy as np
import pytest

from lr_kernel import FusedLoss, LossFunction, fit, fit_many
from lr_kernel.inference import (
    aliased_terms,
    coefficient_table,
    covariance,
    separation,
    to_raw_scale,
)
from lr_kernel.loss import SecondOrderLoss, hessian_from_sums
from lr_kernel.train import NEWTON_MAX_FEATURES, resolve_optimizer
from tests.conftest import real_binary_dataset

sm = pytest.importorskip("statsmodels.api")

# Columns of breast_cancer whose Hessian is well conditioned (cond < 30 standardized)
# and not separated: mean texture, smoothness, symmetry, fractal dimension, worst texture.
CANCER_COLUMNS = [1, 4, 8, 9, 21]
# wine, class 0 against the rest: malic acid, ash, magnesium.
WINE_COLUMNS = [1, 2, 4]


def raw_problem(name, columns):
    data, labels = real_binary_dataset(name)
    raw = data[:, columns]  # (m, n)
    y = (labels == np.unique(labels)[1]).astype(np.float64)
    return raw, y


def standardize(raw):
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    return np.ascontiguousarray(((raw - mean) / scale).T), mean, scale  # X (n, m)


def statsmodels_logit(raw, y):
    model = sm.Logit(y, sm.add_constant(raw))
    return model.fit(disp=0, method="newton", tol=1e-12, maxiter=100)


def intercept_last(values):
    values = np.asarray(values)
    return np.concatenate([values[1:], values[:1]])


def naive_hessian(X, Y, w, b, s=None):
    m = X.shape[1]
    s = np.ones(m) if s is None else s.ravel()
    Xa = np.vstack([X.astype(np.float64), np.ones((1, m))])  # (n + 1, m)
    a = 1 / (1 + np.exp(-((w.T.astype(np.float64) @ X) + b).ravel()))
    return (Xa * (s * a * (1 - a))) @ Xa.T


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hessian_sums_equal_the_naive_formula(engine, weighted, dtype):
    rng = np.random.default_rng(0)
    n, m = 9, 3000
    X = rng.normal(size=(n, m)).astype(dtype)
    X[:, :4] *= 300.0  # extreme scores
    Y = (rng.random((1, m)) < 0.4).astype(dtype)
    s = rng.uniform(0, 2, size=(1, m)) if weighted else None
    w, b = (rng.normal(size=(n, 1)) * 0.3).astype(dtype), 0.2
    loss = FusedLoss(X, Y, sample_weight=s, engine=engine, block_size=256, n_threads=2)
    loss_sum, dw_sum, db_sum, H_sum = loss.hessian_sums(w, b)
    sums = loss.partial_sums(w, b)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert loss_sum == pytest.approx(sums[0], rel=rtol)
    np.testing.assert_allclose(dw_sum, sums[1], rtol=rtol, atol=rtol * np.abs(sums[1]).max())
    assert db_sum == pytest.approx(sums[2], rel=rtol, abs=rtol * m)
    want = naive_hessian(X, Y, w, b, s)
    np.testing.assert_allclose(H_sum, want, rtol=rtol, atol=rtol * np.abs(want).max())
    cost, _, db, H = loss.hessian(w, b, 2.0)
    np.testing.assert_array_equal(H, hessian_from_sums(H_sum, 2.0, loss.weight_sum))
    assert (cost, db) == pytest.approx(loss(w, b, 2.0)[::2], rel=rtol)


def test_hessian_is_the_derivative_of_the_gradient():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4, 500))
    Y = (rng.random((1, 500)) < 0.5).astype(np.float64)
    s = rng.uniform(0, 3, size=(1, 500))
    loss = FusedLoss(X, Y, sample_weight=s)
    w, b, l2, h = rng.normal(size=(4, 1)), -0.3, 1.5, 1e-6
    H = loss.hessian(w, b, l2)[3]
    for j in range(5):
        step = np.zeros(5)
        step[j] = h
        up = loss(w + step[:4, None], b + step[4], l2)
        down = loss(w - step[:4, None], b - step[4], l2)
        column = np.concatenate([(up[1] - down[1]).ravel(), [up[2] - down[2]]]) / (2 * h)
        np.testing.assert_allclose(H[:, j], column, rtol=1e-6, atol=1e-9)


def test_newton_lbfgs_and_gd_reach_the_same_optimum():
    raw, y = raw_problem("breast_cancer", CANCER_COLUMNS)
    X, _, _ = standardize(raw)
    Y = y.reshape(1, -1)
    fits = {
        optimizer: fit(
            X, Y, learning_rate=1.0, iterations=100_000, l2=1.0, tol=1e-9, optimizer=optimizer
        )
        for optimizer in ["newton", "lbfgs", "gd", "auto"]
    }
    assert all(f.stop_reason == "tolerance" for f in fits.values())
    assert fits["newton"].n_iterations < 15
    for optimizer in ["lbfgs", "gd", "auto"]:
        np.testing.assert_allclose(fits[optimizer].w, fits["newton"].w, rtol=1e-6)
        assert fits[optimizer].b == pytest.approx(fits["newton"].b, rel=1e-6)


@pytest.mark.parametrize("l2", [0.0, 1.0])
def test_a_newton_fit_returns_the_hessian_at_its_result(l2):
    raw, y = raw_problem("breast_cancer", CANCER_COLUMNS)
    X, _, _ = standardize(raw)
    Y = y.reshape(1, -1)
    result = fit(X, Y, iterations=100, l2=l2, tol=1e-9, optimizer="newton")
    assert result.stop_reason == "tolerance"
    H = FusedLoss(X, Y).hessian(result.w, result.b, l2)[3]
    assert result.hessian is not None
    np.testing.assert_allclose(result.hessian, H, rtol=1e-12, atol=1e-15)
    gd = fit(X, Y, learning_rate=1.0, iterations=5, l2=l2, optimizer="gd")
    assert gd.hessian is None  # no solver but Newton computes it


def test_auto_is_newton_up_to_the_bound_and_needs_a_hessian():
    def problem(n):
        X = np.random.default_rng(n).normal(size=(n, 50))
        return FusedLoss(X, (X[:1] > 0).astype(np.float64))

    assert resolve_optimizer("auto", problem(NEWTON_MAX_FEATURES)) == "newton"
    assert resolve_optimizer("auto", problem(NEWTON_MAX_FEATURES + 1)) == "lbfgs"

    class FirstOrder:  # a LossFunction without a Hessian
        def __init__(self, loss):
            self.loss = loss
            self.n_features, self.dtype = loss.n_features, loss.dtype

        def __call__(self, w, b, l2=0.0):
            return self.loss(w, b, l2)

    first_order: LossFunction = FirstOrder(problem(3))
    assert isinstance(problem(3), SecondOrderLoss) and not isinstance(first_order, SecondOrderLoss)
    assert resolve_optimizer("auto", first_order) == "lbfgs"
    with pytest.raises(ValueError, match="newton"):
        resolve_optimizer("newton", first_order)


def test_fit_many_with_newton_equals_separate_fits():
    raw, y = raw_problem("wine", WINE_COLUMNS)
    X, _, _ = standardize(raw)
    Y = y.reshape(1, -1)
    grid = fit_many(X, Y, l2=[0.0, 5.0], iterations=50, tol=1e-10, optimizer="newton")
    for k, l2 in enumerate([0.0, 5.0]):
        alone = fit(X, Y, l2=l2, iterations=50, tol=1e-10, optimizer="newton")
        np.testing.assert_array_equal(grid.w[:, k : k + 1], alone.w)


@pytest.mark.parametrize(("name", "columns"), [("breast_cancer", CANCER_COLUMNS),
                                               ("wine", WINE_COLUMNS)])  # fmt: skip
def test_wald_table_equals_statsmodels_logit(name, columns):
    raw, y = raw_problem(name, columns)
    X, mean, scale = standardize(raw)
    Y = y.reshape(1, -1)
    result = fit(X, Y, iterations=100, tol=1e-8, optimizer="auto")  # the defaults' rule
    assert result.converged
    loss = FusedLoss(X, Y)
    H = loss.hessian(result.w, result.b, 0.0)[3]
    table = coefficient_table(
        result.w, result.b, H, loss.weight_sum, mean=mean, scale=scale,
        standardized=np.ones(len(columns), dtype=bool), confidence=0.9,
    )  # fmt: skip
    oracle = statsmodels_logit(raw, y)
    ci = oracle.conf_int(alpha=0.1)
    for got, want in [
        (table.estimate, oracle.params),
        (table.std_error, oracle.bse),
        (table.z_value, oracle.tvalues),
        (table.p_value, oracle.pvalues),
        (table.ci_lower, ci[:, 0]),
        (table.ci_upper, ci[:, 1]),
    ]:
        np.testing.assert_allclose(got, intercept_last(want), rtol=1e-6)
    order = [*range(1, len(columns) + 1), 0]  # statsmodels puts the constant first
    np.testing.assert_allclose(
        table.covariance, oracle.cov_params()[np.ix_(order, order)], rtol=1e-6
    )


def test_raw_scale_covariance_equals_a_fit_on_raw_data():
    raw, y = raw_problem("wine", WINE_COLUMNS)
    X, mean, scale = standardize(raw)
    Y = y.reshape(1, -1)
    # Standardize two terms only; the third stays raw (as an indicator would).
    mask = np.array([True, False, True])
    X_mixed = np.where(mask[:, None], X, raw.T).copy()
    on_mixed = fit(X_mixed, Y, iterations=100, tol=1e-10, optimizer="newton")
    loss = FusedLoss(X_mixed, Y)
    theta = np.concatenate([on_mixed.w.ravel(), [on_mixed.b]])
    cov = covariance(loss.hessian(on_mixed.w, on_mixed.b)[3], loss.weight_sum)
    theta_raw, cov_raw = to_raw_scale(theta, cov, mean, scale, mask)
    X_raw = np.ascontiguousarray(raw.T)
    direct = fit(X_raw, Y, iterations=100, tol=1e-10, optimizer="newton")
    raw_loss = FusedLoss(X_raw, Y)
    direct_cov = covariance(raw_loss.hessian(direct.w, direct.b)[3], raw_loss.weight_sum)
    np.testing.assert_allclose(theta_raw, [*direct.w.ravel(), direct.b], rtol=1e-6)
    np.testing.assert_allclose(cov_raw, direct_cov, rtol=1e-6)


def test_weighted_standard_errors_equal_statsmodels_freq_weights():
    raw, y = raw_problem("breast_cancer", CANCER_COLUMNS)
    X, mean, scale = standardize(raw)
    counts = np.random.default_rng(2).integers(1, 4, size=y.size).astype(np.float64)
    Y, s = y.reshape(1, -1), counts.reshape(1, -1)
    result = fit(X, Y, iterations=100, tol=1e-10, optimizer="newton", sample_weight=s)
    loss = FusedLoss(X, Y, sample_weight=s)
    table = coefficient_table(
        result.w, result.b, loss.hessian(result.w, result.b)[3], loss.weight_sum,
        mean=mean, scale=scale, standardized=np.ones(5, dtype=bool),
    )  # fmt: skip
    oracle = sm.GLM(
        y, sm.add_constant(raw), family=sm.families.Binomial(), freq_weights=counts
    ).fit(tol=1e-12)
    np.testing.assert_allclose(table.estimate, intercept_last(oracle.params), rtol=1e-6)
    np.testing.assert_allclose(table.std_error, intercept_last(oracle.bse), rtol=1e-6)
    np.testing.assert_allclose(table.p_value, intercept_last(oracle.pvalues), rtol=1e-6)


def test_an_exactly_collinear_term_is_named_as_aliased():
    raw, y = raw_problem("wine", WINE_COLUMNS)
    X = np.ascontiguousarray(raw.T)  # raw: the sum is exact
    X = np.vstack([X, X[0] + X[1]])  # term 3 = term 0 + term 1
    Y = y.reshape(1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fit(X, Y, iterations=100, tol=1e-8, optimizer="newton")
    H = FusedLoss(X, Y).hessian(result.w, result.b)[3]
    found = aliased_terms(H)
    assert found.aliased == (3,) and found.depends_on == ((0, 1),) and found.rank == 4
    full_rank = aliased_terms(FusedLoss(X[:3], Y).hessian(result.w[:3], result.b)[3])
    assert full_rank.aliased == () and full_rank.rank == 4


def test_separation_names_the_level_that_predicts_the_label():
    rng = np.random.default_rng(3)
    m = 400
    x = rng.normal(size=m)
    level = (rng.random(m) < 0.2).astype(np.float64)
    y = ((x + rng.normal(size=m)) > 0).astype(np.float64)
    y[level == 1] = 1.0  # every row of the level is positive
    X = np.vstack([x, level])
    Y = y.reshape(1, -1)
    indicator = np.array([False, True])
    unpenalized = fit(X, Y, iterations=30, tol=1e-8, optimizer="newton")
    found = separation(X, Y, unpenalized.w, unpenalized.b, indicator=indicator)
    assert found.terms == (1,) and found.labels == (1.0,) and found.found
    assert unpenalized.w[1, 0] > 10  # its coefficient runs off
    penalized = fit(X, Y, iterations=50, l2=1.0, tol=1e-10, optimizer="newton")
    assert penalized.converged and np.all(np.isfinite(penalized.w))
    clean = separation(X, Y, penalized.w, penalized.b, indicator=np.array([False, False]))
    assert clean.terms == () and clean.n_boundary == 0 and not clean.found

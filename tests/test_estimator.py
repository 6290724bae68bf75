"""LogisticRegressionGD: estimator checks, parity with LogisticRegression, composition."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn import datasets
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from lr_kernel import LogisticRegressionGD

# Short fits on purpose; convergence is what the parity test checks.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@parametrize_with_checks([LogisticRegressionGD()])
def test_passes_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def test_import_lr_kernel_does_not_import_scikit_learn():
    code = (
        "import sys, lr_kernel\n"
        "assert 'sklearn' not in sys.modules, 'imported too early'\n"
        "from lr_kernel import LogisticRegressionGD\n"
        "assert 'sklearn' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _held_out(name):
    if name == "breast_cancer":
        X, y = datasets.load_breast_cancer(return_X_y=True)
    else:
        X, y = datasets.load_wine(return_X_y=True)
        y = np.where(y == 0, "class_0", "other")
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_probabilities_match_logistic_regression_on_held_out_data(name):
    X_train, X_test, y_train, y_test = _held_out(name)
    l2 = 1.0
    ours = LogisticRegressionGD(learning_rate=1.0, max_iter=100_000, l2=l2, tol=1e-15)
    ours.fit(X_train, y_train)
    scaler = StandardScaler().fit(X_train)
    oracle = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=100_000)
    oracle.fit(scaler.transform(X_train), y_train)
    expected = oracle.predict_proba(scaler.transform(X_test))
    np.testing.assert_allclose(ours.predict_proba(X_test), expected, atol=1e-4)
    np.testing.assert_array_equal(ours.classes_, oracle.classes_)
    assert ours.score(X_test, y_test) == pytest.approx(
        np.mean(ours.predict(X_test) == y_test), abs=0
    )


def test_raw_scale_coefficients_give_the_decision_function():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    model = LogisticRegressionGD(max_iter=200).fit(X, y)
    assert model.coef_.shape == (1, 30)
    assert model.intercept_.shape == (1,)
    np.testing.assert_allclose(
        model.decision_function(X), X @ model.coef_[0] + model.intercept_[0], rtol=1e-12
    )
    assert model.n_iter_ == len(model.cost_history_) - 1
    assert np.all(np.diff(model.cost_history_) <= 1e-15)  # a stable step never raises the cost


def test_standardize_equals_a_scaler_in_a_pipeline():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    inside = LogisticRegressionGD(max_iter=300, l2=0.5).fit(X, y)
    piped = make_pipeline(
        StandardScaler(), LogisticRegressionGD(max_iter=300, l2=0.5, standardize=False)
    ).fit(X, y)
    # The same iterates on the same standardized matrix, up to rounding.
    np.testing.assert_allclose(inside.predict_proba(X), piped.predict_proba(X), atol=1e-10)


def test_grid_search_picks_a_penalty():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    search = GridSearchCV(
        LogisticRegressionGD(max_iter=300), {"l2": [0.0, 1.0, 100.0]}, cv=3, scoring="neg_log_loss"
    ).fit(X, y)
    assert search.best_params_["l2"] in (0.0, 1.0)  # a huge penalty cannot win
    scores = search.cv_results_["mean_test_score"]
    assert scores[2] < max(scores[:2])


def test_string_labels_round_trip():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    names = np.array(["benign", "malignant"])[1 - y]
    model = LogisticRegressionGD(max_iter=300).fit(X, names)
    assert model.classes_.tolist() == ["benign", "malignant"]
    assert set(model.predict(X)) <= {"benign", "malignant"}
    assert model.score(X, names) > 0.9


def test_multiclass_and_divergence_raise():
    X, y = datasets.load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="Only binary classification"):
        LogisticRegressionGD().fit(X, y)
    with pytest.raises(ValueError, match="diverged"):
        LogisticRegressionGD(learning_rate=1e3, standardize=False).fit(X * 100, y == 0)

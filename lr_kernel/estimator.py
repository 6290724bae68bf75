"""LogisticRegressionGD: the kernel's gradient descent as a scikit-learn classifier.

The one module of ``lr_kernel`` that imports scikit-learn (the optional extra
``lrflow[sklearn]``); ``import lr_kernel`` loads it only when the name is used.
scikit-learn's convention holds here: ``X`` is ``(n_samples, n_features)``; the
estimator transposes it into the kernel's column-stacked ``(n_features, n_samples)``.
"""

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from lr_kernel.loss import FloatArray, sigmoid
from lr_kernel.train import fit


class LogisticRegressionGD(ClassifierMixin, BaseEstimator):
    """Binary logistic regression trained by the kernel's full-batch gradient descent.

    Minimizes the project's objective (``lr_kernel`` docstring), which is
    scikit-learn's ``LogisticRegression(C=1/l2)`` objective divided by ``n_samples``
    (``penalty=None`` when ``l2 == 0``); the intercept is not penalized.

    Parameters
    ----------
    learning_rate : float, default 0.5
        Gradient-descent step size.
    max_iter : int, default 1000
        Most updates.
    l2 : float, default 0.0
        L2 penalty strength.
    tol : float, default 1e-8
        Converged when every component of the gradient is at most this in
        absolute value (``lr_kernel.convergence.StopRule``, on the standardized
        problem when ``standardize``); 0 runs all ``max_iter``.
    standardize : bool, default True
        Train on standardized features (population mean and standard deviation;
        constant features only centered). ``coef_`` is on the raw scale either way.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        The labels, sorted; ``classes_[1]`` is the positive class.
    coef_ : ndarray of shape (1, n_features)
    intercept_ : ndarray of shape (1,)
    n_iter_ : int
        Updates applied.
    cost_history_ : ndarray of shape (n_iter_ + 1,)
        The cost before each update (standardized problem; the same objective value).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,), when ``X`` has string column names
    """

    def __init__(
        self,
        learning_rate: float = 0.5,
        max_iter: int = 1000,
        l2: float = 0.0,
        tol: float = 1e-8,
        standardize: bool = True,
    ) -> None:
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.l2 = l2
        self.tol = tol
        self.standardize = standardize

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        # Two classes only: one sigmoid, no one-vs-rest or softmax.
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: Any, y: Any) -> "LogisticRegressionGD":
        """Fit on ``X`` of shape ``(n_samples, n_features)`` and ``y`` with two classes."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        y_type = type_of_target(y, input_name="y", raise_unknown=True)
        if y_type != "binary":
            raise ValueError(
                f"Only binary classification is supported. The type of the target is {y_type}."
            )
        self.classes_ = np.unique(y)
        if self.classes_.size != 2:
            raise ValueError(
                "LogisticRegressionGD needs samples of 2 classes; "
                f"the data contain only one class: {self.classes_[0]!r}"
            )
        X_t = np.ascontiguousarray(X.T)  # (n, m): the kernel's column-stacked layout
        if self.standardize:
            mean = X_t.mean(axis=1, dtype=np.float64)  # (n,)
            std = X_t.std(axis=1, dtype=np.float64)  # (n,), population (ddof=0)
            constant = std <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
            scale = np.where(constant, 1.0, std)
            X_t -= mean[:, None].astype(X_t.dtype)  # in place: X_t is our own copy
            X_t /= scale[:, None].astype(X_t.dtype)
        else:
            mean, scale = np.zeros(X_t.shape[0]), np.ones(X_t.shape[0])
        Y = (y == self.classes_[1]).astype(X_t.dtype).reshape(1, -1)  # (1, m)
        result = fit(
            X_t,
            Y,
            learning_rate=self.learning_rate,
            iterations=self.max_iter,
            l2=self.l2,
            tol=self.tol,
        )
        if result.stop_reason == "diverged":
            raise ValueError(
                f"gradient descent diverged at iteration {result.n_iterations}: "
                f"learning_rate={self.learning_rate:g} is too large for this data"
            )
        if not result.converged and self.tol > 0:
            warnings.warn(
                f"gradient descent did not reach tol={self.tol:g} in {self.max_iter} "
                "iterations; increase max_iter or learning_rate",
                ConvergenceWarning,
                stacklevel=2,
            )
        w_raw = result.w.astype(np.float64).ravel() / scale  # (n,), raw feature scale
        self.coef_ = w_raw.reshape(1, -1)
        self.intercept_ = np.array([result.b - float(np.dot(w_raw, mean))])
        self.n_iter_ = result.n_iterations
        self.cost_history_ = result.cost_history
        return self

    def decision_function(self, X: Any) -> FloatArray:
        """Log-odds of the positive class ``classes_[1]``, shape ``(n_samples,)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        scores: FloatArray = X @ self.coef_[0].astype(X.dtype) + self.intercept_[0]
        return scores

    def predict_proba(self, X: Any) -> FloatArray:
        """Probabilities of ``classes_``, shape ``(n_samples, 2)``."""
        Z = self.decision_function(X)
        # sigmoid(-Z) rather than 1 - sigmoid(Z): no cancellation for confident positives.
        return np.column_stack([sigmoid(-Z), sigmoid(Z)])

    def predict(self, X: Any) -> Any:
        """``classes_[1]`` where the log-odds are > 0 (scikit-learn's rule), else ``classes_[0]``.

        Exactly the examples with ``predict_proba(X)[:, 1] > 0.5``.
        """
        positive = self.decision_function(X) > 0  # also checks that we are fitted
        return self.classes_[positive.astype(int)]

"""Batch scoring: the plain functions without Prefect, then `lrflow score` end to end."""

import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from flows.errors import DataError
from flows.features import Feature, FeaturePlan, LabelMapping
from flows.outputs import params_table, read_metadata, with_metadata, write_table_atomic
from flows.scoring import load_model, plan_scoring, score_to_parquet
from flows.store import latest
from tests.conftest import real_binary_dataset, write_parquet
from tests.test_cli import run_cli


def write_model(directory, features, w, b, mapping=None, legacy=False):
    """A model directory: numeric features, not standardized, ``w`` and ``b`` on the raw scale.

    ``legacy``: the metadata of a model from before feature plans (format 1), with the
    standardization as ``feature_mean``/``feature_scale`` and no ``feature_plan``.
    """
    mapping = mapping or {"negative": False, "positive": True, "dtype": "Boolean"}
    metadata = {"features": list(features), "label": "label", "label_mapping": mapping}
    if legacy:
        metadata |= {
            "format_version": 1,
            "feature_mean": [0.0] * len(features),
            "feature_scale": [1.0] * len(features),
            "standardized": False,
        }
    else:
        plan = FeaturePlan(
            label="label",
            label_mapping=LabelMapping(**mapping),
            features=tuple(Feature(name, "numeric") for name in features),
            standardized=False,
            missing="error",
        )
        metadata |= {"format_version": 2, "feature_plan": plan.to_json()}
    table = with_metadata(params_table(tuple(features), np.asarray(w), b), metadata)
    write_table_atomic(table, directory / "params.parquet")
    return directory


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "model", ["x1", "x2"], [0.8, -0.05], 0.3)


def _frame(m, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "id": [f"r{seed}-{i}" for i in range(m)],
        "x2": rng.integers(0, 100, size=m),  # another order than the model's: matched by name
        "x1": rng.normal(size=m),
        "extra": rng.random(m),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["plan", "format-1"])
def test_scores_many_files_in_small_batches_in_order(tmp_path, legacy):
    model_dir = write_model(tmp_path / "model", ["x1", "x2"], [0.8, -0.05], 0.3, legacy=legacy)
    frames = [_frame(m, seed) for seed, m in enumerate([7, 50, 23])]
    for k, columns in enumerate(frames):
        write_parquet(tmp_path / "in" / f"part-{k}.parquet", columns)
    model = load_model(model_dir)
    plan = plan_scoring(model, tmp_path / "in")
    seen = []
    result = score_to_parquet(
        plan, model, tmp_path / "p.parquet", batch_rows=4, progress=lambda d, t: seen.append((d, t))
    )
    out = pl.read_parquet(tmp_path / "p.parquet")
    assert out.columns == ["id", "extra", "probability", "prediction"]  # keys pass through
    everything = pl.concat([pl.DataFrame(f) for f in frames])
    assert out["id"].to_list() == everything["id"].to_list()
    z = 0.8 * everything["x1"].to_numpy() - 0.05 * everything["x2"].to_numpy() + 0.3
    np.testing.assert_allclose(out["probability"].to_numpy(), _sigmoid(z), rtol=1e-12)
    assert out["prediction"].to_list() == (out["probability"] >= 0.5).to_list()
    assert result.n_rows == 80 and seen[-1] == (80, 80) and len(seen) > 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prediction_takes_the_labels_own_values_and_threshold(tmp_path):
    mapping = {"negative": "benign", "positive": "malignant", "dtype": "String"}
    model_dir = write_model(tmp_path / "m", ["x1", "x2"], [1.0, 0.0], 0.0, mapping)
    data = write_parquet(tmp_path / "d.parquet", {"x1": [-2.0, 0.0, 0.5, 3.0], "x2": [0, 0, 0, 0]})
    model = load_model(model_dir)
    plan = plan_scoring(model, data)
    score_to_parquet(plan, model, tmp_path / "p.parquet", threshold=0.6)
    table = pq.read_table(tmp_path / "p.parquet")
    assert str(table.schema.field("prediction").type) == "string"
    assert table.column("prediction").to_pylist() == ["benign", "benign", "malignant", "malignant"]


@pytest.mark.parametrize(
    ("columns", "message", "column"),
    [
        ({"x1": [1.0], "id": ["a"]}, "model feature missing from the data", "x2"),
        ({"x1": [1.0], "x2": ["a"]}, "feature has type String", "x2"),
        ({"x1": [1.0, None], "x2": [1, 2]}, "1 null values", "x1"),
        (
            {"x1": [1.0], "x2": [1], "probability": [0.1]},
            "taken by an output column",
            "probability",
        ),
    ],
)
def test_bad_data_is_found_from_the_footers(tmp_path, model_dir, columns, message, column):
    data = write_parquet(tmp_path / "d.parquet", columns)
    with pytest.raises(DataError, match=message) as caught:
        plan_scoring(load_model(model_dir), data)
    assert caught.value.column == column
    assert caught.value.path == str(data)


def test_nan_found_while_scoring_leaves_no_file(tmp_path, model_dir):
    write_parquet(tmp_path / "in" / "a.parquet", {"x1": [1.0, 2.0], "x2": [1, 2]})
    bad = write_parquet(tmp_path / "in" / "b.parquet", {"x1": [1.0, float("nan")], "x2": [1, 2]})
    model = load_model(model_dir)
    plan = plan_scoring(model, tmp_path / "in")
    out = tmp_path / "out" / "p.parquet"
    with pytest.raises(DataError, match="NaN or infinite") as caught:
        score_to_parquet(plan, model, out, batch_rows=1)
    assert (caught.value.path, caught.value.column) == (str(bad), "x1")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_directory_without_a_model_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no params\.parquet"):
        load_model(tmp_path)
    with pytest.raises(DataError, match="no such model directory"):
        load_model(tmp_path / "nothing")


def test_cli_fails_before_prefect_on_a_missing_feature(tmp_path, model_dir):
    data = write_parquet(tmp_path / "d.parquet", {"x1": [1.0]})
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "score", "--model", model_dir, "--data", data,
         "--output", tmp_path / "p.parquet"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lrflow: error: {data}: column 'x2': model feature missing from the data"
    ]
    assert not (tmp_path / "p.parquet").exists()


def _real_split(name):
    from sklearn.model_selection import train_test_split

    data, label = real_binary_dataset(name)
    X_train, X_test, y_train, y_test = train_test_split(
        data, label, test_size=0.3, random_state=1, stratify=label
    )
    return X_train, X_test, y_train, y_test


@pytest.mark.parametrize("dataset", ["breast_cancer", "wine"])
def test_held_out_scores_and_metrics_match_scikit_learn(prefect_api, tmp_path, dataset, capsys):
    """The issue's must-show: lrflow train + lrflow score on data the project never saw."""
    from sklearn import metrics
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X_train, X_test, y_train, y_test = _real_split(dataset)
    names = [f"f{j}" for j in range(X_train.shape[1])]

    def frame(X, y):
        return {"key": np.arange(len(y)), **dict(zip(names, X.T, strict=True)), "target": y}

    train_path = write_parquet(tmp_path / "train.parquet", frame(X_train, y_train))
    test_path = write_parquet(tmp_path / "test.parquet", frame(X_test, y_test))
    l2 = 1.0
    status = run_cli(
        "train", "--data", train_path, "--validation-data", test_path, "--output",
        tmp_path / "model", "--label", "target", "--features", ",".join(names), "--l2", l2,
        "--iterations", 100_000, "--learning-rate", 1.0, "--tol", 1e-15,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    status = run_cli(
        "score", "--model", tmp_path / "model", "--data", test_path,
        "--output", tmp_path / "scores.parquet",
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err

    scaler = StandardScaler().fit(X_train)
    oracle = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=100_000)
    oracle.fit(scaler.transform(X_train), y_train)
    run = latest(tmp_path / "model")  # the store's promoted run
    assert read_metadata(tmp_path / "scores.parquet")["model"] == str(run)
    mapping = read_metadata(run / "params.parquet")["label_mapping"]
    positive, negative = mapping["positive"], mapping["negative"]
    expected = oracle.predict_proba(scaler.transform(X_test))[
        :, list(oracle.classes_).index(positive)
    ]
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    assert scores.columns == ["key", "target", "probability", "prediction"]
    p = scores["probability"].to_numpy()
    np.testing.assert_allclose(p, expected, atol=1e-4)
    assert scores["prediction"].to_list() == np.where(p >= 0.5, positive, negative).tolist()

    table = pl.read_parquet(run / "metrics.parquet")
    ours = dict(table.filter(pl.col("split") == "validation").select("metric", "value").iter_rows())
    y = (y_test == positive).astype(int)
    predicted = (p >= 0.5).astype(int)
    reference = {
        "log_loss": metrics.log_loss(y, p),
        "accuracy": metrics.accuracy_score(y, predicted),
        "precision": metrics.precision_score(y, predicted),
        "recall": metrics.recall_score(y, predicted),
        "f1": metrics.f1_score(y, predicted),
        "roc_auc": metrics.roc_auc_score(y, p),
        "n_examples": len(y),
        "positive_rate": y.mean(),
    }
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    history = pl.read_parquet(run / "cost_history.parquet")
    assert history["validation_cost"][-1] == pytest.approx(ours["log_loss"], rel=1e-12)

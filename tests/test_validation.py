"""Evaluation in train: the validation split, separate validation data, metrics and costs."""

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from flows.config import TrainConfig
from flows.dataset import load_dataset, plan_inputs, stratified_holdout
from flows.errors import DataError
from flows.outputs import read_metadata
from flows.store import latest
from tests.conftest import write_parquet
from tests.test_cli import run_cli


def _labelled(m, seed=0, positive_share=0.3):
    rng = np.random.default_rng(seed)
    return {
        "x1": rng.normal(5, 2, size=m),
        "x2": rng.integers(0, 50, size=m),
        "label": rng.random(m) < positive_share,
    }


def test_holdout_is_stratified_and_deterministic():
    positive = np.random.default_rng(0).random(1003) < 0.3
    held_out = stratified_holdout(positive, 0.2, seed=7)
    for value in (False, True):
        count = np.count_nonzero(positive == value)
        assert np.count_nonzero(held_out & (positive == value)) == round(0.2 * count)
    assert np.array_equal(held_out, stratified_holdout(positive, 0.2, seed=7))
    assert not np.array_equal(held_out, stratified_holdout(positive, 0.2, seed=8))


def test_holdout_keeps_each_class_in_training():
    positive = np.array([True, False, False, False])
    held_out = stratified_holdout(positive, 0.9, seed=0)
    assert not held_out[0]  # the only positive stays
    assert np.count_nonzero(held_out) == 2


def test_statistics_come_from_the_training_rows_only(tmp_path):
    columns = _labelled(200)
    path = write_parquet(tmp_path / "d.parquet", columns)
    dataset = load_dataset(plan_inputs(path), validation_fraction=0.25, seed=3)
    held_out = stratified_holdout(np.asarray(columns["label"]), 0.25, seed=3)
    train_x1 = columns["x1"][~held_out]
    assert dataset.mean[0] == pytest.approx(train_x1.mean(), rel=1e-12)
    assert dataset.scale[0] == pytest.approx(train_x1.std(), rel=1e-12)
    assert dataset.n_examples == 150 and dataset.validation.n_examples == 50
    # Both splits standardized with the training statistics, rows kept in file order.
    np.testing.assert_allclose(
        dataset.validation.X[0], (columns["x1"][held_out] - train_x1.mean()) / train_x1.std()
    )
    assert dataset.validation.Y.sum() == np.count_nonzero(np.asarray(columns["label"])[held_out])


def test_separate_validation_data_must_share_the_labels(tmp_path):
    train = write_parquet(tmp_path / "t.parquet", _labelled(50))
    odd = _labelled(10, seed=1)
    odd["label"] = np.where(odd["label"], 2, 3)
    other = write_parquet(tmp_path / "v.parquet", odd)
    plan = plan_inputs(train)
    with pytest.raises(DataError, match="label has type Int64, but Boolean") as caught:
        load_dataset(plan, validation_plan=plan_inputs(other, features=plan.features))
    assert caught.value.column == "label"


def test_too_few_rows_to_hold_out_is_an_error(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"x": [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(DataError, match="too few rows"):
        load_dataset(plan_inputs(path), validation_fraction=0.2)


def test_config_takes_one_kind_of_validation():
    assert TrainConfig(data="d", output="o").effective_validation_fraction == 0.2
    assert TrainConfig(data="d", output="o", validation_data="v").effective_validation_fraction == 0
    with pytest.raises(ValidationError, match="not both"):
        TrainConfig(data="d", output="o", validation_data="v", validation_fraction=0.1)
    with pytest.raises(ValidationError, match="validation_fraction"):
        TrainConfig(data="d", output="o", validation_fraction=1.0)


def test_train_reports_both_splits_and_a_sparse_validation_cost(prefect_api, tmp_path, capsys):
    columns = _labelled(400, positive_share=0.5)
    path = write_parquet(tmp_path / "d.parquet", columns)
    n_held_out = int(np.count_nonzero(stratified_holdout(columns["label"], 0.25, seed=5)))
    out = tmp_path / "out"
    status = run_cli(
        "train", "--data", path, "--output", out, "--iterations", 25, "--tol", 0,
        "--validation-fraction", 0.25, "--seed", 5, "--validation-every", 10,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    out = latest(out)  # the run's directory in the store
    metrics = pl.read_parquet(out / "metrics.parquet")
    names = ["log_loss", "accuracy", "precision", "recall", "f1", "roc_auc"]
    names += ["n_examples", "positive_rate"]
    for split in ("train", "validation"):
        assert metrics.filter(pl.col("split") == split)["metric"].to_list() == names
    sizes = dict(metrics.filter(pl.col("metric") == "n_examples").select("split", "value").rows())
    assert sizes == {"train": 400.0 - n_held_out, "validation": float(n_held_out)}
    assert abs(n_held_out - 100) <= 1  # rounding per label value
    history = pl.read_parquet(out / "cost_history.parquet")
    evaluated = history.filter(pl.col("validation_cost").is_not_null())["iteration"].to_list()
    assert evaluated == [0, 10, 20, 25]
    meta = read_metadata(out / "params.parquet")
    assert meta["validation"]["seed"] == 5 and meta["validation"]["fraction"] == 0.25
    assert f"validation ({n_held_out} examples)" in capsys.readouterr().out


def test_fraction_zero_disables_validation(prefect_api, tmp_path, capsys):
    path = write_parquet(tmp_path / "d.parquet", _labelled(60))
    out = tmp_path / "out"
    assert run_cli("train", "--data", path, "--output", out, "--validation-fraction", 0) == 0
    out = latest(out)
    assert pl.read_parquet(out / "metrics.parquet")["split"].unique().to_list() == ["train"]
    assert pl.read_parquet(out / "cost_history.parquet")["validation_cost"].null_count() > 0
    assert read_metadata(out / "params.parquet")["validation"] is None


def test_bad_validation_data_fails_before_prefect(tmp_path, capsys):
    train = write_parquet(tmp_path / "t.parquet", _labelled(50))
    bad = _labelled(10, seed=1)
    bad["x1"][3] = np.nan
    validation = write_parquet(tmp_path / "v.parquet", bad)
    status = run_cli(
        "train", "--data", train, "--validation-data", validation, "--output", tmp_path / "o"
    )
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == f"lrflow: error: {validation}: column 'x1': 1 NaN or infinite values"
    assert not (tmp_path / "o").exists()

"""Evaluation in train: the validation split, separate validation data, metrics and costs."""

from itertools import pairwise

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from flows.config import TrainConfig
from flows.dataset import held_out
from flows.errors import DataError
from flows.outputs import read_metadata
from flows.store import latest
from tests.conftest import load, write_parquet
from tests.test_cli import run_cli


def _labelled(m, seed=0, positive_share=0.3):
    rng = np.random.default_rng(seed)
    return {
        "x1": rng.normal(5, 2, size=m),
        "x2": rng.integers(0, 50, size=m),
        "label": rng.random(m) < positive_share,
    }


def test_holdout_is_deterministic_per_seed_and_about_the_fraction():
    m = 100_000
    mask = held_out("split", 0, m, 0.2, seed=7)
    assert mask.shape == (m,) and mask.dtype == bool
    assert abs(np.count_nonzero(mask) / m - 0.2) < 0.01  # 8 standard deviations
    assert np.array_equal(mask, held_out("split", 0, m, 0.2, seed=7))
    assert not np.array_equal(mask, held_out("split", 0, m, 0.2, seed=8))
    # A larger fraction holds out a superset: a row's draw does not depend on the fraction.
    assert np.all(held_out("split", 0, m, 0.5, seed=7)[mask])
    # Not a pattern of positions: the held-out rows of two halves are not alike.
    assert not np.array_equal(mask[: m // 2], mask[m // 2 :])
    assert held_out("split", 0, m, 0.0, seed=7) is None  # nothing held out
    assert held_out("train", 0, m, 0.2, seed=7) is None  # training data without a split
    assert held_out("validation", 0, 5, 0.0, seed=7).all()  # separate validation data


def test_a_row_is_held_out_by_its_position_whatever_the_batches():
    whole = held_out("split", 0, 5000, 0.3, seed=11)
    for bounds in ([0, 5000], [0, 1, 1024, 4999, 5000], [0, 700, 1400, 2100, 5000]):
        parts = [held_out("split", a, b - a, 0.3, seed=11) for a, b in pairwise(bounds)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_every_backend_and_division_of_the_files_holds_out_the_same_rows(tmp_path):
    """One file or three, in memory or streamed in small batches: the same held-out rows,
    those :func:`held_out` picks by their position in the input."""
    m = 3000
    columns = _labelled(m, seed=4)
    columns["row"] = np.arange(m, dtype=np.float64)  # each row's position, as a feature
    whole = write_parquet(tmp_path / "whole.parquet", columns)
    frame = pl.DataFrame(columns)
    (tmp_path / "parts").mkdir()
    for k, (a, b) in enumerate([(0, 1000), (1000, 1700), (1700, m)]):
        frame.slice(a, b - a).write_parquet(
            tmp_path / "parts" / f"p{k}.parquet", row_group_size=300
        )
    mask = held_out("split", 0, m, 0.2, seed=9)
    options = dict(validation_fraction=0.2, seed=9, standardize=False)
    loaded = [load(whole, **options), load(tmp_path / "parts", **options)]
    loaded.append(
        load(
            tmp_path / "parts",
            backend="stream",
            memory_budget=50_000,  # batches of 1024 rows
            cache_dir=str(tmp_path / "cache"),
            **options,
        )
    )
    memory = loaded[0]
    j = memory.plan.terms.index("row")
    np.testing.assert_array_equal(memory.held_out.X[j], np.flatnonzero(mask))
    np.testing.assert_array_equal(memory.train.X[j], np.flatnonzero(~mask))
    np.testing.assert_array_equal(memory.held_out.Y[0], columns["label"][mask])
    for other in loaded[1:2]:
        np.testing.assert_array_equal(other.held_out.X, memory.held_out.X)
        np.testing.assert_array_equal(other.train.X, memory.train.X)
    stream = loaded[2]
    assert (stream.n_examples, stream.n_validation) == (m - mask.sum(), mask.sum())
    cached = np.load(stream.path / "validation.npy")
    np.testing.assert_array_equal(cached[: memory.plan.n_terms], memory.held_out.X)
    np.testing.assert_array_equal(cached[-1:], memory.held_out.Y)


def test_a_class_without_training_rows_is_an_error(tmp_path):
    m = 20
    mask = held_out("split", 0, m, 0.5, seed=0)
    label = np.zeros(m, dtype=bool)
    label[np.flatnonzero(mask)[0]] = True  # the only positive row is held out
    path = write_parquet(tmp_path / "d.parquet", {"x": np.arange(m, dtype=float), "label": label})
    with pytest.raises(DataError, match="no training row has the label value True") as caught:
        load(path, validation_fraction=0.5, seed=0)
    assert caught.value.column == "label"
    kept = label.copy()
    kept[np.flatnonzero(mask)[0]], kept[np.flatnonzero(~mask)[0]] = False, True
    path = write_parquet(tmp_path / "e.parquet", {"x": np.arange(m, dtype=float), "label": kept})
    assert load(path, validation_fraction=0.5, seed=0).train.Y.sum() == 1.0


def test_statistics_come_from_the_training_rows_only(tmp_path):
    columns = _labelled(200)
    path = write_parquet(tmp_path / "d.parquet", columns)
    dataset = load(path, validation_fraction=0.25, seed=3)
    mask = held_out("split", 0, 200, 0.25, seed=3)
    n_held_out = int(np.count_nonzero(mask))
    assert 25 <= n_held_out <= 75
    train_x1 = columns["x1"][~mask]
    mean, scale = dataset.plan.term_mean_scale()
    assert mean[0] == pytest.approx(train_x1.mean(), rel=1e-12)
    assert scale[0] == pytest.approx(train_x1.std(), rel=1e-12)
    assert dataset.n_examples == 200 - n_held_out and dataset.n_validation == n_held_out
    # Both splits standardized with the training statistics, rows kept in file order.
    np.testing.assert_allclose(
        dataset.held_out.X[0], (columns["x1"][mask] - train_x1.mean()) / train_x1.std()
    )
    np.testing.assert_allclose(
        dataset.train.X[0], (train_x1 - train_x1.mean()) / train_x1.std(), atol=1e-13
    )
    assert dataset.held_out.Y.sum() == np.count_nonzero(np.asarray(columns["label"])[mask])


def test_separate_validation_data_must_share_the_labels(tmp_path):
    train = write_parquet(tmp_path / "t.parquet", _labelled(50))
    odd = _labelled(10, seed=1)
    odd["label"] = np.where(odd["label"], 2, 3)
    other = write_parquet(tmp_path / "v.parquet", odd)
    with pytest.raises(
        DataError, match="type Int64 differs from Boolean in the training"
    ) as caught:
        load(train, validation_data=str(other))
    assert caught.value.column == "label"
    # The same type, a value the training rows do not have: the validation data's error.
    train = write_parquet(tmp_path / "t.parquet", {**_labelled(50), "label": ["no", "yes"] * 25})
    write_parquet(tmp_path / "v.parquet", {**odd, "label": ["yes", "no", "maybe"] * 3 + ["no"]})
    message = r"label value 'maybe' of the validation data is not one of the training labels"
    with pytest.raises(DataError, match=message) as caught:
        load(train, validation_data=str(other))
    assert caught.value.column == "label"


def test_too_few_rows_to_hold_out_is_an_error(tmp_path):
    # A seed whose hash holds out neither of the two rows.
    seed = next(s for s in range(1000) if not held_out("split", 0, 2, 0.2, s).any())
    path = write_parquet(tmp_path / "d.parquet", {"x": [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(DataError, match="too few rows"):
        load(path, validation_fraction=0.2, seed=seed)


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
    n_held_out = int(np.count_nonzero(held_out("split", 0, 400, 0.25, seed=5)))
    out = tmp_path / "out"
    status = run_cli(
        "train", "--data", path, "--output", out, "--iterations", 25, "--tol", 0,
        "--validation-fraction", 0.25, "--seed", 5, "--validation-every", 10,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    out = latest(out)  # the run's directory in the store
    metrics = pl.read_parquet(out / "metrics.parquet")
    names = ["log_loss", "accuracy", "precision", "recall", "f1", "roc_auc"]
    names += ["n_examples", "positive_rate", "weighted"]
    for split in ("train", "validation"):
        assert metrics.filter(pl.col("split") == split)["metric"].to_list() == names
    assert metrics.filter(pl.col("metric") == "weighted")["value"].to_list() == [0.0, 0.0]
    sizes = dict(metrics.filter(pl.col("metric") == "n_examples").select("split", "value").rows())
    assert sizes == {"train": 400.0 - n_held_out, "validation": float(n_held_out)}
    assert abs(n_held_out - 100) <= 26  # 3 standard deviations of the per-row draw
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

"""The l2 / learning-rate search: selection, its Parquet files and the CLI end to end."""

import numpy as np
import polars as pl
import pytest

from flows.config import TrainConfig
from flows.dataset import held_out
from flows.errors import DataError
from flows.outputs import read_metadata
from flows.search import (
    SEARCH_SCHEMA,
    run_search,
    search_cost_history_table,
    search_table,
)
from flows.store import latest
from lr_kernel import fit
from tests.conftest import load, write_parquet
from tests.test_cli import OUTPUT_FILES, run_cli

SEARCH_FILES = sorted([*OUTPUT_FILES, "search.parquet", "search_cost_history.parquet"])


def _noisy_file(tmp_path, m=600, seed=0):
    """Few informative features among many noisy ones: a larger l2 generalizes better."""
    rng = np.random.default_rng(seed)
    features = {f"x{j}": rng.normal(size=m) * (j + 1) for j in range(12)}
    score = features["x0"] - 0.5 * features["x1"] / 2
    label = (score + rng.normal(size=m) * 1.5 > 0).astype(np.int64)
    return write_parquet(tmp_path / "noisy.parquet", {**features, "label": label})


def test_a_search_needs_validation_rows(tmp_path):
    path = _noisy_file(tmp_path)
    dataset = load(path)  # no validation split
    config = TrainConfig(data=str(path), output="unused", l2=[0.0, 1.0], iterations=10)
    with pytest.raises(DataError, match="selects on validation data"):
        run_search(dataset, config, n_threads=1)


def test_search_selects_the_lowest_validation_loss_of_separate_fits(tmp_path):
    path = _noisy_file(tmp_path)
    dataset = load(path, validation_fraction=0.2, seed=0)
    config = TrainConfig(
        data=str(path), output="unused", l2=[0.0, 30.0, 300.0], learning_rate=[0.5, 40.0],
        optimizer="gd",
        iterations=300,
    )  # fmt: skip
    search = run_search(dataset, config, n_threads=2)
    assert len(search.grid) == 6
    # A step of 40 diverges on standardized data; those candidates cannot be chosen.
    diverged = [k for k in range(6) if search.grid.stop_reason[k] == "diverged"]
    assert diverged == [1, 3, 5] and np.isnan(search.validation_log_loss[diverged]).all()
    validation = dataset.held_out
    for k in (0, 2, 4):
        single = fit(
            search.train.train.X, search.train.train.Y, learning_rate=0.5,
            l2=float(search.grid.l2[k]), iterations=300, tol=config.tol,
        )  # fmt: skip
        np.testing.assert_allclose(search.grid.w[:, [k]], single.w, rtol=0, atol=1e-10)
        Z = single.w.T @ validation.X + single.b
        loss = np.mean(np.logaddexp(0, Z) - validation.Y * Z)
        assert search.validation_log_loss[k] == pytest.approx(loss, rel=1e-10)
    assert search.selected == int(np.nanargmin(search.validation_log_loss))
    assert search.selected_config(config).l2 == search.grid.l2[search.selected]

    table = search_table(search)
    assert table.schema == SEARCH_SCHEMA
    rows = table.to_pylist()
    assert [r["selected"] for r in rows].count(True) == 1 and rows[search.selected]["selected"]
    assert rows[1]["validation_log_loss"] is None and rows[1]["stop_reason"] == "diverged"
    history = pl.from_arrow(search_cost_history_table(search))
    assert history.height == sum(h.size for h in search.grid.cost_history)
    for k in range(6):
        costs = history.filter(pl.col("candidate") == k).sort("iteration")["cost"].to_numpy()
        np.testing.assert_array_equal(costs, search.grid.cost_history[k])


def test_cli_search_writes_the_chosen_model_and_the_search(prefect_api, tmp_path, capsys):
    path = _noisy_file(tmp_path)
    out = tmp_path / "out"
    status = run_cli(
        "train", "--data", path, "--output", out, "--l2", "0,30,300",
        "--learning-rate", "0.5,1", "--iterations", "300", "--optimizer", "gd",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    out = latest(out)  # the run's directory in the store
    assert sorted(p.name for p in out.iterdir()) == SEARCH_FILES
    assert "of 6 candidates" in captured.out
    search = pl.read_parquet(out / "search.parquet")
    assert search.columns == [field.name for field in SEARCH_SCHEMA]
    assert search["l2"].to_list() == [0.0, 0.0, 30.0, 30.0, 300.0, 300.0]
    assert search["learning_rate"].to_list() == [0.5, 1.0] * 3
    chosen = search.filter(pl.col("selected"))
    assert chosen.height == 1
    assert chosen["validation_log_loss"][0] == search["validation_log_loss"].min()
    meta = read_metadata(out / "params.parquet")
    # params.parquet holds the chosen model, and its metadata says which.
    assert meta["config"]["l2"] == chosen["l2"][0]
    assert meta["config"]["learning_rate"] == chosen["learning_rate"][0]
    # The training rows: those the seed's hash does not hold out, about 80%.
    n_held_out = int(np.count_nonzero(held_out("split", 0, 600, 0.2, seed=0)))
    assert meta["n_examples"] == 600 - n_held_out and 450 <= meta["n_examples"] <= 510
    history = pl.read_parquet(out / "cost_history.parquet")
    per_candidate = pl.read_parquet(out / "search_cost_history.parquet")
    chosen_history = per_candidate.filter(pl.col("candidate") == chosen["candidate"][0])
    np.testing.assert_array_equal(history["cost"].to_numpy(), chosen_history["cost"].to_numpy())
    assert read_metadata(out / "search.parquet")["config"]["l2"] == [0.0, 30.0, 300.0]


def test_one_value_lists_are_the_plain_run(prefect_api, tmp_path, sample_file):
    outs = {}
    for name, l2 in (("plain", "0.1"), ("list", "0.1,")):
        outs[name] = tmp_path / name
        args = ["--l2", l2, "--exclude", "id"]
        assert run_cli("train", "--data", sample_file, "--output", outs[name], *args) == 0
    outs = {name: latest(store) for name, store in outs.items()}
    assert sorted(p.name for p in outs["list"].iterdir()) == OUTPUT_FILES
    for name in OUTPUT_FILES:
        if name.endswith(".parquet"):
            got, expected = (pl.read_parquet(outs[k] / name) for k in ("list", "plain"))
            assert got.equals(expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--l2", "0.1,x"], "Invalid value for --l2"),
        (["--l2", "0.1,-1"], "l2"),
        (["--learning-rate", "0.1,1", "--optimizer", "lbfgs"], "learning-rate list"),
    ],
)
def test_bad_grids_fail_with_one_line(tmp_path, sample_file, capsys, extra, message):
    status = run_cli(
        "train", "--data", sample_file, "--output", tmp_path / "out", "--exclude", "id", *extra
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("lrflow: error: ") and message in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()

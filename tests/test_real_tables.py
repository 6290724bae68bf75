"""Raw tables in (strings, booleans, nulls, a key, a rare label), through train and score.

The oracle is scikit-learn fitted on a treatment-coded design built here by
hand, with the same objective (no penalty, or ``C = 1/l2``; row weights).
"""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.backends import open_training_data, plan_run
from flows.config import TrainConfig
from flows.errors import DataError
from flows.outputs import raw_scale_parameters
from flows.train import fit_dataset

# Tight fits: L-BFGS until it can lower the cost no more, so that both sides
# are at the optimum and the comparison measures the objective, not a stop rule.
TIGHT = {"optimizer": "lbfgs", "tol": 0.0, "iterations": 500, "checkpoint_every": 0}
LEVELS = ["berlin", "oslo", "paris", "rome"]


def raw_table(m: int = 3000, seed: int = 0) -> pl.DataFrame:
    """A customer table: key, strings, a categorical, a boolean, nulls, ~12% positives."""
    rng = np.random.default_rng(seed)
    city = rng.choice(LEVELS, m, p=[0.4, 0.2, 0.25, 0.15])
    tier = rng.choice(["gold", "basic"], m, p=[0.3, 0.7])
    smoker = rng.random(m) < 0.3
    age = rng.normal(45, 12, m)
    income = rng.lognormal(10, 0.5, m) / 10_000  # in 10k
    z = (
        -2.6
        + 0.03 * (age - 45)
        + np.select([city == "oslo", city == "paris", city == "rome"], [0.6, -0.5, 0.9], 0.0)
        + 0.7 * smoker
        - 0.4 * (tier == "gold")
        + 0.4 * income
    )
    label = rng.random(m) < 1 / (1 + np.exp(-z))
    age_missing = rng.random(m) < 0.08
    return pl.DataFrame(
        {
            "customer_id": np.arange(10_000, 10_000 + m),
            "city": city,
            "tier": pl.Series(tier).cast(pl.Categorical),
            "smoker": smoker,
            "age": pl.Series(age).scatter(np.flatnonzero(age_missing), None),
            "income": income,
            "weight": rng.integers(1, 4, m).astype(float),
            "churned": np.where(label, "yes", "no"),
        }
    )


def hand_design(frame: pl.DataFrame, mean_age: float) -> tuple[np.ndarray, list[str]]:
    """The treatment-coded ``(m, n)`` design, in the plan's term order."""
    age = frame["age"].to_numpy()
    missing = np.isnan(age)
    city = frame["city"].to_numpy()
    columns = {
        "city=oslo": city == "oslo",
        "city=paris": city == "paris",
        "city=rome": city == "rome",
        "tier=gold": (frame["tier"] == "gold").to_numpy(),
        "smoker": frame["smoker"].to_numpy(),
        "age": np.where(missing, mean_age, age),
        "age=(missing)": missing,
        "income": frame["income"].to_numpy(),
    }
    return np.column_stack([v.astype(float) for v in columns.values()]), list(columns)


def fit_table(tmp_path: Path, frame: pl.DataFrame, **settings) -> tuple[dict[str, float], object]:
    path = tmp_path / "in" / "table.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, row_group_size=700)
    config = TrainConfig(
        data=str(path),
        output=str(tmp_path / "out"),
        label="churned",
        **(TIGHT | settings),
    )
    data = open_training_data(config, *plan_run(config))
    try:
        result = fit_dataset(data, config)
        mean, scale = data.plan.term_mean_scale()
        w_raw, b_raw = raw_scale_parameters(result.w, result.b, mean, scale)
    finally:
        data.close()
    params = dict(zip(data.plan.terms, w_raw.tolist(), strict=True))
    params["(Intercept)"] = b_raw
    return params, data


def sklearn_params(X: np.ndarray, y: np.ndarray, names: list[str], **kwargs) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(solver="newton-cholesky", tol=1e-12, max_iter=200, **kwargs)
    weight = kwargs.pop("sample_weight", None) if "sample_weight" in kwargs else None
    fitted.fit(X, y, sample_weight=weight)
    params = dict(zip(names, fitted.coef_[0].tolist(), strict=True))
    params["(Intercept)"] = float(fitted.intercept_[0])
    return params


def assert_same_params(ours: dict[str, float], theirs: dict[str, float], rtol: float) -> None:
    assert sorted(ours) == sorted(theirs)
    names = sorted(theirs)
    np.testing.assert_allclose(
        [ours[n] for n in names], [theirs[n] for n in names], rtol=rtol, atol=rtol * 1e-2
    )


def test_coefficients_equal_a_hand_built_treatment_coded_design(tmp_path):
    frame = raw_table()
    ours, data = fit_table(
        tmp_path,
        frame,
        exclude=["customer_id", "weight"],
        missing="impute",
        validation_fraction=0,
    )
    assert data.plan.terms == (
        "city=oslo",
        "city=paris",
        "city=rome",
        "tier=gold",  # basic < gold: basic is the reference
        "smoker",
        "age",
        "age=(missing)",
        "income",
    )
    X, names = hand_design(frame, mean_age=float(frame["age"].mean()))
    y = (frame["churned"] == "yes").to_numpy()
    assert_same_params(ours, sklearn_params(X, y, names, C=np.inf), rtol=1e-6)


def test_l2_and_row_weights_match_scikit_learns_sample_weight(tmp_path):
    frame = raw_table(seed=1)
    l2 = 3.0
    ours, _ = fit_table(
        tmp_path,
        frame,
        exclude=["customer_id"],
        weight="weight",
        missing="impute",
        validation_fraction=0,
        l2=l2,
        standardize=False,
    )
    X, names = hand_design(frame, mean_age=float(frame["age"].mean()))
    y = (frame["churned"] == "yes").to_numpy()
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(C=1 / l2, solver="newton-cholesky", tol=1e-12, max_iter=200)
    fitted.fit(X, y, sample_weight=frame["weight"].to_numpy())
    theirs = dict(zip(names, fitted.coef_[0].tolist(), strict=True))
    theirs["(Intercept)"] = float(fitted.intercept_[0])
    assert_same_params(ours, theirs, rtol=1e-6)


def test_class_weight_balanced_matches_scikit_learn_and_finds_the_rare_class(tmp_path):
    frame = raw_table(seed=2)
    ours, data = fit_table(
        tmp_path,
        frame,
        exclude=["customer_id", "weight"],
        missing="impute",
        class_weight="balanced",
        validation_fraction=0,
    )
    X, names = hand_design(frame, mean_age=float(frame["age"].mean()))
    y = (frame["churned"] == "yes").to_numpy()
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(
        C=np.inf, class_weight="balanced", solver="newton-cholesky", tol=1e-12, max_iter=200
    )
    fitted.fit(X, y)
    theirs = dict(zip(names, fitted.coef_[0].tolist(), strict=True))
    theirs["(Intercept)"] = float(fitted.intercept_[0])
    assert_same_params(ours, theirs, rtol=1e-6)
    assert data.metrics(np.zeros((data.plan.n_terms, 1)), 0.0)["train"]["n_examples"] == 3000


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver",
    [
        {"optimizer": "gd", "learning_rate": 1.0, "iterations": 200},
        {"optimizer": "gd", "learning_rate": "auto", "iterations": 50},
        {"optimizer": "newton", "iterations": 50, "tol": 1e-10, "l2": 1.0},
    ],
    ids=["gd", "auto-step", "newton"],
)
def test_the_three_backends_give_the_same_model(tmp_path, solver):
    """Categorical, missing, weights and the default split: memory, stream and Dask agree."""
    frame = raw_table(4000, seed=3)
    settings = {"exclude": ["customer_id"], "weight": "weight", "missing": "impute"} | solver
    found = {}
    for backend in ("memory", "stream", "dask"):
        extra = {"cache_dir": str(tmp_path / "cache")} if backend == "stream" else {}
        params, data = fit_table(tmp_path / backend, frame, backend=backend, **settings, **extra)
        found[backend] = (params, data.n_examples, data.n_validation)
    memory = found["memory"]
    assert memory[2] > 0  # the default split holds rows out on every backend
    for backend in ("stream", "dask"):
        params, n, n_validation = found[backend]
        assert (n, n_validation) == memory[1:]
        assert_same_params(params, memory[0], rtol=1e-9)


def test_bad_tables_fail_naming_the_column_and_the_remedy(tmp_path):
    frame = raw_table(500)
    with pytest.raises(
        DataError, match=r"null values in 1 column\(s\): 'age' \(\d+\).*--missing impute"
    ):
        fit_table(tmp_path, frame, exclude=["customer_id", "weight"])
    free_text = frame.with_columns(pl.format("note {}", pl.col("customer_id")).alias("note"))
    with pytest.raises(
        DataError, match=r"column 'note': has more than 100 distinct.*--exclude note"
    ):
        fit_table(tmp_path, free_text, exclude=["customer_id", "weight"], missing="impute")
    negative = frame.with_columns(pl.lit(-1.0).alias("weight"))
    with pytest.raises(DataError, match="column 'weight': weight has 500 negative values"):
        fit_table(tmp_path, negative, weight="weight", missing="impute")


def test_a_search_runs_on_every_backend_and_picks_the_same_candidate(tmp_path):
    frame = raw_table(2000, seed=4)
    settings = {
        "exclude": ["customer_id", "weight"],
        "missing": "impute",
        "optimizer": "gd",
        "learning_rate": 1.0,
        "iterations": 100,
        "l2": [0.1, 30.0, 3000.0],
    }
    from flows.search import run_search

    chosen = {}
    for backend in ("memory", "stream"):
        path = tmp_path / backend / "table.parquet"
        path.parent.mkdir(parents=True)
        frame.write_parquet(path)
        config = TrainConfig(
            data=str(path),
            output=str(tmp_path / backend / "out"),
            label="churned",
            backend=backend,
            cache_dir=str(tmp_path / "cache"),
            **settings,
        )
        data = open_training_data(config, *plan_run(config))
        try:
            search = run_search(data, config, n_threads=1)
        finally:
            data.close()
        chosen[backend] = (search.selected, search.validation_log_loss)
    assert chosen["stream"][0] == chosen["memory"][0]
    np.testing.assert_allclose(chosen["stream"][1], chosen["memory"][1], rtol=1e-9)


def score_with(tmp_path: Path, model_dir: Path, frame: pl.DataFrame, **kwargs):
    from flows.scoring import load_model, plan_scoring, score_to_parquet

    path = tmp_path / "new" / "batch.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    model = load_model(model_dir)
    plan = plan_scoring(model, path, **kwargs)
    return model, score_to_parquet(plan, model, tmp_path / "scores" / "p.parquet")


def trained_model_dir(tmp_path: Path, frame: pl.DataFrame) -> Path:
    """A model written as `lrflow train` writes it (the flow's own output writer)."""
    from datetime import datetime, timezone

    from flows.outputs import write_run_outputs

    config = TrainConfig(
        data=str(tmp_path / "in" / "table.parquet"),
        output=str(tmp_path / "model"),
        label="churned",
        exclude=["customer_id", "weight"],
        missing="impute",
        validation_fraction=0,
        **TIGHT,
    )
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    frame.write_parquet(config.data)
    data = open_training_data(config, *plan_run(config))
    result = fit_dataset(data, config)
    write_run_outputs(
        Path(config.output), data, result, config, started_at=datetime.now(timezone.utc)
    )
    return Path(config.output)


def test_scoring_applies_the_stored_plan_unseen_levels_as_the_reference(tmp_path):
    frame = raw_table(1500, seed=5)
    model_dir = trained_model_dir(tmp_path, frame)
    params = dict(
        pl.read_parquet(model_dir / "params.parquet").select("term", "estimate").iter_rows()
    )
    # Next month: a new city, no Oslo rows, nulls in age and city, no label column.
    batch = pl.DataFrame(
        {
            "customer_id": [1, 2, 3, 4],
            "city": ["madrid", "rome", None, "berlin"],
            "tier": pl.Series(["gold", "basic", "basic", "gold"]).cast(pl.Categorical),
            "smoker": [True, False, False, True],
            "age": [50.0, None, 30.0, 41.0],
            "income": [2.0, 3.0, 1.5, 2.5],
        }
    )
    model, result = score_with(tmp_path, model_dir, batch)
    assert result.unseen == {"city": 2}  # madrid, and a null where training had none
    assert result.imputed == {"age": 1}
    assert result.metrics is None  # no label: nothing to measure
    scores = pl.read_parquet(result.output)
    assert scores.columns == ["customer_id", "probability", "prediction"]
    mean_age = model.plan.features[[f.name for f in model.plan.features].index("age")].impute
    # By hand from params.parquet, raw scale: Madrid and the null city score as Berlin.
    rows = [
        {"tier=gold": 1, "smoker": 1, "age": 50.0, "income": 2.0},
        {"city=rome": 1, "age": mean_age, "age=(missing)": 1, "income": 3.0},
        {"age": 30.0, "income": 1.5},
        {"tier=gold": 1, "smoker": 1, "age": 41.0, "income": 2.5},
    ]
    expected = [
        1 / (1 + np.exp(-(params["(Intercept)"] + sum(params[t] * v for t, v in row.items()))))
        for row in rows
    ]
    np.testing.assert_allclose(scores["probability"].to_numpy(), expected, rtol=1e-12)
    with pytest.raises(DataError, match=r"column 'city': 1 values of levels not seen in training"):
        score_with(tmp_path, model_dir, batch.drop_nulls("city"), unseen="error")


def test_scoring_labelled_data_also_writes_its_metrics(tmp_path):
    frame = raw_table(1500, seed=6)
    model_dir = trained_model_dir(tmp_path, frame)
    fresh = raw_table(800, seed=7).drop("weight")
    _, result = score_with(tmp_path, model_dir, fresh)
    assert result.metrics_file is not None and result.metrics is not None
    metrics = pl.read_parquet(result.metrics_file)
    assert metrics["split"].unique().to_list() == ["scored"]
    from lr_kernel.metrics import binary_metrics

    p = pl.read_parquet(result.output)["probability"].to_numpy()
    y = (fresh["churned"] == "yes").to_numpy().astype(float).reshape(1, -1)
    exact = binary_metrics(np.log(p / (1 - p)).reshape(1, -1), y)
    got = dict(zip(metrics["metric"], metrics["value"], strict=True))
    for name in ("log_loss", "accuracy", "precision", "recall"):
        assert got[name] == pytest.approx(exact[name], rel=1e-9)
    assert got["roc_auc"] == pytest.approx(exact["roc_auc"], abs=1e-4)


def test_help_is_readable_at_80_columns():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    for flag in ("--validation-fraction", "--missing", "--class-weight", "--max-levels"):
        assert flag in out


def test_scoring_refuses_a_decimal_polars_cannot_hold_from_the_footer(tmp_path):
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.scoring import load_model, plan_scoring

    model_dir = trained_model_dir(tmp_path, raw_table(600, seed=8))
    batch = raw_table(5, seed=9).drop("weight", "churned").to_arrow()
    wide = pa.array([decimal.Decimal("2.50")] * 5, type=pa.decimal256(76, 2))
    batch = batch.set_column(batch.schema.get_field_index("income"), "income", wide)
    path = tmp_path / "wide.parquet"
    pq.write_table(batch, path)
    with pytest.raises(
        DataError, match=r"column 'income': cannot read data \(decimal precision 76"
    ):
        plan_scoring(load_model(model_dir), path)

"""Standard errors and diagnostics through the flows' plain functions, against statsmodels.

Each run goes the way `lrflow train` goes: open_training_data, the fit,
flows.inference.check_fit, write_run_outputs; the oracle reads the same rows.
"""

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.backends import open_training_data, plan_run
from flows.config import TrainConfig
from flows.errors import DataError
from flows.inference import STATISTICS, check_fit
from flows.outputs import read_metadata, write_run_outputs
from flows.train import fit_with_validation_cost
from tests.conftest import real_binary_dataset
from tests.test_real_tables import hand_design, raw_table

sm = pytest.importorskip("statsmodels.api")

# Well-conditioned, unseparated columns of breast_cancer (as tests/test_newton_inference.py).
CANCER = {
    1: "texture",
    4: "smoothness",
    8: "symmetry",
    9: "fractal_dimension",
    21: "worst_texture",
}


def cancer_frame() -> pl.DataFrame:
    data, labels = real_binary_dataset("breast_cancer")
    return pl.DataFrame({name: data[:, j] for j, name in CANCER.items()} | {"diagnosis": labels})


def cancer_design(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(m, n)`` raw design and 0/1 labels ('malignant', the larger value, is 1)."""
    X = frame.select(list(CANCER.values())).to_numpy()
    return X, (frame["diagnosis"] == "malignant").to_numpy().astype(np.float64)


def train_plain(tmp_path: Path, frame: pl.DataFrame, label: str, **settings):
    """A run as the flow makes it; returns params.parquet as a frame and the metadata."""
    path = tmp_path / "in" / "table.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, row_group_size=200)
    settings = {"validation_fraction": 0, "checkpoint_every": 0} | settings
    config = TrainConfig(data=str(path), output=str(tmp_path / "out"), label=label, **settings)
    data = open_training_data(config, *plan_run(config))
    try:
        result, validation_cost = fit_with_validation_cost(data, config)
        result, validation_cost, inference = check_fit(
            data, result, validation_cost, config, refit=fit_with_validation_cost
        )
        write_run_outputs(
            Path(config.output),
            data,
            result,
            config,
            started_at=datetime.now(timezone.utc),
            validation_cost=validation_cost,
            inference=inference,
        )
    finally:
        data.close()
    params = pl.read_parquet(tmp_path / "out" / "params.parquet")
    return params, read_metadata(tmp_path / "out" / "params.parquet"), inference


def intercept_last(values) -> np.ndarray:
    values = np.asarray(values)
    return np.concatenate([values[1:], values[:1]])


def assert_equal_to(params: pl.DataFrame, oracle, confidence: float, rtol: float) -> None:
    """Every column to ``rtol``; p to ``rtol z²``: a relative error ``e`` in ``z`` moves the
    normal tail by ``~z² e`` relative (p = 1e-111 at z = 22 amplifies 500 times)."""
    interval = np.asarray(oracle.conf_int(alpha=1 - confidence))
    for column, want in [
        ("estimate", oracle.params),
        ("std_error", oracle.bse),
        ("z_value", oracle.tvalues),
        ("ci_lower", interval[:, 0]),
        ("ci_upper", interval[:, 1]),
    ]:
        np.testing.assert_allclose(
            params[column].to_numpy(), intercept_last(want), rtol=rtol, err_msg=column
        )
    z = intercept_last(oracle.tvalues)
    relative = np.abs(params["p_value"].to_numpy() / intercept_last(oracle.pvalues) - 1)
    assert np.all(relative <= rtol * np.maximum(1.0, z**2)), relative


def statsmodels_logit(X: np.ndarray, y: np.ndarray):
    return sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12, maxiter=100)


@pytest.mark.parametrize(
    "backend", ["memory", "stream", pytest.param("dask", marks=pytest.mark.slow)]
)
def test_the_defaults_give_statsmodels_logit_table_on_every_backend(tmp_path, backend):
    frame = cancer_frame()
    extra = {"cache_dir": str(tmp_path / "cache")} if backend == "stream" else {}
    # The default optimizer and tol: a default run reaches the optimum to 1e-6.
    params, metadata, _ = train_plain(
        tmp_path, frame, "diagnosis", backend=backend, confidence=0.9, **extra
    )
    assert params["term"].to_list() == [*CANCER.values(), "(Intercept)"]
    assert params.schema["std_error"] == pl.Float64
    assert_equal_to(params, statsmodels_logit(*cancer_design(frame)), 0.9, rtol=1e-6)
    fit = metadata["fit"]
    assert fit["converged"] and fit["stop_reason"] == "tolerance"
    assert fit["optimizer"] == "newton" and fit["gradient_max"] <= 1e-8
    assert fit["statistics"]["hessian"] == "unpenalized"
    assert fit["diagnostics"] == [] and fit["aliased"] == [] and fit["separation"] == []


def test_a_categorical_column_equals_statsmodels_on_a_treatment_coded_design(tmp_path):
    frame = raw_table(3000, seed=8)
    params, _, _ = train_plain(
        tmp_path, frame, "churned", exclude=["customer_id", "weight"], missing="impute"
    )
    X, names = hand_design(frame, mean_age=float(frame["age"].mean()))
    y = (frame["churned"] == "yes").to_numpy().astype(np.float64)
    ours = params.filter(pl.col("term") != "(Intercept)")
    order = [names.index(term) for term in ours["term"]]  # the plan's order
    assert sorted(order) == list(range(len(names)))
    assert_equal_to(params, statsmodels_logit(X[:, order], y), 0.95, rtol=1e-6)


def test_weighted_statistics_follow_statsmodels_freq_weights(tmp_path):
    frame = raw_table(3000, seed=9)
    params, metadata, _ = train_plain(
        tmp_path, frame, "churned", exclude=["customer_id"], weight="weight", missing="impute"
    )
    X, names = hand_design(frame, mean_age=float(frame["age"].mean()))
    order = [names.index(term) for term in params["term"].to_list()[:-1]]
    y = (frame["churned"] == "yes").to_numpy().astype(np.float64)
    oracle = sm.GLM(
        y,
        sm.add_constant(X[:, order]),
        family=sm.families.Binomial(),
        freq_weights=frame["weight"].to_numpy(),
    ).fit(tol=1e-12)
    assert_equal_to(params, oracle, 0.95, rtol=1e-6)
    assert metadata["fit"]["statistics"]["weights"] == "frequency"


def test_l2_statistics_come_from_the_penalized_hessian(tmp_path):
    frame = cancer_frame()
    params, metadata, _ = train_plain(tmp_path, frame, "diagnosis", l2=5.0, standardize=False)
    X, y = cancer_design(frame)
    Xa = np.column_stack([X, np.ones(len(y))])  # (m, n + 1), intercept last
    theta = params["estimate"].to_numpy()
    a = 1 / (1 + np.exp(-(Xa @ theta)))
    penalty = np.diag([5.0] * X.shape[1] + [0.0])
    covariance = np.linalg.inv(Xa.T @ (Xa * (a * (1 - a))[:, None]) + penalty)
    np.testing.assert_allclose(params["std_error"], np.sqrt(np.diag(covariance)), rtol=1e-6)
    assert metadata["fit"]["statistics"]["hessian"] == "penalized (l2 = 5)"


def with_sum_column(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns((pl.col("texture") + pl.col("symmetry")).alias("total"))


def test_aliased_terms_fail_naming_them_and_the_remedy(tmp_path):
    with pytest.raises(DataError) as raised:
        train_plain(tmp_path, with_sum_column(cancer_frame()), "diagnosis")
    message = str(raised.value)
    assert "aliased terms" in message
    assert "'total' = a combination of 'texture', 'symmetry'" in message
    assert "--exclude total" in message and "--drop-aliased" in message
    assert not (tmp_path / "out" / "params.parquet").exists()


def test_drop_aliased_refits_without_them_and_records_null_estimates(tmp_path):
    frame = with_sum_column(cancer_frame())
    params, metadata, inference = train_plain(tmp_path, frame, "diagnosis", drop_aliased=True)
    total = params.filter(pl.col("term") == "total")
    assert total.select("estimate", *STATISTICS).null_count().row(0) == (1,) * 6
    rest = params.filter(pl.col("term") != "total")
    assert_equal_to(rest, statsmodels_logit(*cancer_design(frame)), 0.95, rtol=1e-6)
    assert metadata["fit"]["dropped_terms"] == ["total"]
    assert metadata["fit"]["aliased"] == [{"term": "total", "depends_on": ["texture", "symmetry"]}]
    assert any("aliased terms dropped" in line for line in inference.warnings)
    from flows.scoring import load_model

    model = load_model(tmp_path / "out")  # scoring reads the null as a term that adds nothing
    assert model.w[list(model.plan.terms).index("total")] == 0.0


@pytest.mark.parametrize("l2", [0.0, 1.0])
def test_a_level_that_predicts_the_label_is_named(tmp_path, l2):
    frame = raw_table(2000, seed=10).with_columns(
        churned=pl.when(pl.col("city") == "rome").then(pl.lit("yes")).otherwise(pl.col("churned"))
    )
    _, metadata, inference = train_plain(
        tmp_path, frame, "churned", exclude=["customer_id", "weight"], missing="impute", l2=l2
    )
    [warning] = [line for line in inference.warnings if line.startswith("separation")]
    assert "'city=rome' (every row positive)" in warning and "--exclude city" in warning
    assert ("finite only because of the penalty (l2 = 1)" in warning) == (l2 > 0)
    found = metadata["fit"]["separation"]
    assert {"term": "city=rome", "kind": "level", "label": 1.0} in found
    assert all(row["term"] in ("city=rome",) for row in found)


def test_the_label_sums_find_the_levels_the_kernels_separation_finds_in_memory(tmp_path):
    from flows.inference import indicator_terms, separation_findings
    from lr_kernel.inference import separation

    frame = raw_table(1500, seed=11).with_columns(
        churned=pl.when(pl.col("tier") == "gold").then(pl.lit("no")).otherwise(pl.col("churned"))
    )
    path = tmp_path / "table.parquet"
    frame.write_parquet(path)
    config = TrainConfig(
        data=str(path), output=str(tmp_path / "out"), label="churned", backend="memory",
        exclude=["customer_id", "weight"], missing="impute", validation_fraction=0,
    )  # fmt: skip
    data = open_training_data(config, *plan_run(config))
    n = data.plan.n_terms
    found = separation_findings(data, np.zeros((n, 1)))
    rows = data.train  # the in-memory rows, to hand the kernel's own check
    kernel = separation(rows.X, rows.Y, np.zeros((n, 1)), 0.0, indicator=indicator_terms(data.plan))
    assert [(r["term"], r["label"]) for r in found] == [
        (data.plan.terms[j], label) for j, label in zip(kernel.terms, kernel.labels, strict=True)
    ]
    assert [r["term"] for r in found] == ["tier=gold"]


def test_a_fit_short_of_the_optimum_says_so_and_writes_no_statistics(tmp_path):
    params, metadata, inference = train_plain(
        tmp_path, cancer_frame(), "diagnosis", optimizer="gd", learning_rate=0.5, iterations=20
    )
    assert params["estimate"].null_count() == 0
    for column in STATISTICS:
        assert params[column].null_count() == len(params)
    fit = metadata["fit"]
    assert not fit["converged"] and fit["stop_reason"] == "iterations"
    assert fit["statistics"]["null_reason"] == "the fit did not converge (iterations)"
    gradient = fit["gradient_max"]
    assert gradient > 1e-8
    assert inference.warnings[0] == (
        f"not converged (iterations): max |gradient| {gradient:.2g} > tol 1e-08 after 20 "
        "iterations; try --optimizer newton or more --iterations"
    )
    assert fit["diagnostics"] == list(inference.warnings)


@pytest.mark.parametrize("l2", [0.0, 2.0])
def test_after_a_newton_fit_the_statistics_cost_no_second_hessian_pass(tmp_path, monkeypatch, l2):
    import dataclasses

    from lr_kernel import FusedLoss

    path = tmp_path / "table.parquet"
    cancer_frame().write_parquet(path)
    config = TrainConfig(
        data=str(path), output=str(tmp_path / "out"), label="diagnosis", l2=l2,
        validation_fraction=0, checkpoint_every=0,
    )  # fmt: skip
    data = open_training_data(config, *plan_run(config))
    passes = []
    hessian = FusedLoss.hessian

    def counted(self, *args, **kwargs):
        passes.append(args)
        return hessian(self, *args, **kwargs)

    try:
        result, validation_cost = fit_with_validation_cost(data, config)
        assert result.hessian is not None  # auto chose newton
        monkeypatch.setattr(FusedLoss, "hessian", counted)
        _, _, reused = check_fit(
            data, result, validation_cost, config, refit=fit_with_validation_cost
        )
        assert passes == []
        without = dataclasses.replace(result, hessian=None)
        _, _, computed = check_fit(
            data, without, validation_cost, config, refit=fit_with_validation_cost
        )
        assert len(passes) == 1
    finally:
        data.close()
    for name in STATISTICS:
        np.testing.assert_allclose(reused.statistics[name], computed.statistics[name], rtol=1e-9)


def test_the_cost_curve_is_drawn_on_a_log_gap_with_the_validation_cost():
    from flows.artifacts import cost_curve_png

    history = np.log(2) * np.exp(-np.arange(50) / 10.0) + 0.3
    gradient = np.exp(-np.arange(50) / 10.0)
    held_out = np.where(np.arange(50) % 10 == 0, history + 0.01, np.nan)
    png = cost_curve_png(history, gradient, held_out)
    assert png.startswith(b"\x89PNG") and png == cost_curve_png(history, gradient, held_out)
    assert png != cost_curve_png(history, gradient)


@pytest.mark.slow
def test_the_command_line_warns_in_one_line_and_fails_on_aliased_terms(
    prefect_api, tmp_path, capsys
):
    from flows.cli import main

    def run(*args) -> int:
        try:
            main(["train", "--label", "diagnosis", "--validation-fraction", "0", *map(str, args)])
        except SystemExit as stop:
            return int(stop.code or 0)
        return 0

    table = tmp_path / "cancer.parquet"
    cancer_frame().write_parquet(table)
    status = run("--data", table, "--output", tmp_path / "short", "--optimizer", "gd",
                 "--iterations", "20")  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0
    [line] = [line for line in err.splitlines() if line.startswith("lrflow: warning:")]
    assert line.startswith("lrflow: warning: not converged (iterations): max |gradient| ")
    assert line.endswith(
        "> tol 1e-08 after 20 iterations; try --optimizer newton or more --iterations"
    )
    aliased = tmp_path / "aliased.parquet"
    with_sum_column(cancer_frame()).write_parquet(aliased)
    assert run("--data", aliased, "--output", tmp_path / "aliased") == 2
    assert "lrflow: error: aliased terms" in capsys.readouterr().err
    assert run("--data", aliased, "--output", tmp_path / "dropped", "--drop-aliased") == 0
    assert "aliased terms dropped" in capsys.readouterr().err

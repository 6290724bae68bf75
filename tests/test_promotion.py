"""Promotion on every backend: the current model measured on the new run's held-out rows by
the same pass as the run's validation metrics, so memory, stream and Dask decide alike."""

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from flows.backends import open_training_data, plan_run
from flows.store import latest, read_history
from flows.train import write_outputs
from lr_kernel import fit_loss
from tests.conftest import memory_config
from tests.test_backends import RTOL, make_parts

START = datetime(2026, 12, 1, 3, 0, 0, tzinfo=timezone.utc)
FEATURES = ["f0", "f1", "f2", "f3"]
BACKENDS = ["memory", "stream", "dask"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("promotion") / "parts")


def config_of(parts, **options):
    """The four features of ``parts``, a quarter of the rows held out (unless told otherwise)."""
    return memory_config(
        parts, label="y", **{"features": FEATURES, "validation_fraction": 0.25, **options}
    )


class Runs:
    """Train-and-commit on one backend into one store, as the train flow's last steps do."""

    def __init__(self, parts, store, backend, cache, client=None):
        self.parts, self.store, self.backend = parts, store, backend
        self.cache, self.client, self.count = cache, client, 0

    def open(self, **options):
        if self.backend == "dask":  # on the module's cluster (open_training_data starts one)
            from flows.backends.dask_backend import open_dask
            from flows.backends.passes import settings_of

            config = config_of(self.parts, backend="dask", **options)
            plan, validation = plan_run(config)
            return open_dask(plan, validation, settings_of(config, plan), client=self.client)
        if self.backend == "stream":  # many chunks
            options |= {"cache_dir": str(self.cache), "memory_budget": 60_000}
        config = config_of(self.parts, backend=self.backend, **options)
        return open_training_data(config, *plan_run(config))

    def train(self, *, backend=None, l2=0.1, **options):
        """One run: fit, its validation metrics, the commit (write_outputs) with if-better."""
        runs = self if backend is None else Runs(self.parts, self.store, backend, self.cache)
        data = runs.open(**options)
        try:
            result = fit_loss(data.loss(), iterations=100, l2=l2, tol=1e-10, optimizer="lbfgs")
            metrics = data.metrics(result.w, result.b)
            config = config_of(self.parts, output=str(self.store), l2=l2, **options)
            self.count += 1
            stored = write_outputs.fn(
                data, result, config, START + timedelta(minutes=self.count), metrics=metrics
            )
        finally:
            data.close()
        assert stored.comparison.challenger_log_loss == metrics["validation"]["log_loss"]
        return stored


def raw_validation_rows(parts, with_weights=False, **options):
    """The held-out rows on the raw scale (the in-memory run's, undone), their 0/1 labels
    and, if asked, their row weights."""
    config = config_of(parts, **options)
    data = open_training_data(config, *plan_run(config))
    mean, scale = data.plan.term_mean_scale()
    X = data.held_out.X * scale[:, np.newaxis] + mean[:, np.newaxis]  # (n, m), raw values
    rows = dict(zip(data.plan.terms, X, strict=True))
    if with_weights:
        return rows, data.held_out.Y[0], data.held_out.weight[0]
    return rows, data.held_out.Y[0]


def oracle_log_loss(run_dir, rows, Y, weight=None):
    """scikit-learn's log-loss of the model's params.parquet estimates on the raw rows."""
    from sklearn.metrics import log_loss

    params = pl.read_parquet(run_dir / "params.parquet")
    estimate = dict(zip(params["term"], params["estimate"], strict=True))
    z = estimate.pop("(Intercept)") + sum(w * rows[term] for term, w in estimate.items())
    return log_loss(Y, 1 / (1 + np.exp(-z)), sample_weight=weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_run_is_compared_with_the_current_model_on_every_backend(
    parts, tmp_path, request, backend
):
    client = request.getfixturevalue("dask_client") if backend == "dask" else None
    runs = Runs(parts, tmp_path / "store", backend, tmp_path / "cache", client)
    rows, Y = raw_validation_rows(parts)
    first = runs.train(backend="memory")
    assert first.comparison.reason == "promoted: no current model"
    expected = oracle_log_loss(first.run_dir, rows, Y)
    assert first.comparison.challenger_log_loss == pytest.approx(expected, rel=RTOL)

    # The same data and settings on this backend: the same model, as good as the current one.
    same = runs.train()
    assert same.comparison.promoted, same.comparison.reason
    assert same.comparison.champion_run == first.run_dir.name
    assert same.comparison.champion_log_loss == pytest.approx(expected, rel=RTOL)
    assert same.comparison.challenger_log_loss == pytest.approx(expected, rel=RTOL)
    assert same.comparison.reason.startswith("promoted: validation log-loss")

    # A much more penalized model is worse on the same rows: kept, not promoted.
    worse = runs.train(l2=300.0)
    comparison = worse.comparison
    assert not comparison.promoted
    assert comparison.champion_log_loss == pytest.approx(
        oracle_log_loss(same.run_dir, rows, Y), rel=RTOL
    )
    assert comparison.challenger_log_loss > comparison.champion_log_loss * 1.01
    assert comparison.reason.startswith("not promoted: validation log-loss")
    assert comparison.reason.endswith(f"{same.run_dir.name} stays")
    assert latest(runs.store) == same.run_dir
    history = read_history(runs.store).to_pylist()
    assert [r["promoted"] for r in history] == [True, True, False]
    assert history[-1]["validation_log_loss"] == comparison.challenger_log_loss
    assert history[-1]["reason"] == comparison.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_positive_label_is_compared_as_the_same_model(parts, tmp_path, request, backend):
    """Run 2 calls 0 the positive class: the current model's P(y = 1) is 1 - P(y' = 1), so
    its log-loss on run 2's labels is its log-loss on run 1's (scikit-learn on raw rows)."""
    client = request.getfixturevalue("dask_client") if backend == "dask" else None
    runs = Runs(parts, tmp_path / "store", backend, tmp_path / "cache", client)
    rows, Y = raw_validation_rows(parts)
    first = runs.train(backend="memory")
    flipped = runs.train(positive_label="0")
    comparison = flipped.comparison
    assert comparison.champion_log_loss == pytest.approx(
        oracle_log_loss(first.run_dir, rows, Y), rel=RTOL
    )
    # The flipped fit is the mirror image of the first: the same loss, so promoted.
    assert comparison.challenger_log_loss == pytest.approx(comparison.champion_log_loss, rel=1e-6)
    assert comparison.promoted, comparison.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_terms_the_runs_do_not_share(parts, tmp_path, request, backend):
    """A current model without some of the new run's terms is measured with them at 0; one
    with a term the new run lacks cannot be measured: not promoted, and why."""
    client = request.getfixturevalue("dask_client") if backend == "dask" else None
    runs = Runs(parts, tmp_path / "store", backend, tmp_path / "cache", client)
    rows, Y = raw_validation_rows(parts)
    narrow = runs.train(backend="memory", features=["f0", "f1"])
    wide = runs.train()
    assert wide.comparison.champion_log_loss == pytest.approx(
        oracle_log_loss(narrow.run_dir, rows, Y), rel=RTOL
    )
    assert wide.comparison.promoted  # f2 carries most of the signal
    fewer = runs.train(features=["f0"])
    assert not fewer.comparison.promoted
    assert fewer.comparison.champion_log_loss is None
    assert fewer.comparison.reason == (
        f"not promoted: the current model {wide.run_dir.name} cannot be evaluated on this "
        "run's validation rows (it uses feature(s) f1, f2, f3 absent from this run's data); "
        "use --promote always to replace it"
    )
    assert latest(runs.store) == wide.run_dir


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_runs_compare_weighted_log_losses(parts, tmp_path, request, backend):
    """With row weights both models get the weighted mean log-loss, as the run's metrics do."""
    client = request.getfixturevalue("dask_client") if backend == "dask" else None
    runs = Runs(parts, tmp_path / "store", backend, tmp_path / "cache", client)
    rows, Y, weight = raw_validation_rows(parts, with_weights=True, class_weight="balanced")
    assert np.ptp(weight) > 0.05  # the classes are unbalanced enough to tell the two apart
    first = runs.train(backend="memory", class_weight="balanced")
    second = runs.train(class_weight="balanced", l2=3.0)
    expected = oracle_log_loss(first.run_dir, rows, Y, weight)
    unweighted = oracle_log_loss(first.run_dir, rows, Y)
    assert abs(expected / unweighted - 1) > 1e3 * RTOL  # far beyond the tolerance below
    assert second.comparison.champion_log_loss == pytest.approx(expected, rel=RTOL)
    assert second.comparison.challenger_log_loss == pytest.approx(
        oracle_log_loss(second.run_dir, rows, Y, weight), rel=RTOL
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["stream", "dask"])
def test_cli_runs_decide_as_the_in_memory_ones(prefect_api, parts, tmp_path, backend):
    """Three runs into a store through the command line (--promote if-better, the default
    split): the same model twice, then a heavily penalized one. Every backend records the
    in-memory store's log-losses and decisions."""
    pytest.importorskip("distributed")
    from tests.test_cli import run_cli

    common = ["train", "--data", parts, "--label", "y", "--iterations", "200"]
    flags = {
        "memory": ["--backend", "memory"],
        "stream": ["--backend", "stream", "--memory-budget", "50kB", "--cache-dir", tmp_path],
        "dask": ["--backend", "dask", "--dask-workers", "2"],
    }
    history = {}
    for name in ("memory", backend):
        for l2 in ("0.1", "0.1", "300"):
            assert run_cli(*common, "--l2", l2, "--output", tmp_path / name, *flags[name]) == 0
        history[name] = read_history(tmp_path / name).to_pylist()
    expected, got = history["memory"], history[backend]
    assert [r["promoted"] for r in got] == [r["promoted"] for r in expected] == [True, True, False]
    np.testing.assert_allclose(
        [r["validation_log_loss"] for r in got],
        [r["validation_log_loss"] for r in expected],
        rtol=RTOL,
    )

    def reasons(rows):  # the run names differ between the stores; the rest may not
        return [r["reason"].replace(rows[1]["run"], "<run>") for r in rows]

    assert reasons(got) == reasons(expected)
    assert reasons(got)[2].startswith("not promoted: validation log-loss")
    assert reasons(got)[2].endswith("<run> stays")

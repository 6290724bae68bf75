"""The model store: run directories, latest.json, runs.parquet, promotion, pruning, crashes."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import store as store_module
from flows.errors import DataError
from flows.outputs import (
    MANIFEST_NAME,
    params_table,
    read_metadata,
    verify_output_set,
    with_metadata,
)
from flows.store import (
    HISTORY_NAME,
    HISTORY_SCHEMA,
    LATEST_NAME,
    RUNS_DIR,
    Candidate,
    HeldOut,
    commit_run,
    decide,
    latest,
    on_run_scale,
    prune,
    read_history,
    read_latest,
    recover_store,
    resolve_model,
    run_name,
    validation_log_loss,
)
from lr_kernel.metrics import log_loss
from tests.conftest import write_parquet
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("x1", "x2")
START = datetime(2026, 12, 1, 3, 0, 0, tzinfo=timezone.utc)


def _raw_rows(m=200, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Raw validation rows ``X`` (2, m) whose labels ``Y`` (1, m) follow 1.5 x1 - 0.5 x2 + noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal([[1.0], [-2.0]], [[2.0], [0.5]], size=(2, m))  # (2, m)
    Y = ((1.5 * X[0] - 0.5 * X[1] + rng.normal(size=m)) > 0).astype(np.float64)[np.newaxis]
    return X, Y


def _held_out(challenger=None, m=200, seed=0) -> HeldOut:
    """:func:`_raw_rows` held out by a run that standardizes with the rows' own moments (as
    its plan would), with ``challenger`` (a raw-scale Candidate) as the run's model."""
    X, Y = _raw_rows(m, seed)
    mean, scale = X.mean(axis=1), X.std(axis=1)
    X_std = (X - mean[:, np.newaxis]) / scale[:, np.newaxis]  # (2, m), what the run holds
    held_out = HeldOut(
        FEATURES, mean, scale, "label", False, True, challenger_log_loss=float("nan"),
        log_loss=lambda w, b: log_loss(w.T @ X_std + b, Y),
    )  # fmt: skip
    if challenger is None:
        return held_out
    return replace(held_out, challenger_log_loss=validation_log_loss(challenger, held_out))


def _candidate(w, b=0.0, features=FEATURES, negative=False, positive=True) -> Candidate:
    return Candidate(features, np.asarray(w, dtype=np.float64), b, "label", negative, positive)


def _files(candidate: Candidate, run_id: str) -> dict[str, pa.Table | bytes]:
    """A minimal output set: params.parquet with the metadata that scoring reads, a picture."""
    metadata = {
        "run_id": run_id,
        "features": list(candidate.features),
        "label": candidate.label,
        "label_mapping": {"negative": False, "positive": True, "dtype": "Boolean"},
        # Raw-scale numeric terms: the plan scoring rebuilds for a model without one.
        "feature_mean": [0.0] * len(candidate.features),
        "feature_scale": [1.0] * len(candidate.features),
    }
    table = params_table(candidate.features, candidate.w, candidate.b)
    return {"params.parquet": with_metadata(table, metadata), "cost_history.png": b"PNG"}


def _commit(store, candidate, *, minutes=0, **options):
    run_id = str(uuid.uuid4())
    return commit_run(
        store,
        _files(candidate, run_id),
        run_id=run_id,
        started_at=START + timedelta(minutes=minutes),
        data_fingerprint="f" * 8,
        n_examples=123,
        held_out=_held_out(candidate),
        **options,
    )


# --- naming, reading -----------------------------------------------------------------------


def test_run_name_is_the_utc_start_and_the_run_ids_first_8_characters():
    berlin = timezone(timedelta(hours=1))
    started = datetime(2026, 12, 1, 4, 0, 0, tzinfo=berlin)
    assert run_name(started, "1a2b3c4d-0000-4000-8000-000000000000") == "20261201T030000Z-1a2b3c4d"


def test_validation_log_loss_matches_scikit_learn_and_aligns_by_name():
    from sklearn.metrics import log_loss as sklearn_log_loss

    X, Y = _raw_rows()
    held_out = _held_out()
    w, b = np.array([1.2, -0.4]), 0.3
    expected = sklearn_log_loss(Y[0], 1 / (1 + np.exp(-(w @ X + b))))
    assert validation_log_loss(_candidate(w, b), held_out) == pytest.approx(expected, rel=1e-12)
    # Features in another order, labels the other way round: the same model, the same loss.
    swapped = _candidate(-w[::-1], -b, features=FEATURES[::-1], negative=True, positive=False)
    assert validation_log_loss(swapped, held_out) == pytest.approx(expected, rel=1e-12)
    # Only the label values flipped: the model's probability is P(y = 0) on these rows.
    flipped = _candidate(w, b, negative=True, positive=False)
    expected_flipped = sklearn_log_loss(1 - Y[0], 1 / (1 + np.exp(-(w @ X + b))))
    assert validation_log_loss(flipped, held_out) == pytest.approx(expected_flipped, rel=1e-12)
    # A term of the run that the model lacks counts as weight 0.
    only_x2 = _candidate([-0.7], 0.1, features=("x2",))
    expected_x2 = sklearn_log_loss(Y[0], 1 / (1 + np.exp(-(-0.7 * X[1] + 0.1))))
    assert validation_log_loss(only_x2, held_out) == pytest.approx(expected_x2, rel=1e-12)


def test_on_run_scale_gives_the_raw_models_scores_on_the_standardized_rows():
    X, _ = _raw_rows()
    held_out = _held_out()
    X_std = (X - held_out.mean[:, np.newaxis]) / held_out.scale[:, np.newaxis]  # (2, m)
    w_raw, b_raw = np.array([0.8, 2.5]), -1.1
    w, b = on_run_scale(_candidate(w_raw, b_raw), held_out)
    assert w.shape == (2, 1)
    np.testing.assert_allclose(w.T @ X_std + b, (w_raw @ X + b_raw)[np.newaxis], rtol=1e-12)
    w_neg, b_neg = on_run_scale(_candidate(w_raw, b_raw, negative=True, positive=False), held_out)
    np.testing.assert_array_equal(w_neg, -w)
    assert b_neg == -b
    for alien, why in (
        (_candidate([1.0, 1.0], features=("x1", "x9")), "x9 absent"),
        (Candidate(FEATURES, w_raw, b_raw, "other", False, True), "label is 'other'"),
        (_candidate(w_raw, b_raw, negative="no", positive="yes"), "label values"),
    ):
        with pytest.raises(store_module.Incomparable, match=why):
            on_run_scale(alien, held_out)


def test_decide_follows_the_rule():
    good, bad = _candidate([1.5, -0.5]), _candidate([0.0, 0.0])
    good_loss, bad_loss = (validation_log_loss(c, _held_out()) for c in (good, bad))
    assert good_loss < bad_loss
    assert decide("if-better", 0.01, _held_out(bad), None).promoted  # no current model
    kept = decide("if-better", 0.01, _held_out(bad), good, "run-a")
    assert not kept.promoted and "run-a stays" in kept.reason
    assert kept.champion_log_loss == pytest.approx(good_loss, rel=1e-12)
    assert kept.challenger_log_loss == pytest.approx(bad_loss, rel=1e-12)
    assert decide("always", 0.01, _held_out(bad), good).promoted
    assert decide("if-better", 0.0, _held_out(good), good).promoted  # equal is good enough
    # The tolerance: a challenger slightly worse is promoted within it, not beyond.
    slightly = _candidate([1.35, -0.45])  # less confident than a model already too timid
    ratio = validation_log_loss(slightly, _held_out()) / good_loss - 1
    assert ratio > 0
    assert decide("if-better", ratio * 1.01, _held_out(slightly), good).promoted
    assert not decide("if-better", ratio * 0.99, _held_out(slightly), good).promoted
    # Nothing to compare on, or a current model the rows cannot evaluate: not promoted.
    blind = decide("if-better", 0.01, None, bad)
    assert not blind.promoted and "--validation-data" in blind.reason
    other = _candidate([1.0], features=("x9",))
    alien = decide("if-better", 0.01, _held_out(good), other, "run-x")
    assert not alien.promoted and "x9" in alien.reason and "--promote always" in alien.reason


# --- commit_run: layout, history, latest.json, keep_runs ------------------------------------


def test_commits_keep_every_run_and_the_history(tmp_path):
    store = tmp_path / "store"
    first = _commit(store, _candidate([1.5, -0.5]))
    second = _commit(store, _candidate([1.5, -0.5]), minutes=1)
    assert sorted(p.name for p in store.iterdir()) == [LATEST_NAME, RUNS_DIR, HISTORY_NAME]
    assert sorted(p.name for p in (store / RUNS_DIR).iterdir()) == [
        first.run_dir.name,
        second.run_dir.name,
    ]
    for stored in (first, second):
        assert sorted(p.name for p in stored.run_dir.iterdir()) == [
            MANIFEST_NAME,
            "cost_history.png",
            "params.parquet",
        ]
    history = pq.read_table(store / HISTORY_NAME)
    assert history.schema.remove_metadata().equals(HISTORY_SCHEMA)
    assert history.column("run").to_pylist() == [first.run_dir.name, second.run_dir.name]
    assert history.column("promoted").to_pylist() == [True, second.comparison.promoted]
    assert second.comparison.promoted  # the same model: as good as the current one
    assert latest(store) == second.run_dir
    found = read_latest(store)
    assert found.run == f"{RUNS_DIR}/{second.run_dir.name}"
    assert found.run_id == verify_output_set(second.run_dir).run_id


def test_a_model_that_is_worse_is_kept_but_not_promoted(tmp_path):
    store = tmp_path / "store"
    champion = _commit(store, _candidate([1.5, -0.5]))
    worse = _commit(store, _candidate([0.0, 0.0]), minutes=1)
    assert not worse.comparison.promoted
    assert verify_output_set(worse.run_dir)  # complete and kept
    assert latest(store) == champion.run_dir
    rows = read_history(store).to_pylist()
    assert [r["promoted"] for r in rows] == [True, False]
    assert rows[1]["reason"].startswith("not promoted: validation log-loss")
    assert rows[1]["validation_log_loss"] == pytest.approx(
        validation_log_loss(_candidate([0.0, 0.0]), _held_out()), rel=1e-12
    )


def test_keep_runs_removes_old_directories_but_never_the_promoted_one(tmp_path):
    store = tmp_path / "store"
    stored = [_commit(store, _candidate([1.5, -0.5]), minutes=k, keep_runs=2) for k in range(4)]
    names = [s.run_dir.name for s in stored]
    assert sorted(p.name for p in (store / RUNS_DIR).iterdir()) == names[-2:]
    assert stored[2].removed == (names[0],)
    # A run that is not promoted with keep_runs=1: the newest and the promoted one stay.
    worse = _commit(store, _candidate([0.0, 0.0]), minutes=9, keep_runs=1)
    assert not worse.comparison.promoted
    assert sorted(p.name for p in (store / RUNS_DIR).iterdir()) == [names[3], worse.run_dir.name]
    assert read_history(store).num_rows == 5  # the history keeps every row
    assert latest(store) == stored[3].run_dir
    assert prune(store, 1) == ()  # the same rule, called on its own
    assert sorted(p.name for p in (store / RUNS_DIR).iterdir()) == [names[3], worse.run_dir.name]


def test_a_pass_that_fails_while_measuring_the_current_model_leaves_the_store_as_it_was(
    tmp_path,
):
    """The current model is measured under the lock before anything is written: a pass
    over the held-out rows that fails (a lost worker, say) fails the commit, nothing else."""
    store = tmp_path / "store"
    _commit(store, _candidate([1.5, -0.5]))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    def lost(w, b):
        raise DataError("a worker left the cluster")

    candidate = _candidate([1.4, -0.5])
    run_id = str(uuid.uuid4())
    with pytest.raises(DataError, match="worker left"):
        commit_run(
            store, _files(candidate, run_id), run_id=run_id, started_at=START, data_fingerprint="f",
            n_examples=1, held_out=replace(_held_out(candidate), log_loss=lost),
        )  # fmt: skip
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_a_retried_commit_writes_one_set_and_one_row(tmp_path):
    store = tmp_path / "store"
    candidate = _candidate([1.5, -0.5])
    run_id = str(uuid.uuid4())
    arguments = dict(
        run_id=run_id, started_at=START, data_fingerprint="f", n_examples=1,
        held_out=_held_out(candidate),
    )  # fmt: skip
    first = commit_run(store, _files(candidate, run_id), **arguments)
    again = commit_run(store, _files(candidate, run_id), **arguments)
    assert again.run_dir == first.run_dir and again.comparison.promoted
    assert read_history(store).num_rows == 1
    assert len(list((store / RUNS_DIR).iterdir())) == 1


def test_latest_checks_the_run_against_its_manifest(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(DataError, match=r"no latest\.json"):
        latest(store)
    stored = _commit(store, _candidate([1.5, -0.5]))
    assert resolve_model(store) == stored.run_dir
    assert resolve_model(stored.run_dir) == stored.run_dir
    (stored.run_dir / "cost_history.png").write_bytes(b"PNG, changed")
    with pytest.raises(DataError, match="size or checksum differs"):
        latest(store)
    (stored.run_dir / "cost_history.png").write_bytes(b"PNG")
    raw = json.loads((store / LATEST_NAME).read_text())
    (store / LATEST_NAME).write_text(json.dumps(raw | {"manifest_blake2b": "0" * 32}))
    with pytest.raises(DataError, match=r"is not the one latest\.json names"):
        latest(store)


def test_recovery_rolls_latest_forward_and_removes_what_a_crash_left(tmp_path):
    store = tmp_path / "store"
    first = _commit(store, _candidate([1.5, -0.5]))
    second = _commit(store, _candidate([1.5, -0.5]), minutes=1)
    # A crash after runs.parquet recorded the second as promoted, before latest.json:
    first_id = verify_output_set(first.run_dir).run_id
    store_module._write_latest(store, first.run_dir.name, first_id, None, "promoted")
    assert latest(store) == first.run_dir
    half = store / RUNS_DIR / "20261201T090000Z-deadbeef"  # a run killed while writing
    (half / ".lrflow-staging-x").mkdir(parents=True)
    (store / RUNS_DIR / ".removing-20261101T000000Z-00000000").mkdir()  # a removal cut short
    recover_store(store)
    assert read_latest(store).run == f"{RUNS_DIR}/{second.run_dir.name}"
    assert latest(store) == second.run_dir
    assert sorted(p.name for p in (store / RUNS_DIR).iterdir()) == [
        first.run_dir.name,
        second.run_dir.name,
    ]


# --- kill -9 ---------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, uuid
    from datetime import datetime, timezone
    import numpy as np
    from tests.test_store import _candidate, _files, _held_out
    from flows.storage import location
    from flows.store import commit_run
    # Imported before "ready": the kills land in commits, not imports.
    import flows.scoring, flows.object_store

    store, seed = location(sys.argv[1]), int(sys.argv[2])  # a directory or s3://
    rng = np.random.default_rng(seed)
    print("ready", flush=True)
    for k in range(1_000_000):
        candidate = _candidate(rng.normal([1.5, -0.5], 0.5), rng.normal(0, 0.3))
        run_id = str(uuid.uuid4())
        commit_run(
            store, _files(candidate, run_id), run_id=run_id,
            started_at=datetime.now(timezone.utc), data_fingerprint="f", n_examples=k,
            held_out=_held_out(candidate),
            promote="always" if k % 3 == 0 else "if-better", keep_runs=3,
        )
    """
)


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_latest_complete_and_the_history_readable(tmp_path):
    """Two writers into one store (the lock serializes them), each killed with SIGKILL at
    a random moment, round after round: latest.json always names a complete run that
    its manifest confirms, runs.parquet always reads, and after the next writer's
    recovery latest.json names the newest run that runs.parquet records as promoted."""
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(15)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen_rows = 0
    for round_ in range(6):
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(store), str(10 * round_ + j)],
                stdout=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )
            for j in range(2)
        ]
        for writer in writers:
            assert writer.stdout.readline() == b"ready\n"
        for writer in rng.sample(writers, 2):
            time.sleep(rng.uniform(0.1, 1.5))  # a commit takes ~0.2 s, mostly fsyncs
            writer.send_signal(signal.SIGKILL)
        for writer in writers:
            assert writer.wait(timeout=30) == -signal.SIGKILL
        history = read_history(store)  # whole: a torn file would not parse
        assert history.num_rows >= seen_rows  # no row is ever lost
        seen_rows = history.num_rows
        if (store / LATEST_NAME).exists():
            latest(store)  # names a complete run, as its manifest says
        recover_store(store)
        promoted = [r for r in read_history(store).to_pylist() if r["promoted"]]
        if promoted:
            assert latest(store).name == promoted[-1]["run"]
        for run in (store / RUNS_DIR).iterdir() if (store / RUNS_DIR).exists() else []:
            verify_output_set(run)  # after recovery, only complete runs
    assert seen_rows > 6  # the writers got work done between the kills


# --- end to end through the CLI ----------------------------------------------------------------


def _labelled(m, seed, shuffle=False):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=m), rng.normal(size=m)
    label = (2.0 * x1 - 1.0 * x2 + 0.5 * rng.normal(size=m)) > 0
    if shuffle:
        label = rng.permutation(label)
    return {"id": [f"r{seed}-{i}" for i in range(m)], "x1": x1, "x2": x2, "label": label}


def test_two_cli_runs_then_score_from_the_store_and_from_a_run(prefect_api, tmp_path, capsys):
    data = write_parquet(tmp_path / "in" / "d.parquet", _labelled(300, 0))
    store = tmp_path / "store"
    for _ in range(2):
        assert (
            run_cli(
                "train", "--exclude", "id", "--data", data, "--output", store, "--iterations", 50
            )
            == 0
        )
    out = capsys.readouterr().out
    runs = sorted(p.name for p in (store / RUNS_DIR).iterdir())
    assert len(runs) == 2
    assert read_latest(store).run == f"{RUNS_DIR}/{runs[1]}"  # the newer, as good as the older
    history = pl.read_parquet(store / HISTORY_NAME)
    assert history["run"].to_list() == runs
    assert f"run {runs[1]}: promoted: validation log-loss" in out
    # The metadata's run id is the one in the directory's name and in runs.parquet.
    meta = read_metadata(store / RUNS_DIR / runs[1] / "params.parquet")
    assert meta["run_id"].replace("-", "")[:8] == runs[1][-8:]
    assert history["run_id"][1] == meta["run_id"]
    assert history["n_examples"].to_list() == [meta["n_examples"]] * 2  # the training rows
    assert history["data_fingerprint"].to_list() == [meta["input_fingerprint"]] * 2

    predictions = {}
    for name, model in (("store", store), ("run", store / RUNS_DIR / runs[0])):
        target = tmp_path / f"{name}.parquet"
        assert run_cli("score", "--model", model, "--data", data, "--output", target) == 0
        predictions[name] = pl.read_parquet(target)
        scored = read_metadata(target)
        expected = runs[1] if name == "store" else runs[0]
        assert scored["model_run"] == expected
        assert scored["model_store"] == str(store)
        assert f"(model {store / RUNS_DIR / expected})" in capsys.readouterr().out
    # Both runs trained on the same rows with the same settings: the same probabilities.
    np.testing.assert_allclose(
        predictions["store"]["probability"], predictions["run"]["probability"], rtol=1e-12
    )


def test_if_better_keeps_the_champion_over_a_model_of_shuffled_labels(
    prefect_api, tmp_path, capsys
):
    clean = write_parquet(tmp_path / "in" / "clean.parquet", _labelled(400, 1))
    shuffled = write_parquet(tmp_path / "in" / "shuffled.parquet", _labelled(400, 1, True))
    held_out = write_parquet(tmp_path / "val" / "v.parquet", _labelled(300, 2))
    store = tmp_path / "store"
    common = ["--output", store, "--validation-data", held_out, "--iterations", 200]
    assert run_cli("train", "--exclude", "id", "--data", clean, *common) == 0
    champion = latest(store)
    assert run_cli("train", "--exclude", "id", "--data", shuffled, *common) == 0
    out = capsys.readouterr().out
    assert latest(store) == champion
    rows = read_history(store).to_pylist()
    assert [r["promoted"] for r in rows] == [True, False]
    assert rows[0]["validation_log_loss"] < 0.5 < rows[1]["validation_log_loss"]
    assert f"not promoted: validation log-loss {rows[1]['validation_log_loss']:.6g}" in out
    assert f"{champion.name} stays" in rows[1]["reason"]
    # --promote always replaces it all the same.
    assert (
        run_cli("train", "--exclude", "id", "--data", shuffled, *common, "--promote", "always") == 0
    )
    assert latest(store).name == read_history(store).column("run").to_pylist()[-1]


def test_a_flat_output_directory_is_refused_with_one_line(prefect_api, tmp_path, capsys):
    data = write_parquet(tmp_path / "in" / "d.parquet", _labelled(50, 3))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / MANIFEST_NAME).write_text("{}")
    (flat / "params.parquet").write_bytes(b"PAR1")
    before = sorted(p.name for p in flat.iterdir())
    assert run_cli("train", "--exclude", "id", "--data", data, "--output", flat) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flat output set" in err and f"mv {flat} {flat}.flat" in err
    assert sorted(p.name for p in flat.iterdir()) == before


def test_a_failed_run_promotes_nothing_and_leaves_the_store_as_it_was(prefect_api, tmp_path):
    rng = np.random.default_rng(4)
    data = write_parquet(
        tmp_path / "in" / "d.parquet",
        {"x": rng.normal(size=500) * 100, "label": rng.integers(0, 2, size=500)},
    )
    store = tmp_path / "store"
    assert run_cli("train", "--data", data, "--output", store, "--iterations", 20) == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    diverging = ["--no-standardize", "--optimizer", "gd", "--learning-rate", 10]
    diverging += ["--promote", "always"]
    assert run_cli("train", "--data", data, "--output", store, *diverging) == 1
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before

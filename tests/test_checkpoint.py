"""Checkpoint and resume through the pipeline: kill -9, resume, refusal, Prefect retries."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import flows.train
from flows.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flows.config import TrainConfig
from flows.errors import DataError
from flows.train import fit_dataset
from tests.conftest import load_memory, write_parquet

# Runs the pipeline's fit step with checkpoints and no Prefect, to be killed mid-run.
CHILD = """
import sys
from flows.backends import open_training_data, plan_run
from flows.config import TrainConfig
from flows.train import fit_dataset
config = TrainConfig.model_validate_json(sys.argv[1])
data = open_training_data(config, *plan_run(config))
fit_dataset(data, config)
"""


@pytest.fixture
def problem(tmp_path):
    rng = np.random.default_rng(0)
    m = 10_000
    x = rng.normal(size=(4, m))
    label = rng.random(m) < 1 / (1 + np.exp(-(x[0] - x[1] + 0.5 * x[2])))
    path = write_parquet(
        tmp_path / "d.parquet", {**{f"x{j}": x[j] for j in range(4)}, "label": label}
    )
    return path


def config_for(path, out, **changes):
    base = dict(
        data=str(path), output=str(out), iterations=1000, learning_rate=0.3, l2=0.1, tol=0.0,
        threads=2, checkpoint_every=50,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(problem, tmp_path, optimizer):
    out = tmp_path / "out"
    config = config_for(problem, out, optimizer=optimizer)
    dataset = load_memory(config)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, config.model_dump_json()],
        cwd=os.getcwd(),
        stderr=subprocess.PIPE,
    )
    checkpoint = out / CHECKPOINT_NAME
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    saved, _, _ = load_checkpoint(checkpoint)  # whole, never half-written
    assert 0 < saved.iteration < 1000
    # Only the checkpoint under a final name; a kill mid-save may leave a hidden temporary.
    assert [p.name for p in out.iterdir() if not p.name.endswith(".tmp")] == [CHECKPOINT_NAME]

    resumed = fit_dataset(dataset, config.model_copy(update={"resume": True}))
    whole = fit_dataset(dataset, config.model_copy(update={"output": str(tmp_path / "other")}))
    np.testing.assert_array_equal(resumed.w, whole.w)
    assert resumed.b == whole.b
    np.testing.assert_array_equal(resumed.cost_history, whole.cost_history)


def test_a_checkpoint_for_another_config_is_refused(problem, tmp_path):
    out = tmp_path / "out"
    config = config_for(problem, out, iterations=100)
    dataset = load_memory(config)
    fit_dataset(dataset, config)
    assert (out / CHECKPOINT_NAME).exists()
    changed = config.model_copy(update={"l2": 2.0, "resume": True})
    with pytest.raises(DataError, match=r"checkpoint was made for a different l2; delete it"):
        fit_dataset(dataset, changed)
    # Without --resume a new run starts over and replaces it.
    fresh = fit_dataset(dataset, changed.model_copy(update={"resume": False}))
    assert fresh.n_iterations == 100


def test_other_data_is_refused(problem, tmp_path):
    out = tmp_path / "out"
    config = config_for(problem, out, iterations=100)
    fit_dataset(load_memory(config), config)
    other = write_parquet(
        tmp_path / "e.parquet",
        {**{f"x{j}": [0.0, 1.0, 2.0, 3.0] for j in range(4)}, "label": [0, 1, 0, 1]},
    )
    other_config = config.model_copy(update={"data": str(other), "resume": True})
    with pytest.raises(DataError, match="different input_fingerprint"):
        fit_dataset(load_memory(other_config), other_config)


def test_a_prefect_retry_of_the_fit_task_continues_from_its_checkpoint(
    prefect_api, problem, tmp_path, monkeypatch
):
    calls = []
    real_fit = flows.train.fit_loss

    def flaky_fit(*args, **kwargs):
        calls.append(kwargs["resume"])
        if len(calls) == 1:
            kwargs["iterations"] = 120  # get two checkpoints in, then fail as a lost node would

            real_fit(*args, **kwargs)
            raise ConnectionError("worker lost")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(flows.train, "fit_loss", flaky_fit)
    monkeypatch.setattr(
        flows.train, "fit_model", flows.train.fit_model.with_options(retry_delay_seconds=0)
    )
    out = tmp_path / "out"
    summary = flows.train.train(config_for(problem, out, iterations=300))
    assert calls[0] is None
    assert calls[1] is not None and calls[1].iteration == 100
    assert summary.n_iterations == 300
    assert not (out / CHECKPOINT_NAME).exists()  # consumed once the outputs are written

"""The Prefect side: artifact content, prefect.yaml deployments, and what a real API stores."""

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from flows import artifacts
from flows.artifacts import ProgressThrottle, cost_curve_png, output_link_key, report_markdown
from flows.config import ScoreConfig, TrainConfig
from flows.errors import DataError
from flows.serve import train_deployment
from flows.store import latest, read_latest

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- plain functions, no Prefect --------------------------------------------------------------


def test_throttle_reports_each_milestone_once_when_time_allows():
    clock = FakeClock()
    throttle = ProgressThrottle(1000, steps=20, min_seconds=0.5, clock=clock)
    due = []
    for iteration in range(1, 1001):
        clock.now += 1.0  # a slow loop: every milestone is worth reporting
        if throttle.due(iteration):
            due.append(iteration)
    assert due == [50 * k for k in range(1, 21)]


def test_throttle_stays_quiet_in_a_fast_loop():
    clock = FakeClock()
    throttle = ProgressThrottle(100_000, steps=50, min_seconds=0.5, clock=clock)
    due = 0
    for iteration in range(1, 100_001):
        clock.now += 1e-6  # 0.1 s for the whole run
        due += throttle.due(iteration)
    assert due == 0


def test_throttle_with_fewer_iterations_than_steps():
    throttle = ProgressThrottle(3, steps=20, min_seconds=0.0, clock=FakeClock())
    assert [throttle.due(i) for i in (1, 2, 3)] == [True, True, True]
    assert throttle.percent(3) == pytest.approx(100.0, abs=1e-12)


def test_cost_curve_png_is_deterministic_and_draws_the_curve():
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    history = np.log(2) * np.exp(-np.arange(200) / 40.0) + 0.3
    png = cost_curve_png(history)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert cost_curve_png(history) == png
    image = imread(io.BytesIO(png))[..., :3]  # (height, width, 3)
    line = np.all(np.abs(image - np.array(to_rgb(artifacts.COST_CURVE_COLOR))) <= 12 / 255, axis=-1)
    assert line.sum() > 300  # pixels of the 2-px line; a blank plot has none


def test_output_link_keys_are_stable_lowercase_dash():
    assert output_link_key(Path("/x/params.parquet")) == "train-output-params-parquet"
    assert output_link_key(Path("out/cost_history.png")) == "train-output-cost-history-png"
    for key in (
        artifacts.PROGRESS_KEY,
        artifacts.PARAMETERS_KEY,
        artifacts.REPORT_KEY,
        artifacts.COST_CURVE_KEY,
    ):
        assert KEY.match(key), key


def test_report_names_data_config_training_metrics_and_outputs(tmp_path):
    config = TrainConfig(data="in/*.parquet", output=str(tmp_path), iterations=77, l2=0.25)
    text = report_markdown(
        config=config,
        files=[Path("in/a.parquet"), Path("in/b.parquet")],
        n_examples=1234,
        features=["age", "income"],
        n_iterations=77,
        stop_reason="iterations",
        final_cost=0.4321,
        metrics=[{"split": "train", "metric": "accuracy", "value": 0.875}],
        seconds=1.5,
        outputs=[tmp_path / "params.parquet"],
    )
    for expected in [
        "| files | 2 |", "| training rows | 1234 |", "2: age, income", "`in/b.parquet`",
        "| iterations run | 77 |", "| stop reason | iterations |", "| final cost | 0.4321 |",
        "| train | accuracy | 0.875 |", "| wall time (s) | 1.5 |", "| l2 | 0.25 |",
        f"`{tmp_path / 'params.parquet'}`",
    ]:  # fmt: skip
        assert expected in text, expected


# --- prefect.yaml -------------------------------------------------------------------------------


def test_every_entrypoint_loads_and_validates_its_parameters(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    document = yaml.safe_load(PREFECT_YAML.read_text())
    assert document["deployments"]
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the repository root
    for deployment in document["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        validated = flow.validate_parameters(deployment.get("parameters") or {})
        assert set(validated) <= set(flow.parameters.properties)


def test_deployments_are_scheduled_limited_and_on_the_process_pool():
    for deployment in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]:
        assert deployment["concurrency_limit"] == 1
        assert deployment["work_pool"]["name"] == "lrflow-process"
        assert all(s["cron"] and s["timezone"] for s in deployment["schedules"])


def test_serve_reads_the_train_deployment_and_rejects_bad_ones(tmp_path):
    spec = train_deployment(PREFECT_YAML, "nightly")
    assert spec.concurrency_limit == 1
    assert spec.schedules[0].timezone == "Europe/Berlin"
    TrainConfig.model_validate(spec.parameters["config"])
    with pytest.raises(DataError, match="no train deployment named 'nope'"):
        train_deployment(PREFECT_YAML, "nope")
    scoring_only = tmp_path / "scoring.yaml"
    scoring_only.write_text(
        "deployments:\n  - name: s\n    entrypoint: flows/score.py:score\n"
        "    parameters: {config: {model: m, data: d, output: o}}\n"
    )
    with pytest.raises(DataError, match=r"no train deployment named 's' .*'s' runs flows/score"):
        train_deployment(scoring_only, "s")
    bad = tmp_path / "prefect.yaml"
    bad.write_text(
        "deployments:\n  - name: x\n    entrypoint: flows/train.py:train\n"
        "    parameters: {config: {data: d, output: o, iterations: 0}}\n"
    )
    with pytest.raises(DataError, match=r"invalid config: iterations: .*greater than or equal"):
        train_deployment(bad, "x")


# --- against a real Prefect API ------------------------------------------------------------------


def _artifacts_of(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def test_a_train_run_publishes_its_artifacts(prefect_api, sample_file, tmp_path):
    from types import SimpleNamespace

    from prefect.artifacts import Artifact

    from flows.dataset import held_out
    from flows.errors import DivergedError
    from flows.train import fit_model, load_data, train

    # The fit task retries (from its checkpoint) after a lost worker, never after divergence.
    assert load_data.retries > 0 and fit_model.retries > 0
    assert not fit_model.retry_condition_fn(None, None, SimpleNamespace(data=DivergedError("x")))
    assert fit_model.retry_condition_fn(None, None, SimpleNamespace(data=ConnectionError("x")))
    out = tmp_path / "out"
    config = TrainConfig(data=str(sample_file), output=str(out), iterations=300, exclude=["id"])
    state = train(config, return_state=True)
    summary = state.result()
    store, out = out, latest(out)  # the run's directory in the store
    assert summary.run == str(out) and summary.promoted
    found = _artifacts_of(state.state_details.flow_run_id)
    outputs = [
        "params.parquet", "cost_history.parquet", "metrics.parquet", "cost_history.png", "_SUCCESS",
    ]  # fmt: skip
    assert set(found) == {
        "train-progress", "train-parameters", "train-report", "train-cost-curve", "train-metrics",
        "train-history", *(output_link_key(Path(name)) for name in outputs),
    }  # fmt: skip

    assert found["train-progress"].type == "progress"
    assert float(found["train-progress"].data) == pytest.approx(100.0, abs=1e-9)

    table = found["train-parameters"]
    assert table.type == "table"
    assert table.data == Artifact.get("train-parameters").data  # the key's latest version
    expected = pq.read_table(out / "params.parquet").to_pylist()
    rows = yaml.safe_load(table.data)  # a JSON list of {"term", "estimate"}
    assert [r["term"] for r in rows] == [r["term"] for r in expected]
    assert [r["estimate"] for r in rows] == pytest.approx(
        [r["estimate"] for r in expected], rel=1e-12
    )

    report = found["train-report"].data
    assert found["train-report"].type == "markdown"
    assert f"| iterations run | {summary.n_iterations} |" in report
    assert f"| stop reason | {summary.stop_reason} |" in report
    n_held_out = int(np.count_nonzero(held_out("split", 0, 40, 0.2, seed=0)))
    assert summary.n_examples == 40 - n_held_out and summary.n_validation_examples == n_held_out
    assert (
        f"| training rows | {40 - n_held_out} |" in report
        and f"| validation rows | {n_held_out} |" in report
        and "2: x1, x2" in report
    )
    assert "| train | accuracy |" in report and str(out / "metrics.parquet") in report
    assert "## Promotion" in report and "| reason | promoted: no current model |" in report

    history = found["train-history"].data
    assert found["train-history"].type == "markdown"
    assert f"| {out.name} | {read_latest(store).run_id} |" in history
    assert "(data:image/png;base64," in history

    curve = found["train-cost-curve"].data
    encoded = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", curve)
    assert encoded is not None
    assert base64.b64decode(encoded.group(1)) == (out / "cost_history.png").read_bytes()

    for name in outputs:
        link = found[output_link_key(Path(name))]
        assert (out / name).resolve().as_uri() in link.data
    assert sorted(summary.files) == sorted(str(out / name) for name in outputs)


def test_a_bad_parameter_fails_before_any_work_with_prefects_message(prefect_api, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from flows.train import train

    with pytest.raises(ParameterTypeError, match="iterations"):
        train({"data": "x.parquet", "output": str(tmp_path / "o"), "iterations": 0})
    assert not (tmp_path / "o").exists()


def test_prefect_deploy_all_creates_the_scheduled_deployment(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="lrflow-process", type="process"))
        except Exception as error:  # created by an earlier run of this session's server
            assert "already exists" in str(error).lower()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(
        [Path(sys.executable).parent / "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/nightly")
        assert deployment.work_pool_name == "lrflow-process"
        assert deployment.global_concurrency_limit.limit == 1
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * *"
        assert schedule.schedule.timezone == "Europe/Berlin"
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        TrainConfig.model_validate(deployment.parameters["config"])
        scoring = client.read_deployment_by_name("score/nightly")
        assert scoring.global_concurrency_limit.limit == 1
        assert scoring.schedules == []  # it follows training instead: one automation
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{scoring.id}")
        trigger = automation.trigger
        assert trigger.expect == {"prefect.flow-run.Completed"}
        related = [dict(spec.items()) for spec in trigger.match_related]
        assert {"prefect.resource.role": ["flow"], "prefect.resource.name": ["train"]} in related
        assert [action.deployment_id for action in automation.actions] == [scoring.id]
        ScoreConfig.model_validate(scoring.parameters["config"])
        # The server checks a run's parameters against the flow's schema (what the UI
        # and `prefect deployment run` go through) before any run is created.
        with pytest.raises(Exception, match="iterations"):
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": {"data": "d", "output": "o", "iterations": 0}}
            )


def test_the_cli_progress_bar_appears_only_on_a_terminal_after_the_delay():
    from rich.console import Console

    from flows.cli import LongRunProgressBar

    for terminal, delay, shows in [(True, 0.0, True), (False, 0.0, False), (True, 3600.0, False)]:
        stream = io.StringIO()
        bar = LongRunProgressBar(delay, Console(file=stream, force_terminal=terminal, width=100))
        bar(1, 10, 0.69)
        bar(10, 10, float("nan"))
        bar.close()
        assert ("training" in stream.getvalue()) is shows, (terminal, delay)


def test_the_fit_task_reports_progress_to_a_local_listener(prefect_api, sample_file, tmp_path):
    from flows.train import train

    calls = []
    token = artifacts.progress_listener.set(lambda i, total, cost: calls.append((i, total, cost)))
    try:
        summary = train(
            TrainConfig(data=str(sample_file), output=str(tmp_path), iterations=50, exclude=["id"])
        )
    finally:
        artifacts.progress_listener.reset(token)
    assert calls[0][:2] == (0, 50)  # the initial cost, reported as it is computed
    assert calls[-1][:2] == (50, 50) and np.isnan(calls[-1][2])  # the closing call
    assert len(calls) <= summary.n_iterations + 2

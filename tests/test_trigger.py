"""Scoring follows training: a real Prefect server, a process worker, prefect.yaml's trigger."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_score_run_follows_one_train_run_on_a_real_server():
    """scripts/trigger_check.py (`make trigger-check`): deploy, run train/nightly once, and
    a score/nightly run must follow, complete and use latest.json's run; no second one."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trigger_check.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "trigger-check: OK" in done.stdout

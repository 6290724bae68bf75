"""Shared fixtures: a private Prefect home, one Prefect test server per session, tiny Parquet."""

import contextlib
import os
import tempfile

# Before Prefect is imported anywhere: its database and settings go to a temporary
# home, and the test server sends nothing anywhere.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lrflow-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from pathlib import Path

import numpy as np
import polars as pl
import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (SQLite, in-process) shared by every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns).write_parquet(path)
    return path


@pytest.fixture
def small_frame() -> dict:
    """40 rows: an id, two numeric features on different scales, a boolean label."""
    rng = np.random.default_rng(0)
    x1 = rng.normal(10, 3, size=40)
    x2 = rng.integers(0, 100, size=40)
    label = (0.5 * (x1 - 10) + 0.03 * (x2 - 50) + rng.normal(size=40)) > 0
    return {"id": [f"r{i}" for i in range(40)], "x1": x1, "x2": x2, "label": label}


@pytest.fixture
def sample_file(tmp_path, small_frame) -> Path:
    return write_parquet(tmp_path / "in" / "data.parquet", small_frame)


def real_binary_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A real scikit-learn dataset made binary: ``(data (m, n), string labels (m,))``.

    ``breast_cancer``: 'benign' / 'malignant'; ``wine``: class 0 against the rest.
    """
    from sklearn import datasets

    if name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        return bunch.data, np.asarray(bunch.target_names)[bunch.target]
    bunch = datasets.load_wine()
    return bunch.data, np.where(bunch.target == 0, "class_0", "other")


# An output directory for configs of tests that only load data: never written, and
# outside every test's data directory (tmp_path), so the output-location check passes.
UNUSED_OUTPUT = str(Path(tempfile.gettempdir()) / "lrflow-tests-unused-output")


def memory_config(data, **kwargs):
    """A TrainConfig for the in-memory backend; no validation split unless asked for."""
    from flows.config import TrainConfig

    kwargs.setdefault("output", UNUSED_OUTPUT)
    kwargs.setdefault("backend", "memory")
    if "validation_data" not in kwargs:
        kwargs.setdefault("validation_fraction", 0.0)
    return TrainConfig(data=str(data), **kwargs)


def load_memory(config):
    """The run's training data on the in-memory backend (``.train``/``.held_out`` Rows)."""
    from flows.backends import open_training_data, plan_run

    return open_training_data(config, *plan_run(config))


def load(data, **kwargs):
    """:func:`load_memory` of :func:`memory_config`: the rows of ``data`` as X, Y, weights."""
    return load_memory(memory_config(data, **kwargs))


@contextlib.contextmanager
def local_dask_client():
    """A 2-worker LocalCluster in this process (threads): seconds to start, not tens."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def dask_client():
    """:func:`local_dask_client`, one per test module that asks for it."""
    with local_dask_client() as client:
        yield client

"""Data and models in object storage (``s3://``), against a real S3 server: moto's, run as a
separate process on a free port (Polars and pyarrow can hang against its in-process one)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from flows import storage
from flows.dataset import fingerprint, resolve_files
from flows.errors import DataError
from flows.storage import ObjectPath, location
from tests import test_store
from tests.conftest import write_parquet
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """A moto server process: its endpoint, and an admin file system that may make buckets."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def filesystem(self, key: str = "testing", secret: str = "testing") -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=key,
            secret_key=secret,
            region=REGION,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
        )

    def environment(self, key: str = "testing", secret: str = "testing") -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def s3_server():
    if not MOTO_SERVER.exists():
        pytest.skip("moto[server] is not installed (pip install 'lrflow[dev]')")
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A new bucket on the server, and the AWS environment pointing at it."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    name = f"lrflow-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().create_dir(name)
    return name


def put_parquet(fs: pafs.FileSystem, key: str, columns: dict, local: Path | None = None) -> None:
    """The Parquet file of ``columns`` as the object ``key`` (and, byte for byte, at ``local``)."""
    if local is None:
        pq.write_table(pl.DataFrame(columns).to_arrow(), key, filesystem=fs)
        return
    write_parquet(local, columns)
    with fs.open_output_stream(key) as handle:
        handle.write(local.read_bytes())


def objects(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Every object below ``prefix`` and its size."""
    found = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {f.path: f.size for f in found if f.type == pafs.FileType.File}


def _labelled(m: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=m), rng.normal(size=m)
    city = rng.choice(["berlin", "oslo", "rome"], size=m)
    label = (1.5 * x1 - 1.0 * x2 + (city == "oslo") + 0.5 * rng.normal(size=m)) > 0
    return {"id": [f"r{seed}-{i}" for i in range(m)], "x1": x1, "x2": x2, "city": city, "y": label}


# --- the seam, without a server ---------------------------------------------------------------


def test_an_s3_url_becomes_an_object_path_that_joins_and_prints_as_a_url():
    path = location("s3://bkt/data/part-0.parquet")
    assert isinstance(path, ObjectPath)
    assert (path.bucket, path.key, path.key_path) == ("bkt", "data/part-0.parquet", str(path)[5:])
    assert str(path.parent / "x.parquet") == "s3://bkt/data/x.parquet"
    assert path.name == "part-0.parquet"
    assert location("data/a.parquet") == Path("data/a.parquet")
    assert not storage.is_remote(Path("s3/x")) and storage.is_remote("s3://b/x")
    with pytest.raises(DataError, match="needs a bucket"):
        location("s3://")


def test_the_endpoint_comes_from_the_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    assert storage.endpoint() == "http://minio.internal:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.internal:9000")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    assert storage.endpoint() == "http://minio.internal:9000"
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    assert storage.endpoint() == "https://minio.internal:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage.endpoint() == "AWS S3 (eu-west-1)"


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("b/d/*.parquet", "b/d/a.parquet", True),
        ("b/d/*.parquet", "b/d/x/a.parquet", False),
        ("b/**/*.parquet", "b/d/x/a.parquet", True),
        ("b/**/*.parquet", "b/a.parquet", True),
        ("b/d/part-[0-1].parquet", "b/d/part-1.parquet", True),
        ("b/d/part-[!0-1].parquet", "b/d/part-1.parquet", False),
        ("b/d/?.parquet", "b/d/ab.parquet", False),
    ],
)
def test_globs_over_keys_match_as_local_globs_do(pattern, key, matches):
    import re

    assert bool(re.fullmatch(storage._translate(pattern), key)) == matches


# --- reading inputs ---------------------------------------------------------------------------


def test_files_prefixes_and_globs_resolve_and_fingerprint_as_the_same_local_files(
    s3_server, bucket, tmp_path
):
    fs = s3_server.filesystem()
    parts = {f"part-{i}.parquet": _labelled(20 + i, i) for i in range(3)}
    for name, columns in parts.items():
        put_parquet(fs, f"{bucket}/in/{name}", columns, tmp_path / "in" / name)
    fs.open_output_stream(f"{bucket}/in/_SUCCESS").close()  # skipped, as locally
    put_parquet(fs, f"{bucket}/in/_temporary/x.parquet", parts["part-0.parquet"])
    put_parquet(fs, f"{bucket}/in/.hidden.parquet", parts["part-0.parquet"])
    names = [f"s3://{bucket}/in/{name}" for name in sorted(parts)]
    assert [str(p) for p in resolve_files(f"s3://{bucket}/in")] == names
    assert [str(p) for p in resolve_files(f"s3://{bucket}/in/")] == names
    assert [str(p) for p in resolve_files(f"s3://{bucket}/in/part-*.parquet")] == names
    assert [str(p) for p in resolve_files(f"s3://{bucket}/**/part-[12].parquet")] == names[1:]
    assert [str(p) for p in resolve_files(names[0])] == names[:1]
    # The fingerprint hashes the bytes: the same files hash alike wherever they are.
    local = resolve_files(tmp_path / "in")
    assert fingerprint(resolve_files(f"s3://{bucket}/in")) == fingerprint(local)


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("s3://{bucket}/nothing/here.parquet", "no such object or prefix"),
        ("s3://{bucket}/nothing/", "no such object or prefix"),
        ("s3://{bucket}/in/*.csv", "no object matches this pattern"),
        ("s3://{bucket}-missing/in/a.parquet", "bucket '{bucket}-missing' does not exist"),
        ("s3://{bucket}-missing/in/*.parquet", "bucket '{bucket}-missing' does not exist"),
        ("s3://{bucket}-missing", "bucket '{bucket}-missing' does not exist"),
        ("s3://{bucket}/bad.parquet", "not a readable Parquet file"),
    ],
)
def test_bad_object_inputs_name_the_path_in_one_line(s3_server, bucket, where, problem):
    from flows.dataset import plan_inputs

    fs = s3_server.filesystem()
    put_parquet(fs, f"{bucket}/in/a.parquet", _labelled(10, 0))
    with fs.open_output_stream(f"{bucket}/bad.parquet") as handle:
        handle.write(b"not parquet at all")
    where = where.format(bucket=bucket)
    with pytest.raises(DataError) as caught:
        plan_inputs(where, label="y")
    message = str(caught.value)
    assert message.startswith(where.rstrip("/").split("*")[0].rstrip("/"))
    assert problem.format(bucket=bucket) in message
    assert "\n" not in message


def test_validation_data_and_the_output_place_in_object_storage(s3_server, bucket):
    from flows.dataset import check_output_location, plan_held_out, plan_inputs

    fs = s3_server.filesystem()
    put_parquet(fs, f"{bucket}/in/a.parquet", _labelled(30, 0))
    put_parquet(fs, f"{bucket}/val/v.parquet", _labelled(10, 5))
    put_parquet(fs, f"{bucket}/short/v.parquet", {"x1": [1.0, 2.0], "y": [True, False]})
    training = plan_inputs(f"s3://{bucket}/in/", label="y", exclude=["id"])
    held_out = plan_held_out(f"s3://{bucket}/val/v.parquet", training)
    assert [str(p) for p in held_out.files] == [f"s3://{bucket}/val/v.parquet"]
    with pytest.raises(DataError, match="column 'x2': column of the training data not found"):
        plan_held_out(f"s3://{bucket}/short/", training)
    # The store may not lie where the data is read from: its files would be read back.
    for data, output in [
        (f"s3://{bucket}/in", f"s3://{bucket}/in/store"),
        (f"s3://{bucket}/in/", f"s3://{bucket}/in"),
        (f"s3://{bucket}/**/*.parquet", f"s3://{bucket}/models/churn"),
    ]:
        with pytest.raises(DataError, match="the next run would read its results"):
            check_output_location(data, output)
    check_output_location(f"s3://{bucket}/in", f"s3://{bucket}/models/churn")
    check_output_location(f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/in-models")


# --- end to end: train into a store in S3, score from it ---------------------------------------


def _train(data, output, backend, *extra):
    argv = ["train", "--data", data, "--output", output, "--label", "y", "--exclude", "id"]
    argv += ["--backend", backend, "--iterations", "200", "--optimizer", "newton", *extra]
    if backend == "dask":
        argv += ["--dask-workers", "2"]
    return run_cli(*argv)


def _params(fs, key) -> pl.DataFrame:
    return pl.from_arrow(pq.read_table(key, filesystem=fs))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "stream", "dask"])
def test_train_from_s3_into_a_store_on_s3_then_score_equals_the_local_run(
    prefect_api, s3_server, bucket, tmp_path, backend, capsys
):
    fs = s3_server.filesystem()
    for i in range(3):
        columns = _labelled(150, i)
        name = f"part-{i}.parquet"
        put_parquet(fs, f"{bucket}/in/{name}", columns, tmp_path / "in" / name)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert _train(f"s3://{bucket}/in/", f"s3://{bucket}/store", backend, *cache) == 0
    assert _train(tmp_path / "in", tmp_path / "store", "memory") == 0
    capsys.readouterr()

    from flows.store import latest, read_history

    if backend == "stream":  # the cache of object-store input is on local disk
        assert any((tmp_path / "cache").iterdir())
    run = latest(f"s3://{bucket}/store")  # checked against its manifest
    assert isinstance(run, ObjectPath) and str(run).startswith(f"s3://{bucket}/store/runs/")
    local_run = latest(tmp_path / "store")
    remote, local = (
        _params(fs, f"{run.key_path}/params.parquet"),
        pl.read_parquet(local_run / "params.parquet"),
    )
    assert remote["term"].to_list() == local["term"].to_list()
    # Every backend gives the in-memory parameters (sums split exactly), to 1e-9.
    np.testing.assert_allclose(remote["estimate"], local["estimate"], rtol=1e-9, atol=1e-12)
    latest_json = json.loads(fs.open_input_stream(f"{bucket}/store/latest.json").read())
    assert latest_json["run"] == f"runs/{run.name}"  # relative to the store
    history = read_history(f"s3://{bucket}/store")
    assert history.column("run").to_pylist() == [run.name]
    # The same bytes in S3 and on disk: the same data fingerprint.
    assert history.column("data_fingerprint").to_pylist() == (
        read_history(tmp_path / "store").column("data_fingerprint").to_pylist()
    )

    target = f"s3://{bucket}/scores/p.parquet"
    assert run_cli("score", "--model", f"s3://{bucket}/store", "--data", f"s3://{bucket}/in/",
                   "--output", target) == 0  # fmt: skip
    local_target = tmp_path / "p.parquet"
    assert run_cli("score", "--model", tmp_path / "store", "--data", tmp_path / "in",
                   "--output", local_target) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"wrote {target} (model {run})" in out
    scored = pl.from_arrow(pq.read_table(f"{bucket}/scores/p.parquet", filesystem=fs))
    expected = pl.read_parquet(local_target)
    assert scored["id"].to_list() == expected["id"].to_list()
    np.testing.assert_allclose(scored["probability"], expected["probability"], rtol=1e-9)
    # Labelled data: the metrics object too, beside the predictions.
    assert f"{bucket}/scores/p.metrics.parquet" in objects(fs, f"{bucket}/scores")
    meta = json.loads(
        pq.read_schema(f"{bucket}/scores/p.parquet", filesystem=fs).metadata[b"lrflow"]
    )
    assert meta["model_store"] == f"s3://{bucket}/store" and meta["model_run"] == run.name
    # Scoring one run directly, by its prefix.
    assert run_cli("score", "--model", str(run), "--data", f"s3://{bucket}/in/part-0.parquet",
                   "--output", tmp_path / "one.parquet") == 0  # fmt: skip


# --- the store's commit ---------------------------------------------------------------------


def test_a_store_on_s3_keeps_runs_history_and_latest_as_a_local_one(s3_server, bucket):
    from flows.object_store import complete_runs
    from flows.store import commit_run, latest, read_history, read_latest
    from tests.test_store import _candidate, _commit

    store = location(f"s3://{bucket}/store")
    good, worse = _candidate([1.5, -0.5]), _candidate([-1.0, 1.0])
    first = _commit(store, good, minutes=0)
    assert first.comparison.promoted and first.run_dir == store / "runs" / first.run_dir.name
    assert _commit(store, worse, minutes=1).comparison.promoted is False  # if-better
    third = _commit(store, good, minutes=2, promote="always")
    fourth = _commit(store, worse, minutes=3, keep_runs=2)
    # keep_runs 2: the newest two, and the promoted one (third) is among them.
    assert complete_runs(store) == [third.run_dir.name, fourth.run_dir.name]
    assert latest(store) == third.run_dir
    assert read_latest(store).run == f"runs/{third.run_dir.name}"
    history = read_history(store).to_pylist()
    assert [r["promoted"] for r in history] == [True, False, True, False]  # every row stays
    # A retried commit (same run id) writes neither a second set nor a second row.
    before = objects(s3_server.filesystem(), bucket)

    again = commit_run(
        store, {}, run_id=history[-1]["run_id"], started_at=history[-1]["started_at"],
        data_fingerprint="f", n_examples=1, held_out=None,
    )  # fmt: skip
    assert again.run_dir == fourth.run_dir and read_history(store).num_rows == 4
    assert objects(s3_server.filesystem(), bucket) == before


# --- kill -9 ----------------------------------------------------------------------------------

# The local store's kill -9 writer: it commits into a directory or an s3:// store alike.
WRITER = test_store.WRITER


@pytest.mark.slow
@pytest.mark.parametrize("n_writers", [1, 2])
def test_kill_9_at_random_moments_leaves_latest_complete_and_the_history_readable(
    s3_server, bucket, n_writers
):
    """Writers into a store in S3, killed with SIGKILL at random moments, round after
    round: latest.json always names a complete run whose files match its manifest and
    runs.parquet always reads. One writer at a time: no row is ever lost, and after the
    next writer's recovery latest.json names the newest run that runs.parquet records as
    promoted. Two at once (no lock on S3): the same guarantees but for the rows, which
    the later of two overlapping runs.parquet PUTs may drop (see flows/object_store.py)."""
    from flows.object_store import complete_runs, verify_output_set
    from flows.store import latest, read_history, recover_store

    store = location(f"s3://{bucket}/store")
    assert isinstance(store, ObjectPath)
    rng = random.Random(16)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen_rows = 0
    for round_ in range(8):
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(store), str(10 * round_ + j)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )
            for j in range(n_writers)
        ]
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        for writer in writers:
            time.sleep(rng.uniform(0.5, 3.0))  # a commit is ~20 requests: ~0.1-0.3 s
            writer.send_signal(signal.SIGKILL)
        for writer in writers:
            status = writer.wait(timeout=30)
            assert writer.stderr is not None
            assert status == -signal.SIGKILL, writer.stderr.read().decode()[-3000:]
        history = read_history(store)  # whole: a torn object would not parse
        if n_writers == 1:
            assert history.num_rows >= seen_rows  # no row is lost
        seen_rows = max(seen_rows, history.num_rows)
        if storage.exists(store / "latest.json"):
            latest(store)  # names a complete run, as its manifest says
        recover_store(store)
        promoted = [r for r in read_history(store).to_pylist() if r["promoted"]]
        if promoted and n_writers == 1:
            assert latest(store).name == promoted[-1]["run"]
        if storage.exists(store / "latest.json"):
            latest(store)
        for name in complete_runs(store):
            verify_output_set(store / "runs" / name)
    assert seen_rows > 6  # the writers got work done between the kills


# --- bad input: one line, exit 2, nothing written -----------------------------------------------


def _cli_fails_in_one_line(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("lrflow: error: ")
    return captured.err


def test_cli_missing_key_or_bucket_fails_before_anything_is_written(s3_server, bucket, capsys):
    fs = s3_server.filesystem()
    put_parquet(fs, f"{bucket}/in/a.parquet", _labelled(30, 0))
    store = f"s3://{bucket}/store"
    cases = [
        (f"s3://{bucket}/in/missing.parquet", store, f"s3://{bucket}/in/missing.parquet: no such"),
        (f"s3://{bucket}x/in/", store, f"s3://{bucket}x/in: bucket '{bucket}x' does not exist"),
        (f"s3://{bucket}/in/", f"s3://{bucket}x/store", f"bucket '{bucket}x' does not exist"),
    ]
    for data, output, message in cases:
        err = _cli_fails_in_one_line(
            capsys, "train", "--data", data, "--output", output, "--label", "y", "--exclude", "id"
        )
        assert message in err
    err = _cli_fails_in_one_line(
        capsys, "score", "--model", store, "--data", f"s3://{bucket}/in/", "--output", "p.parquet"
    )
    assert f"{store}: no params.parquet here" in err
    assert list(objects(fs, bucket)) == [f"{bucket}/in/a.parquet"]


@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that checks credentials: a user who may do anything in S3, one
    who may do nothing; the bucket ``data`` holds one Parquet file."""
    import boto3

    if not MOTO_SERVER.exists():
        pytest.skip("moto[server] is not installed (pip install 'lrflow[dev]')")
    server = S3Server()
    iam = boto3.client(
        "iam", endpoint_url=server.endpoint, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    keys = {}
    for user, actions in (("admin", ["s3:*"]), ("nobody", [])):
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        if actions:
            policy = {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": actions, "Resource": "*"}]}  # fmt: skip
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    fs = server.filesystem()
    fs.create_dir("data")
    put_parquet(fs, "data/in/a.parquet", _labelled(30, 0))
    request = urllib.request.Request(  # from now on every request must authenticate
        f"{server.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
        headers={"Content-Type": "text/plain"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=10).read()
    server.keys = keys
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("user", "problem"),
    [
        ("unknown", "the access key (AWS_ACCESS_KEY_ID) is not known to http://127.0.0.1:"),
        ("bad-secret", "the secret key (AWS_SECRET_ACCESS_KEY) does not match"),
        ("nobody", "access denied by http://127.0.0.1:"),
    ],
)
def test_cli_wrong_credentials_or_access_denied_is_one_line_naming_the_path(
    auth_server, monkeypatch, tmp_path, capsys, user, problem
):
    key, secret = {
        "unknown": ("AKIAUNKNOWN0000000", "x"),
        "bad-secret": (auth_server.keys["admin"][0], "wrong"),
        "nobody": auth_server.keys["nobody"],
    }[user]
    for name, value in auth_server.environment(key, secret).items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "store"
    err = _cli_fails_in_one_line(
        capsys, "train", "--data", "s3://data/in/a.parquet", "--output", store, "--label", "y"
    )
    assert err.startswith(f"lrflow: error: s3://data/in/a.parquet: {problem}")
    assert not store.exists()


def test_the_admins_credentials_read_the_data(auth_server, monkeypatch):
    for name, value in auth_server.environment(*auth_server.keys["admin"]).items():
        monkeypatch.setenv(name, value)
    assert [str(p) for p in resolve_files("s3://data/in/")] == ["s3://data/in/a.parquet"]


def test_a_refused_connection_names_the_endpoint(monkeypatch, tmp_path, capsys):
    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = tmp_path / "store"
    err = _cli_fails_in_one_line(
        capsys, "train", "--data", "s3://data/in/", "--output", store, "--label", "y"
    )
    assert f"cannot reach the object store at http://127.0.0.1:{port}" in err
    assert not store.exists()


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_within_60_seconds(tmp_path):
    """A server that accepts connections and then says nothing: the capped retries and the
    request timeout end the run with one line naming the endpoint, well before 60 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        }  # fmt: skip
        store = tmp_path / "store"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "train", "--data", "s3://data/in/",
             "--output", str(store), "--label", "y"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        seconds = time.monotonic() - started
    assert done.returncode == 2
    assert seconds < 60
    assert done.stderr.count("\n") == 1
    assert f"s3://data/in: cannot reach the object store at {endpoint}" in done.stderr
    assert not store.exists()

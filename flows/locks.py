"""Inter-process locks: one writer per output directory, one Prefect server start at a time."""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a directory or a file, created if missing).

    Waits while another process holds it. The kernel drops the lock when its
    holder exits, even by ``kill -9``, so a crashed run never leaves a stale lock.
    A directory can be locked directly, which keeps lock files out of the
    output directory.
    """
    if not path.exists():
        path.touch()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def start_ephemeral_prefect_server() -> None:
    """Start this process's ephemeral Prefect server, one process at a time per Prefect home.

    Several ``lrflow train`` processes sharing a ``PREFECT_HOME`` each start a
    server on the same SQLite database. Started together they race through the
    database migrations (``duplicate column name``) and, on a small machine, time
    out waiting for each other's CPU. Started one after the other each finds the
    schema ready and starts in seconds; the flows then run concurrently (SQLite
    in WAL mode with a busy timeout). Does nothing when an API URL is configured.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    # Only now: importing the server (FastAPI, SQLAlchemy, ...) takes ~3 s.
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(home / ".lrflow-server-start.lock"):
        SubprocessASGIServer().start()

"""Inter-process locks: one writer per output directory, one server start at a time."""

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

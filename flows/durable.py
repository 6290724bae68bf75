"""Durable writes: a file appears whole under its name, and stays there after a crash.

The one recipe every writer of the project uses (output sets, checkpoints,
predictions, the stream cache, ``latest.json``, ``runs.parquet``):

1. write to a hidden temporary name in the same directory (same file system, so
   the rename in 3 is atomic);
2. flush and ``fsync`` the file (its bytes are on disk before its name is);
3. rename it over the final name;
4. ``fsync`` the directory (the rename itself is on disk).

A crash before 3 leaves the earlier file untouched (and a hidden ``.*.tmp`` that
nothing reads); after 4 the new file survives a power cut. Readers never see a
torn file.
"""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path``, unique per call: concurrent writers never share one."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """Open a binary handle whose bytes replace ``path`` when the block ends normally.

    An exception inside the block leaves ``path`` as it was and removes the
    temporary file. The parent directory is created if missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with temporary.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_bytes(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``, durably (see the module docstring)."""
    with replacing(path) as handle:
        handle.write(data)
    return path


def rename(source: Path, target: Path) -> None:
    """Rename ``source`` (a file, or a directory whose contents are already synced) to
    ``target``, then sync ``target``'s directory so that the rename survives a crash.

    A directory cannot replace a non-empty one: the rename then raises ``OSError``.
    """
    os.rename(source, target)
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` (creations, renames, deletions) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

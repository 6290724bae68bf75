"""flows.durable: whole files or the old ones, the fsyncs in order, and every writer using it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows import durable

ROOT = Path(__file__).resolve().parents[1]


def test_write_bytes_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    durable.write_bytes(path, b"one")
    durable.write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path):
    path = durable.write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError), durable.replacing(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_file_then_rename_then_directory_are_synced_in_that_order(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        kind = "directory" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "file"
        calls.append(f"fsync {kind}")
        real_fsync(descriptor)

    def replace(source, target):
        calls.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable.write_bytes(tmp_path / "a", b"x")
    assert calls == ["fsync file", "rename", "fsync directory"]


def test_rename_of_a_directory_syncs_the_target_directory(tmp_path, monkeypatch):
    (tmp_path / "building").mkdir()
    (tmp_path / "parent").mkdir()
    synced: list[str] = []
    monkeypatch.setattr(durable, "fsync_directory", lambda d: synced.append(Path(d).name))
    durable.rename(tmp_path / "building", tmp_path / "parent" / "done")
    assert (tmp_path / "parent" / "done").is_dir()
    assert synced == ["parent"]


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from flows import durable
    path = Path(sys.argv[1])
    with durable.replacing(path) as handle:
        handle.write(b"new but incomplete")
        handle.flush()
        os.kill(os.getpid(), 9)
    """
)


def test_kill_9_while_writing_leaves_the_old_file(tmp_path):
    path = durable.write_bytes(tmp_path / "a.bin", b"old")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == -9
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize(
    "module", ["flows/outputs.py", "flows/checkpoint.py", "flows/scoring.py", "flows/store.py"]
)
def test_writers_use_the_one_module(module):
    """No writer fsyncs or renames files on its own: flows.durable is the one place."""
    source = (ROOT / module).read_text()
    assert "os.fsync" not in source
    assert "durable." in source

"""Atomic writes: complete or absent, the user's umask, stale temporary files removed."""
import os
import stat

import pytest

from cnnviz_fast._atomic import atomic_write, remove_stale_temps


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_file_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.txt", "w") as f:
            f.write("hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]


def test_stale_temps_of_a_killed_run_are_removed(tmp_path):
    path = tmp_path / "c.pt"
    stale = tmp_path / ".c.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    other = tmp_path / ".d.pt.abc123.tmp"  # another file's temp stays
    other.write_bytes(b"y")
    assert remove_stale_temps(path) == [stale]
    with atomic_write(path) as f:
        f.write(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.pt.abc123.tmp", "c.pt"]

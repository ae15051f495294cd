"""Atomic file writes, the one way every file of the package reaches disk.

A file is written as ``.<name>.<random>.tmp`` in its own folder, flushed and fsynced, renamed
onto its name with ``os.replace`` and the folder fsynced (SQLite's and git's way): a reader sees
the old file or the new one, never half of one. The file gets the mode ``open()`` would give it
(0o666 less the umask), not ``mkstemp``'s 0o600. Temporary files that a killed run left beside
a name are removed by ``remove_stale_temps`` (called on every write and by loaders).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path) -> list:
    """Delete the temporary files a killed write of ``path`` left behind; returns their paths."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f"{_temp_prefix(path)}*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears complete or not at all.

    mode: ``"wb"`` (bytes) or ``"w"`` (text, ``encoding`` default utf-8). Parent folders are
    created. On an exception inside the block the temporary file is removed and ``path`` is
    left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)

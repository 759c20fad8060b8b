"""Atomic file writes: a reader (or a process restarted after a crash) sees the old content or the
new, never a torn file. The one implementation the device (checkpoints, sent updates, bundle chunks)
and the edge (accounts, reports) use.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(d: str | Path) -> None:
    """Make a rename inside ``d`` durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666) -> Path:
    """Write ``data`` to a temporary sibling, fsync it, rename it over ``path`` and fsync the directory.
    ``mode`` is the new file's permission (before the umask), e.g. ``0o600`` for secrets."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | Path, text: str, *, mode: int = 0o666) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode(), mode=mode)

"""Atomic file writes: a reader (or a process restarted after a crash) sees the old content or the
new, never a torn file. The one implementation the device (checkpoints, sent updates, bundle chunks)
and the edge (accounts, reports) use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_replace(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (by any means, e.g. a library's ``save``); when the
    block ends without an error, fsync it, rename it over ``path`` and fsync the directory. On an error
    the temporary file is removed and ``path`` is left as it was."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_replace`. ``mode`` is the new file's permission
    (before the umask), e.g. ``0o600`` for secrets."""
    with atomic_replace(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, mode: int = 0o666) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode(), mode=mode)

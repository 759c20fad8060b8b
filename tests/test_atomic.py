"""Atomic writes: the old content or the new, never a torn file; a failed write leaves no trace."""

from __future__ import annotations

import stat

import pytest

from device_runtime.atomic import atomic_replace, atomic_write_bytes, atomic_write_text


def test_write_replaces_and_keeps_the_mode(tmp_path):
    p = tmp_path / "accounts.json"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new", mode=0o600)
    assert p.read_text() == "new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["accounts.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "state.ckpt"
    atomic_write_bytes(p, b"old")
    with pytest.raises(RuntimeError), atomic_replace(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["state.ckpt"]

"""File hashing for bundles: one implementation, used by the writer, ``deft bundle verify`` and the device."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()  # Python 3.10 (JetPack 6): the same, by hand
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()


def hash_tree(root: str | Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (relative POSIX paths), except ``exclude``."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def file_problems(root: str | Path, expected: dict[str, str]) -> list[str]:
    """Human-readable problems comparing the files under ``root`` with the manifest's hashes.

    Each problem names the file, so a user knows what to re-download or re-export.
    """
    root = Path(root)
    problems: list[str] = []
    for rel, digest in sorted(expected.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing (the manifest lists it)")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 does not match the manifest (file corrupted or modified)")
    present = hash_tree(root)
    for rel in sorted(set(present) - set(expected)):
        problems.append(f"{rel}: not listed in the manifest (unexpected file)")
    return problems

"""Write a device bundle atomically: build everything in a temporary sibling directory, hash every
file into the manifest, then rename. A failed or interrupted export never leaves a half bundle."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from device_runtime.bundle.files import hash_tree
from device_runtime.bundle.manifest import Manifest
from export.errors import ExportError


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"output directory '{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path '{out}' exists and is not a directory")
    if not out.parent.exists():
        raise ExportError(f"parent directory '{out.parent}' does not exist")


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finalize(tmp: Path, out: Path, make_manifest: Callable[[dict[str, str]], Manifest], force: bool) -> Manifest:
    """Hash the staged files, write the manifest, and move the bundle into place."""
    manifest = make_manifest(hash_tree(tmp))
    manifest.dump(tmp)
    os.chmod(tmp, 0o755)
    if out.exists():
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"output directory '{out}' appeared during export; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return manifest

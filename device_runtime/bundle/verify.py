"""Check a bundle directory against its manifest before the device trusts it.

Problems are returned as a list of one-line strings, each naming the file at fault, so the same
check serves ``deft device`` (raise on the first) and reports (list them all).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from device_runtime.bundle.files import file_problems
from device_runtime.bundle.manifest import MANIFEST_NAME, Manifest
from device_runtime.errors import BundleError, first_error


def _first_validation_error(exc: ValidationError) -> str:
    return "{}: {}".format(*first_error(exc, "(root)"))


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse ``manifest.json`` or raise a ``BundleError`` naming what is wrong with it."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist; pass the directory `deft export` wrote")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing; this is not a deftkit bundle (re-export it with `deft export`)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the manifest is corrupt, re-export the bundle") \
            from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(
            f"{path}: does not match the bundle schema ({_first_validation_error(exc)}); re-export the bundle"
        ) from None


def bundle_problems(bundle_dir: str | Path, manifest: Manifest | None = None) -> list[str]:
    """Every mismatch between the directory and its manifest (empty list: the bundle is intact)."""
    root = Path(bundle_dir)
    man = manifest if manifest is not None else read_manifest(root)
    problems = [f"{name}: the manifest does not list this required file"
                for name in man.required_files if name not in man.files]
    problems += file_problems(root, man.files)
    return problems


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """Parse the manifest and check the sha256 of every file; raise ``BundleError`` on the first problem."""
    man = read_manifest(bundle_dir)
    problems = bundle_problems(bundle_dir, man)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise BundleError(
            f"bundle {bundle_dir} failed verification: {problems[0]}{more}; re-download or re-export it"
        )
    return man

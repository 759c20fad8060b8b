"""A bundle as one byte string for transfer over MQTT, and its safe installation on the device.

The edge packs the bundle directory into an uncompressed tar (ONNX weights do not compress) in a
fixed file order, so the same bundle always gives the same bytes and a resumed download can ask for
exactly the chunks it lacks. The device unpacks into a staging directory, verifies every file
against the manifest, checks the bundle hash is the one it asked for, and only then renames the
directory into its cache: a half-received or tampered bundle is never used.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from device_runtime.bundle.load import Bundle, load_bundle
from device_runtime.bundle.manifest import MANIFEST_NAME
from device_runtime.bundle.verify import read_manifest
from device_runtime.errors import BundleError


def pack_bundle(bundle_dir: str | Path) -> bytes:
    """The bundle's files (manifest and every file it lists) as deterministic tar bytes."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    names = sorted({MANIFEST_NAME, *manifest.files})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = root / name
            if not path.is_file():
                raise BundleError(f"{path}: missing; the bundle is incomplete, re-export it")
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


class BundleCache:
    """Verified bundles by hash under ``root/<hash>/`` (what a device already holds)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, bundle_hash: str) -> Path:
        return self.root / bundle_hash

    def hashes(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, bundle_hash: str) -> Bundle | None:
        """The cached bundle, verified again (a file changed on disk is dropped, not trusted)."""
        p = self.path(bundle_hash)
        if not p.is_dir():
            return None
        try:
            bundle = load_bundle(p)
        except BundleError:
            shutil.rmtree(p, ignore_errors=True)
            return None
        return bundle if bundle.hash == bundle_hash else None

    def add_dir(self, bundle_dir: str | Path) -> Bundle:
        """Register a bundle that is already on disk (copied in by hand, or shipped with the device image)."""
        bundle = load_bundle(bundle_dir)
        dest = self.path(bundle.hash)
        if not dest.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
            shutil.copytree(bundle.root, staging, dirs_exist_ok=True)
            staging.rename(dest)
        return load_bundle(dest)

    def install(self, bundle_hash: str, data: bytes) -> Bundle:
        """Unpack received tar bytes, verify, and move into the cache; raise BundleError naming the problem."""
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    for member in tar.getmembers():
                        if not member.isfile() or "/" in member.name or member.name.startswith("."):
                            raise BundleError(f"received bundle has an unexpected entry {member.name!r}; refusing it")
                    # the "data" filter exists from 3.11.4 / 3.10.12 (Debian 12 ships 3.11.2); members were
                    # checked above either way
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(staging, filter="data")
                    else:
                        tar.extractall(staging)  # noqa: S202
            except tarfile.TarError as exc:
                raise BundleError(f"received bundle {bundle_hash[:12]} is not a valid archive ({exc})") from None
            bundle = load_bundle(staging)
            if bundle.hash != bundle_hash:
                raise BundleError(f"received bundle is {bundle.hash[:12]}, not the requested {bundle_hash[:12]}")
            dest = self.path(bundle_hash)
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
            return load_bundle(dest, verify=False)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

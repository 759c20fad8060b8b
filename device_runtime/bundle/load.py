"""A verified bundle on disk: its manifest and the paths of its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_runtime.bundle.manifest import WEIGHTS_FILE, Manifest
from device_runtime.bundle.verify import read_manifest, verify_bundle


def _member(name: str) -> property:
    """A bundle file's path, by its name in the bundle directory."""
    return property(lambda self: self.root / name, doc=f"``{name}`` in the bundle")


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    training_model = _member("training_model.onnx")
    eval_model = _member("eval_model.onnx")
    optimizer_model = _member("optimizer_model.onnx")
    checkpoint = _member("checkpoint")
    weights = _member(WEIGHTS_FILE)
    inference_model = _member("inference.onnx")
    tokenizer = _member("tokenizer.json")

    @property
    def hash(self) -> str:
        """The bundle identity the edge and update payloads refer to."""
        return self.manifest.bundle_hash()

    def path(self, name: str) -> Path:
        return self.root / name


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle; with ``verify`` (the default) every file's sha256 is checked first, because a
    device must never train on a graph or checkpoint that differs from what the edge distributed."""
    root = Path(bundle_dir)
    manifest = verify_bundle(root) if verify else read_manifest(root)
    return Bundle(root=root, manifest=manifest)

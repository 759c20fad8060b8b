"""A verified bundle on disk: its manifest and the paths of its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_runtime.bundle.manifest import WEIGHTS_FILE, Manifest
from device_runtime.bundle.verify import read_manifest, verify_bundle


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    @property
    def training_model(self) -> Path:
        return self.root / "training_model.onnx"

    @property
    def eval_model(self) -> Path:
        return self.root / "eval_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        return self.root / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def inference_model(self) -> Path:
        return self.root / "inference.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

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

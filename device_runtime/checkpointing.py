"""Atomic training checkpoints, so a device killed at any moment (SIGKILL, power loss) resumes.

Layout of a checkpoint directory::

    state-00000050.ckpt   the backend's checkpoint with the optimizer state (tensors + AdamW moments + step)
    start.safetensors     the trainable tensors the run started from (base of delta payloads)
    progress.json         step, loss curve, samples, eval history, the run's fingerprint, and the
                          name of the state file that belongs to it

Each file is written to a temporary name, fsynced and renamed; ``progress.json`` is replaced last, so
it always points at a complete state file. A checkpoint from a different run (other bundle, data or
settings) is refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.atomic import atomic_replace, atomic_write_bytes
from device_runtime.errors import DeviceError

PROGRESS = "progress.json"
START = "start.safetensors"


def run_fingerprint(**parts: Any) -> str:
    """A short hash of everything that decides the result of a run (bundle, data, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class CheckpointDir:
    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint

    def load_progress(self) -> dict | None:
        """The last complete checkpoint's progress record, or None for a fresh start."""
        p = self.root / PROGRESS
        if not p.is_file():
            return None
        try:
            progress = json.loads(p.read_text())
        except json.JSONDecodeError:
            raise DeviceError(f"{p}: corrupt checkpoint record; delete {self.root} to start over") from None
        if progress.get("fingerprint") != self.fingerprint:
            raise DeviceError(
                f"{self.root} holds a checkpoint of a different run (other bundle, data or settings); "
                "delete it or pass another --checkpoint-dir"
            )
        if not (self.root / progress["state_file"]).is_file():
            raise DeviceError(f"{self.root}: state file {progress['state_file']} is missing; delete the directory "
                              "to start over")
        return progress

    def state_path(self, progress: dict) -> Path:
        return self.root / progress["state_file"]

    def save(self, backend, progress: dict) -> None:
        """Save the backend state and the progress record for ``progress['step']`` atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"state-{int(progress['step']):08d}.ckpt"
        with atomic_replace(self.root / name) as tmp:
            backend.save(tmp, include_optimizer_state=True)
        record = dict(progress, state_file=name, fingerprint=self.fingerprint)
        atomic_write_bytes(self.root / PROGRESS, json.dumps(record).encode())
        for old in self.root.glob("state-*.ckpt"):
            if old.name != name:
                old.unlink(missing_ok=True)
        for stale in self.root.glob(".*.tmp-*"):  # left by a process killed mid-save
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                stale.unlink(missing_ok=True)

    def save_start(self, tensors: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / START, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))

    def load_start(self) -> dict[str, np.ndarray] | None:
        from safetensors.numpy import load_file

        p = self.root / START
        return load_file(str(p)) if p.is_file() else None

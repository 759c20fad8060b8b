"""Choose the training backend by name. ORT is the default; ``torch`` exists for devices without an
ONNX Runtime training build (aarch64) and is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from device_runtime.bundle.load import Bundle
from device_runtime.errors import BackendUnavailable

BackendName = Literal["ort", "torch"]
BACKENDS = ("ort", "torch")


def make_backend(bundle: Bundle, name: str = "ort", checkpoint: str | Path | None = None,
                 threads: int | None = None):
    """A training backend for ``bundle``; ``threads`` caps the CPU threads it uses (None: all cores)."""
    if threads is not None and threads <= 0:
        raise BackendUnavailable(f"--threads {threads} must be a positive number")
    if name == "ort":
        from device_runtime.ort_backend import OrtBackend

        return OrtBackend(bundle, checkpoint, threads=threads)
    if name == "torch":
        try:
            from device_runtime.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendUnavailable(f"the torch backend is not available here ({exc}); use --backend ort") from None
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return TorchBackend(bundle, checkpoint)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")

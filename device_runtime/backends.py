"""Choose the training backend for a bundle: its format decides.

``step`` bundles (the default) train on the plain ``onnxruntime`` package (``step_backend``);
``ort-training`` bundles need an ONNX Runtime training build (``ort_backend``), imported only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from device_runtime.backend import Backend
from device_runtime.bundle.load import Bundle
from device_runtime.errors import BackendUnavailable

BackendName = Literal["ort"]
BACKENDS = ("ort",)


def make_backend(bundle: Bundle, name: str = "ort", checkpoint: str | Path | None = None,
                 threads: int | None = None) -> Backend:
    """A training backend for ``bundle``; ``threads`` caps the CPU threads it uses (None: all cores)."""
    if threads is not None and threads <= 0:
        raise BackendUnavailable(f"--threads {threads} must be a positive number")
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (the torch "
                                 "backend is gone: the step graph trains on plain onnxruntime everywhere)")
    if bundle.manifest.format == "ort-training":
        from device_runtime.ort_backend import OrtBackend

        return OrtBackend(bundle, checkpoint, threads=threads)
    from device_runtime.step_backend import StepBackend

    return StepBackend(bundle, checkpoint, threads=threads)

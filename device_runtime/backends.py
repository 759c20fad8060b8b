"""Choose the training backend by name. ORT is the default; ``torch`` exists for devices without an
ONNX Runtime training build (aarch64) and is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from device_runtime.bundle.load import Bundle
from device_runtime.errors import BackendUnavailable

BackendName = Literal["ort", "torch"]
BACKENDS = ("ort", "torch")


def make_backend(bundle: Bundle, name: str = "ort", checkpoint: str | Path | None = None):
    if name == "ort":
        from device_runtime.ort_backend import OrtBackend

        return OrtBackend(bundle, checkpoint)
    if name == "torch":
        try:
            from device_runtime.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendUnavailable(f"the torch backend is not available here ({exc}); use --backend ort") from None
        return TorchBackend(bundle, checkpoint)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")

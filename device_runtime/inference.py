"""ONNX Runtime inference sessions on a bundle's ``inference.onnx``.

A bundle ships the model's weights once (``device_runtime.weights``): its inference graph declares
them as external data (``manifest.inference_external``) and this module hands them to ONNX Runtime
at load time. Trained tensors (a device's update, the edge's global state) can stand in for the
checkpoint's own, so the same graph serves the model as trained. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.errors import BundleError
from device_runtime.step_backend import session_kwargs
from device_runtime.weights import named_arrays


def inference_session(root: str | Path, manifest: Manifest, tensors: Mapping[str, np.ndarray] | None = None,
                      threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``root/inference.onnx`` with its weights in place.

    ``tensors``: trained tensors (name -> array) used instead of the bundle's; each must be one
    the graph takes from the bundle's weights, with the same shape."""
    import onnxruntime

    root = Path(root)
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    names = list(manifest.inference_external)
    if manifest.format == "step":  # ONNX Runtime reads the graph's weights from weights.safetensors itself
        names = [n for n in names if n in (tensors or {})]
        unknown = sorted(set(tensors or {}) - set(manifest.inference_external))
        if unknown:
            raise BundleError(f"tensor {unknown[0]!r} is not a weight of this bundle's inference graph")
    values = (named_arrays(root, manifest, names, needed_by="that inference.onnx takes from it",
                           error=BundleError) if names else {})
    for name, arr in (tensors or {}).items():
        if name not in values:
            raise BundleError(f"tensor {name!r} is not a weight of this bundle's inference graph")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.shape != values[name].shape:
            raise BundleError(f"tensor {name!r} has shape {arr.shape}; the inference graph takes {values[name].shape}")
        values[name] = arr
    ort_values = [onnxruntime.OrtValue.ortvalue_from_numpy(values[n]) for n in names]
    if names:
        opts.add_external_initializers(names, ort_values)
    sess = onnxruntime.InferenceSession(str(root / "inference.onnx"), opts, providers=["CPUExecutionProvider"],
                                        **session_kwargs(manifest))
    # ONNX Runtime uses these buffers in place: they must live as long as the session
    sess._deft_weights = (ort_values, values)
    return sess

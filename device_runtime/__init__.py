"""deftkit device runtime: train a bundle on local data with ONNX Runtime, without torch.

The public API is imported lazily (``from device_runtime import load_bundle``; the training loop is
``device_runtime.train.train``) so that ``import device_runtime`` stays cheap and never pulls in
ONNX Runtime before it is needed (and never torch, transformers or peft at all; see ``ort_training``).
"""

from __future__ import annotations

import importlib

_API = {
    "Bundle": "device_runtime.bundle.load",
    "load_bundle": "device_runtime.bundle.load",
    "verify_bundle": "device_runtime.bundle.verify",
    "Dataset": "device_runtime.data",
    "load_dataset": "device_runtime.data",
    "tokenize_texts": "device_runtime.data",
    "TrainConfig": "device_runtime.train",
    "TrainResult": "device_runtime.train",
    "make_backend": "device_runtime.backends",
    "encode_update": "device_runtime.payload",
    "decode_update": "device_runtime.payload",
    "Update": "device_runtime.payload",
    "PayloadMeta": "device_runtime.payload",
    "apply_global_state": "device_runtime.state",
    "check_tensors": "device_runtime.state",
    "predict_proba": "device_runtime.predict",
    "predict_ensemble": "device_runtime.predict",
    "DeviceError": "device_runtime.errors",
    "BundleError": "device_runtime.errors",
    "DataError": "device_runtime.errors",
    "PayloadError": "device_runtime.errors",
    "StateError": "device_runtime.errors",
    "BackendUnavailable": "device_runtime.errors",
}

__all__ = [
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "DataError",
    "Dataset",
    "DeviceError",
    "PayloadError",
    "PayloadMeta",
    "StateError",
    "TrainConfig",
    "TrainResult",
    "Update",
    "apply_global_state",
    "check_tensors",
    "decode_update",
    "encode_update",
    "load_bundle",
    "load_dataset",
    "make_backend",
    "predict_ensemble",
    "predict_proba",
    "tokenize_texts",
    "verify_bundle",
]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'device_runtime' has no attribute {name!r}")

"""The device bundle: the directory ``export`` writes and ``device_runtime`` reads."""

from device_runtime.bundle.manifest import (
    BUNDLE_FILES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    EmulatorSpec,
    Manifest,
    PeftSpec,
    TensorSpec,
)

__all__ = [
    "BUNDLE_FILES",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "EmulatorSpec",
    "Manifest",
    "PeftSpec",
    "TensorSpec",
]

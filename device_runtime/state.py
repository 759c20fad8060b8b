"""Apply global state received from the edge: tensors by name, checked against the bundle first.

A device must never train on tensors that do not fit its bundle: a wrong name, shape or dtype, or a
NaN, is refused with a message naming the tensor, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.errors import StateError


def check_tensors(manifest: Manifest, tensors: Mapping[str, np.ndarray], *,
                  partial: bool = False) -> dict[str, np.ndarray]:
    """Validated float32 copies of ``tensors``; ``partial`` allows a subset of the trainable names."""
    specs = {t.name: t for t in manifest.trainable}
    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        raise StateError(f"tensor {unknown[0]!r} is not trainable in this bundle ({len(unknown)} unknown names); "
                         "the state was made for another bundle")
    if not partial:
        missing = [n for n in specs if n not in tensors]
        if missing:
            raise StateError(f"tensor {missing[0]!r} is missing from the state ({len(missing)} missing); "
                             "send every trainable tensor or apply it as partial")
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        spec = specs[name]
        if arr.dtype != np.dtype(spec.dtype):
            raise StateError(f"tensor {name!r} has dtype {arr.dtype}, the bundle expects {spec.dtype}")
        if tuple(arr.shape) != tuple(spec.shape):
            raise StateError(f"tensor {name!r} has shape {tuple(arr.shape)}, the bundle expects {tuple(spec.shape)}")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise StateError(f"tensor {name!r} has {bad} NaN/Inf values; refusing to load it")
        out[name] = np.array(arr, dtype=np.float32, copy=True)
    return out


def apply_global_state(backend, tensors: Mapping[str, np.ndarray], *, partial: bool = False) -> dict[str, np.ndarray]:
    """Check then load ``tensors`` into a backend (ORT or torch); returns what was loaded."""
    checked = check_tensors(backend.manifest, tensors, partial=partial)
    backend.set_tensors(checked)
    return checked


def load_state_file(path: str | Path, base: Callable[[], Mapping[str, np.ndarray]] | None = None
                    ) -> dict[str, np.ndarray]:
    """Trainable tensors from an update payload or a plain safetensors file.

    A delta payload is applied to ``base()``, called only then (it may have to load the model).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from device_runtime.payload import PayloadError, decode_update

    p = Path(path)
    if not p.is_file():
        raise StateError(f"state file {p} does not exist")
    blob = p.read_bytes()
    try:
        upd = decode_update(blob)
    except PayloadError as exc:
        if "not a deftkit update" not in str(exc):
            raise StateError(f"{p}: {exc}") from None
        try:
            return load(blob)
        except SafetensorError as exc2:
            raise StateError(f"{p}: not a safetensors file or update payload ({exc2})") from None
    if upd.meta.kind == "delta":
        if base is None:
            raise StateError(f"{p}: is a delta update; it needs the tensors it was computed against")
        return upd.full_tensors(base())
    return upd.tensors

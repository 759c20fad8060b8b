"""A bundle's weights, read without torch: ``weights.safetensors`` for step-graph bundles, the ONNX
Runtime checkpoint for ``ort-training`` bundles.

In a step-graph bundle every graph declares its weights as external data pointing at the tensor's own
bytes inside ``weights.safetensors`` (:func:`safetensors_offsets`), so ONNX Runtime reads them from
there and a bundle carries each weight once. The trainable tensors' initial values are also round 0's
global state at the edge, so they must be exactly what every device starts from.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from device_runtime.bundle.manifest import WEIGHTS_FILE, Manifest
from device_runtime.errors import BundleError, DeviceError, StateError


def safetensors_offsets(path: str | Path) -> dict[str, tuple[int, int]]:
    """name -> (byte offset in the file, byte length) of every tensor of a safetensors file.

    The format: an 8-byte little-endian header length N, N bytes of JSON whose ``data_offsets`` count
    from the end of the header (https://github.com/huggingface/safetensors#format). The safetensors
    package reads tensors but does not expose where they are; ONNX external data needs exactly that."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def _read(root: Path, manifest: Manifest, names: list[str] | None) -> dict[str, np.ndarray]:
    if manifest.format == "ort-training":
        from device_runtime.ort_training import load_training_api

        state = load_training_api().CheckpointState.load_checkpoint(str(root / "checkpoint"))
        held = {n for n, _ in state.parameters}
        return {n: np.array(state.parameters[n].data, dtype=np.float32, copy=True)
                for n in (held if names is None else [n for n in names if n in held])}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(root / WEIGHTS_FILE), framework="np") as f:
            held = set(f.keys())
            return {n: f.get_tensor(n) for n in (held if names is None else [n for n in names if n in held])}
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{root / WEIGHTS_FILE}: unreadable ({exc}); verify the bundle or re-export it") from None


def named_arrays(root: str | Path, manifest: Manifest, names: list[str], *, needed_by: str,
                 error: type[DeviceError] = StateError) -> dict[str, np.ndarray]:
    """The named weights as float32 arrays; a name the bundle lacks raises ``error`` saying who
    ``needed_by`` it."""
    root = Path(root)
    got = _read(root, manifest, names)
    missing = [n for n in names if n not in got]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        src = "checkpoint" if manifest.format == "ort-training" else WEIGHTS_FILE
        raise error(f"{root / src}: has no tensor {missing[0]!r} {needed_by}{more}; re-export the bundle")
    return {n: np.ascontiguousarray(got[n], dtype=np.float32) for n in names}


def weight_shapes(bundle) -> dict[str, tuple[int, ...]]:
    """name -> shape of every weight of a step-graph bundle, from the safetensors header alone."""
    from safetensors import safe_open

    with safe_open(str(Path(bundle.root) / WEIGHTS_FILE), framework="np") as f:
        return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118 - no __iter__


def weight_dtypes(bundle) -> dict[str, np.dtype]:
    """name -> stored numpy dtype of every weight of a step-graph bundle (frozen ones may be float16)."""
    from safetensors import safe_open

    kinds = {"F16": np.float16, "F32": np.float32, "BF16": None}
    with safe_open(str(Path(bundle.root) / WEIGHTS_FILE), framework="np") as f:
        return {n: np.dtype(kinds.get(f.get_slice(n).get_dtype(), np.float32) or np.float32)
                for n in f.keys()}  # noqa: SIM118 - no __iter__


def initial_tensors(bundle) -> dict[str, np.ndarray]:
    """The bundle's initial trainable tensors: what every device starts from (round 0 at the edge)."""
    return named_arrays(bundle.root, bundle.manifest, bundle.manifest.trainable_names,
                        needed_by="that the manifest lists as trainable")

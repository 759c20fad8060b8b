"""A bundle's weights, read without torch: ``weights.safetensors`` for step-graph bundles, the ONNX
Runtime checkpoint for ``ort-training`` bundles.

Every graph of a bundle declares the weights it needs as external data and is given them from here
(``device_runtime.inference``, the step backend), so a bundle carries each weight once. This is also
round 0's global state at the edge, so it must be exactly what every device starts from.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from device_runtime.bundle.manifest import WEIGHTS_FILE, Manifest
from device_runtime.errors import BundleError, DeviceError, StateError


def _read(root: Path, manifest: Manifest, names: Iterable[str] | None) -> dict[str, np.ndarray]:
    if manifest.format == "ort-training":
        from device_runtime.ort_training import load_training_api

        state = load_training_api().CheckpointState.load_checkpoint(str(root / "checkpoint"))
        held = [n for n, _ in state.parameters]
        return {n: np.array(state.parameters[n].data, dtype=np.float32, copy=True)
                for n in (held if names is None else [n for n in names if n in set(held)])}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        data = load_file(str(root / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{root / WEIGHTS_FILE}: unreadable ({exc}); verify the bundle or re-export it") from None
    if names is None:
        return data
    wanted = set(names)
    return {k: v for k, v in data.items() if k in wanted}


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


def bundle_weights(bundle) -> dict[str, np.ndarray]:
    """Every weight of ``bundle`` (name -> array)."""
    return _read(Path(bundle.root), bundle.manifest, None)


def initial_tensors(bundle) -> dict[str, np.ndarray]:
    """The bundle's initial trainable tensors: what every device starts from (round 0 at the edge)."""
    return named_arrays(bundle.root, bundle.manifest, bundle.manifest.trainable_names,
                        needed_by="that the manifest lists as trainable")

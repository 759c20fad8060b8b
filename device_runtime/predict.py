"""Prediction with the trained state: batch class probabilities, and prompt ensembles.

A prompt ensemble runs the same texts under several sets of trainable tensors (typically soft
prompts: the device's own and ones received from other devices) and averages the class
probabilities, optionally weighted: an ensemble of prompts is more robust than any single one and
costs only one prompt's worth of memory at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device_runtime.backend import Backend
from device_runtime.data import Dataset
from device_runtime.errors import DeviceError
from device_runtime.state import apply_global_state


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def predict_logits(backend: Backend, ds: Dataset, batch_size: int = 64) -> np.ndarray:
    """Logits for every row of ``ds`` in order ([N, C] for seq-cls; [N, S, V] per batch is not
    concatenated for causal LMs, so this is for classification bundles)."""
    if backend.manifest.task != "seq-cls":
        raise DeviceError("prediction of class probabilities needs a seq-cls bundle")
    out = []
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        out.append(backend.logits(ds.batch(idx)))
    return np.concatenate(out, axis=0)


def predict_proba(backend: Backend, ds: Dataset, batch_size: int = 64) -> np.ndarray:
    return softmax(predict_logits(backend, ds, batch_size).astype(np.float64)).astype(np.float32)


def predict_ensemble(backend: Backend, ds: Dataset, members: Sequence[Mapping[str, np.ndarray]],
                     weights: Sequence[float] | None = None, batch_size: int = 64) -> np.ndarray:
    """Weighted mean of class probabilities over ``members`` (each a partial set of trainable tensors,
    e.g. ``{prompt_name: prompt}``). The backend's own tensors are restored afterwards."""
    if not members:
        raise DeviceError("a prompt ensemble needs at least one member")
    w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(members),) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DeviceError(f"ensemble weights {list(w)} must be {len(members)} non-negative numbers, not all 0")
    w = w / w.sum()
    saved = backend.get_tensors()
    try:
        acc = None
        for member, wi in zip(members, w, strict=True):
            apply_global_state(backend, member, partial=True)
            p = predict_proba(backend, ds, batch_size).astype(np.float64) * wi
            acc = p if acc is None else acc + p
    finally:
        backend.set_tensors(saved)
    return acc.astype(np.float32)


def label_names(manifest, pred: np.ndarray) -> list[str]:
    names = manifest.labels or [str(i) for i in range(int(pred.max()) + 1)]
    return [names[i] for i in pred]

"""What a training backend is: the one interface the training loop, evaluation and prediction use.

Two implementations: :class:`~device_runtime.ort_backend.OrtBackend` (ONNX Runtime training, the
default) and :class:`~device_runtime.torch_backend.TorchBackend` (devices without an ONNX Runtime
training build). :func:`device_runtime.backends.make_backend` picks one by name. A backend that can
hold some tensors fixed while training the rest (LoLa DEFT block variants) is a :class:`FreezingBackend`;
check it with ``isinstance`` rather than by looking for a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


def with_neutral_labels(batch: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """``batch`` plus the label input a graph with a loss needs, chosen so it does not touch the logits
    (class 0 per row for classification; the inputs themselves, padding ignored, for a causal LM). How
    every backend's :meth:`Backend.logits` runs its eval graph on unlabelled data."""
    b = dict(batch)
    ids = b["input_ids"]
    if task == "seq-cls":
        b["labels"] = np.zeros(ids.shape[0], dtype=np.int64)
    else:
        b["labels"] = np.where(b["attention_mask"] == 1, ids, -100).astype(np.int64)
    return b


@runtime_checkable
class Backend(Protocol):
    def train_step(self, batch: dict[str, np.ndarray], lr: float, step: int, seed: int) -> float:
        """One optimiser step on ``batch`` at learning rate ``lr``; the batch's loss."""

    def eval_batch(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Loss and logits of ``batch`` without training."""

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of an unlabelled ``batch``."""

    def get_tensors(self) -> dict[str, np.ndarray]:
        """The trainable tensors by name (float32 copies)."""

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors by name (e.g. from the global state)."""

    def save(self, path: str | Path, include_optimizer_state: bool = True) -> None:
        """Write a checkpoint the backend can resume from."""


@runtime_checkable
class FreezingBackend(Backend, Protocol):
    def set_frozen(self, tensors: dict[str, np.ndarray]) -> None:
        """Set tensors that stay fixed during training (the other blocks' LoRA tensors of a variant)."""

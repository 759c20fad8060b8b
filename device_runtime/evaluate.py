"""Evaluation on a labelled split: mean loss and accuracy (class accuracy, or next-token accuracy
for a causal LM), batched in a fixed order."""

from __future__ import annotations

import numpy as np

from device_runtime.backend import Backend
from device_runtime.data import IGNORE_INDEX, Dataset, PadPolicy


def correct_and_count(logits: np.ndarray, labels: np.ndarray, task: str, num_virtual_tokens: int = 0) -> tuple[int,
                                                                                                               int]:
    if task == "seq-cls":
        return int((logits.argmax(-1) == labels).sum()), int(labels.shape[0])
    if num_virtual_tokens:
        logits = logits[:, num_virtual_tokens:, :]
    pred = logits[:, :-1, :].argmax(-1)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    return int(((pred == target) & valid).sum()), int(valid.sum())


def evaluate(backend: Backend, ds: Dataset, batch_size: int = 64, pad_to: PadPolicy = "longest") -> dict:
    """``{"loss", "accuracy", "rows"}`` of ``backend`` on ``ds`` (loss weighted by rows per batch)."""
    if ds.labels is None:
        raise ValueError("evaluation needs labelled data")
    nvt = backend.manifest.peft.num_virtual_tokens
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        batch = ds.batch(idx, pad_to=pad_to)
        loss, logits = backend.eval_batch(batch)
        total_loss += loss * len(idx)
        c, n = correct_and_count(logits, batch["labels"], ds.task, nvt)
        correct += c
        count += n
    return {"loss": total_loss / max(1, len(ds)), "accuracy": correct / max(1, count), "rows": len(ds)}

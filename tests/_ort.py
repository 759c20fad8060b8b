"""Helpers for tests that drive a bundle's ORT artifacts and compare with the torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from device_runtime.bundle.manifest import Manifest
from tests._models import read_sst2, tokenize


class OrtTrainer:
    """The bundle's artifacts through onnxruntime.training.api (the same API the device uses)."""

    def __init__(self, bundle: Path, lr: float = 1e-3):
        import onnxruntime
        from onnxruntime.training import api

        onnxruntime.set_default_logger_severity(3)
        self.state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
        self.module = api.Module(str(bundle / "training_model.onnx"), self.state, str(bundle / "eval_model.onnx"))
        self.optimizer = api.Optimizer(str(bundle / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(lr)

    def step(self, ids, mask, labels) -> float:
        self.module.train()
        loss, _ = self.module(ids, mask, labels)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def eval_logits(self, ids, mask, labels) -> tuple[float, np.ndarray]:
        self.module.eval()
        loss, logits = self.module(ids, mask, labels)
        return float(loss), np.asarray(logits)

    def tensors(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: np.array(self.state.parameters[n].data) for n in names}


def batches(manifest: Manifest, tokenizer_json: str, n_batches: int, batch: int = 8, seed: int = 0):
    """SST-2 batches shaped for the bundle's task (labels, or next-token labels with -100 on padding)."""
    texts, labels = read_sst2(n=n_batches * batch + 64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    out = []
    for b in range(n_batches):
        idx = order[b * batch:(b + 1) * batch]
        ids, mask = tokenize(tokenizer_json, [texts[i] for i in idx], manifest.max_length)
        if manifest.task == "seq-cls":
            lab = np.array([labels[i] % max(2, len(manifest.labels)) for i in idx], dtype=np.int64)
        else:
            lab = np.where(mask == 1, ids, -100).astype(np.int64)
        out.append((ids, mask, lab))
    return out


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def load_tensors(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, arr in tensors.items():
            params[name].copy_(torch.from_numpy(arr))

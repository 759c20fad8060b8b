"""Helpers for tests that drive a bundle's step graph and compare with the PyTorch eager reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from device_runtime.bundle.manifest import Manifest
from tests._models import read_sst2, tokenize


class OrtTrainer:
    """A step-graph bundle trained through the device runtime's backend (plain onnxruntime)."""

    def __init__(self, bundle: Path, lr: float = 1e-3):
        from device_runtime.backends import make_backend
        from device_runtime.bundle.load import load_bundle

        self.backend = make_backend(load_bundle(bundle))
        self.lr = lr
        self.t = 0

    def step(self, ids, mask, labels) -> float:
        loss = self.backend.train_step({"input_ids": ids, "attention_mask": mask, "labels": labels}, self.lr,
                                       self.t, 0)
        self.t += 1
        return loss

    def eval_logits(self, ids, mask, labels) -> tuple[float, np.ndarray]:
        return self.backend.eval_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def tensors(self, names: list[str]) -> dict[str, np.ndarray]:
        got = self.backend.get_tensors()
        return {n: got[n] for n in names}


class EagerTrainer:
    """The PyTorch eager reference of a step: the PEFT model's training forward, autograd, and the
    kit's AdamW (``export.step_graph.adamw_update``), on the same batches."""

    def __init__(self, model: torch.nn.Module, manifest: Manifest, lr: float = 1e-3):
        from export.onnx_graph import TrainingForward

        self.names = manifest.trainable_names
        self.params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        for n in self.names:
            self.params[n].requires_grad_(True)
        self.forward = TrainingForward(model, manifest.task, manifest.peft.num_virtual_tokens).eval()
        self.m = {n: torch.zeros_like(self.params[n]) for n in self.names}
        self.v = {n: torch.zeros_like(self.params[n]) for n in self.names}
        self.lr, self.t = lr, 0

    def step(self, ids, mask, labels) -> float:
        from export.step_graph import adamw_update

        self.t += 1
        loss, _ = self.forward(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, mask, labels)))
        grads = torch.autograd.grad(loss, [self.params[n] for n in self.names])
        with torch.no_grad():
            for n, g in zip(self.names, grads, strict=True):
                p, self.m[n], self.v[n] = adamw_update(self.params[n], g, self.m[n], self.v[n],
                                                       torch.tensor(self.lr), torch.tensor(float(self.t)))
                self.params[n].copy_(p)
        return float(loss.detach())

    def tensors(self) -> dict[str, np.ndarray]:
        return {n: self.params[n].detach().numpy().copy() for n in self.names}


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

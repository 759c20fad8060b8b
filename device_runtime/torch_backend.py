"""Second training backend: PyTorch autograd on the bundle's ``model.pt2`` (a ``torch.export``
program of the same training forward as the ONNX graphs), for devices that have PyTorch wheels but
no ONNX Runtime training build (there is no aarch64 ``onnxruntime-training`` wheel; Raspberry Pi and
Jetson have PyTorch). It needs neither transformers nor peft.

torch is imported only here, and only ``backends.make_backend(..., "torch")`` imports this module.
The manifest's trainable tensors are the only parameters that require grad, and the optimizer is
the same AdamW as the bundle's ``optimizer_model.onnx`` (ONNX Runtime's ``adam_mode=1``, the
Hugging Face variant: betas 0.9/0.999, eps 1e-6 added to sqrt(v) before bias correction, no weight
decay), so both backends follow the same loss curve from the same data.

Checkpoints are safetensors files (parameters, moments, step), never pickle.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from device_runtime.bundle.load import Bundle
from device_runtime.errors import BundleError

PROGRAM = "model.pt2"
_PREFIX = "m."  # the export wrapper's attribute holding the PEFT model
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.999, 1e-6, 0.0


class TorchBackend:
    name = "torch"

    def __init__(self, bundle: Bundle, checkpoint: str | Path | None = None):
        import torch

        self._torch = torch
        self.bundle = bundle
        self.manifest = bundle.manifest
        path = bundle.path(PROGRAM)
        if PROGRAM not in self.manifest.files or not path.is_file():
            raise BundleError(f"bundle {bundle.root} has no {PROGRAM} for the torch backend; re-export it with "
                              "`deft export --torch-program` or use --backend ort")
        try:
            program = torch.export.load(str(path))
            self._gm = program.module()
        except Exception as exc:  # noqa: BLE001 - torch raises many types
            raise BundleError(f"{path}: torch could not load the program ({str(exc).splitlines()[0][:200]})") \
                from None
        params = dict(self._gm.named_parameters())
        self._params: dict[str, object] = {}
        for p in params.values():
            p.requires_grad_(False)
        for name in self.manifest.trainable_names:
            p = params.get(_PREFIX + name)
            if p is None:
                raise BundleError(f"{path}: has no parameter {name!r} that the manifest lists as trainable; "
                                  "re-export the bundle")
            p.requires_grad_(True)
            self._params[name] = p
        self._m = {n: torch.zeros_like(p) for n, p in self._params.items()}
        self._v = {n: torch.zeros_like(p) for n, p in self._params.items()}
        self._t = 0
        if checkpoint is not None and Path(checkpoint).resolve() != bundle.checkpoint.resolve():
            self._load(Path(checkpoint))

    # -- training ---------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, np.ndarray]):
        t = self._torch
        return self._gm(t.from_numpy(np.ascontiguousarray(batch["input_ids"], dtype=np.int64)),
                        t.from_numpy(np.ascontiguousarray(batch["attention_mask"], dtype=np.int64)),
                        t.from_numpy(np.ascontiguousarray(batch["labels"], dtype=np.int64)))

    def train_step(self, batch: dict[str, np.ndarray], lr: float, step: int, seed: int) -> float:
        torch = self._torch
        torch.manual_seed(seed * 1_000_003 + step)
        loss, _ = self._forward(batch)
        loss.backward()
        self._adamw(float(lr))
        return float(loss.detach())

    def _adamw(self, lr: float) -> None:
        """ONNX Runtime's AdamWOptimizer, adam_mode=1 (see the module docstring)."""
        torch = self._torch
        self._t += 1
        step_size = lr * math.sqrt(1 - BETA2 ** self._t) / (1 - BETA1 ** self._t)
        with torch.no_grad():
            for n, p in self._params.items():
                g = p.grad
                if g is None:
                    continue
                m, v = self._m[n], self._v[n]
                m.mul_(BETA1).add_(g, alpha=1 - BETA1)
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                p.addcdiv_(m, v.sqrt().add_(EPS), value=-step_size)
                if WEIGHT_DECAY:
                    p.mul_(1 - lr * WEIGHT_DECAY)
                p.grad = None

    def eval_batch(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        with self._torch.no_grad():
            loss, logits = self._forward(batch)
        return float(loss), logits.numpy().copy()

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        b = dict(batch)
        ids = b["input_ids"]
        if self.manifest.task == "seq-cls":
            b["labels"] = np.zeros(ids.shape[0], dtype=np.int64)
        else:
            b["labels"] = np.where(b["attention_mask"] == 1, ids, -100).astype(np.int64)
        return self.eval_batch(b)[1]

    # -- tensors ----------------------------------------------------------------------------------
    def get_tensors(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().astype(np.float32, copy=True) for n, p in self._params.items()}

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        with self._torch.no_grad():
            for n, v in tensors.items():
                self._params[n].copy_(self._torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, include_optimizer_state: bool = True) -> None:
        from safetensors.numpy import save_file

        out = {f"param/{n}": v for n, v in self.get_tensors().items()}
        if include_optimizer_state:
            out |= {f"m/{n}": t.numpy().copy() for n, t in self._m.items()}
            out |= {f"v/{n}": t.numpy().copy() for n, t in self._v.items()}
        save_file(out, str(path), metadata={"format": "deftkit-torch-checkpoint", "step": str(self._t)})

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "deftkit-torch-checkpoint":
                raise BundleError(f"{path}: not a torch-backend checkpoint (was it written by the ORT backend?)")
            keys = set(f.keys())
            self.set_tensors({n: f.get_tensor(f"param/{n}") for n in self._params if f"param/{n}" in keys})
            for n in self._params:
                if f"m/{n}" in keys:
                    self._m[n].copy_(self._torch.from_numpy(f.get_tensor(f"m/{n}")))
                    self._v[n].copy_(self._torch.from_numpy(f.get_tensor(f"v/{n}")))
            self._t = int(meta.get("step", "0"))

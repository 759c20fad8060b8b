"""The ``ort-training`` format's backend: ONNX Runtime's on-device training API on the bundle's artifacts
(needs an ONNX Runtime training build; step-graph bundles use ``step_backend``).

One object holds the three ORT pieces (CheckpointState, Module, Optimizer) and exposes the few
operations the training loop, evaluation, prediction and checkpointing need, by tensor name, so
the step backend can offer the same surface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_runtime.backend import with_neutral_labels
from device_runtime.bundle.load import Bundle
from device_runtime.errors import BundleError, StateError
from device_runtime.ort_training import load_training_api, quiet, set_seed


class OrtBackend:
    name = "ort"

    def __init__(self, bundle: Bundle, checkpoint: str | Path | None = None, threads: int | None = None):
        api = load_training_api()
        quiet()
        from onnxruntime.capi._pybind_state import SessionOptions

        options = SessionOptions()
        # no busy-waiting between kernels: see device_runtime/step_backend.py's session options
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.bundle = bundle
        self.manifest = bundle.manifest
        ckpt = Path(checkpoint) if checkpoint is not None else bundle.checkpoint
        try:
            self._state = api.CheckpointState.load_checkpoint(str(ckpt))
            self._module = api.Module(str(bundle.training_model), self._state, str(bundle.eval_model),
                                      session_options=options)
            self._optimizer = api.Optimizer(str(bundle.optimizer_model), self._module)
        except Exception as exc:  # noqa: BLE001 - ORT raises bare RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"ONNX Runtime could not load the bundle {bundle.root} ({first}); "
                              "verify it with `deft bundle verify` or re-export it") from None
        self._api = api
        names = {n for n, _ in self._state.parameters}
        missing = [n for n in self.manifest.trainable_names if n not in names]
        if missing:
            raise BundleError(f"{bundle.checkpoint}: has no tensor {missing[0]!r} that the manifest lists as "
                              "trainable; the manifest does not match the graphs, re-export the bundle")
        self._label_dtype = np.int64

    # -- training ---------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, np.ndarray], lr: float, step: int, seed: int) -> float:
        """One optimizer step; randomness (dropout) is seeded by (seed, step) so a resumed run repeats it."""
        set_seed(seed * 1_000_003 + step)
        self._optimizer.set_learning_rate(float(lr))
        self._module.train()
        out = self._module(*self._inputs(batch, with_labels=True))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        loss = out[0] if isinstance(out, tuple) else out
        return float(np.asarray(loss))

    def eval_batch(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """(loss, logits) of the eval graph."""
        self._module.eval()
        out = self._module(*self._inputs(batch, with_labels=True))
        return float(np.asarray(out[0])), np.asarray(out[1])

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits without labels (the eval graph takes a label input: give it a neutral one)."""
        return self.eval_batch(with_neutral_labels(batch, self.manifest.task))[1]

    def _inputs(self, batch: dict[str, np.ndarray], with_labels: bool) -> list[np.ndarray]:
        names = list(self.manifest.inputs) + ([self.manifest.label_input] if with_labels else [])
        key = {self.manifest.label_input: "labels"}
        return [np.ascontiguousarray(batch[key.get(n, n)], dtype=np.int64) for n in names]

    # -- tensors ----------------------------------------------------------------------------------
    def get_tensors(self) -> dict[str, np.ndarray]:
        """The trainable tensors, by manifest name (copies)."""
        return {n: np.array(self._state.parameters[n].data, dtype=np.float32, copy=True)
                for n in self.manifest.trainable_names}

    def set_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors in place (already validated by ``state.check_tensors``)."""
        for n, v in tensors.items():
            self._state.parameters[n] = np.ascontiguousarray(v, dtype=np.float32)

    def set_frozen(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite frozen (non-trainable) parameters, e.g. the LoRA tensors of blocks another device
        trains this round, so the forward pass uses the current global state, not the bundle's."""
        params = dict(self._state.parameters)
        for n, v in tensors.items():
            if n not in params:
                raise StateError(f"tensor {n!r} is not a parameter of this bundle; the state was made for "
                                 "another bundle")
            arr = np.ascontiguousarray(v, dtype=np.float32)
            if tuple(arr.shape) != tuple(params[n].data.shape):
                raise StateError(f"tensor {n!r} has shape {tuple(arr.shape)}, the bundle expects "
                                 f"{tuple(params[n].data.shape)}")
            if not np.isfinite(arr).all():
                raise StateError(f"tensor {n!r} has NaN/Inf values; refusing to load it")
            self._state.parameters[n] = arr

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, include_optimizer_state: bool = True) -> None:
        self._api.CheckpointState.save_checkpoint(self._state, str(path), include_optimizer_state)

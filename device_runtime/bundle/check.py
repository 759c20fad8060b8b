"""Deep bundle checks for ``deft bundle verify``: beyond the hashes, does every graph load in ONNX
Runtime, do the graphs agree with the manifest, and does one training step give a finite loss?

Torch-free, so a device can run it on a bundle it received.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.bundle.verify import bundle_problems, read_manifest
from device_runtime.errors import DeviceError


def _dummy_batch(m: Manifest, batch: int = 2, seq: int = 8):
    seq = min(seq, m.max_length)
    ids = np.full((batch, seq), 5, dtype=np.int64)
    ids[:, 0] = 101 % 1000
    mask = np.ones((batch, seq), dtype=np.int64)
    labels = np.arange(batch, dtype=np.int64) % max(1, len(m.labels)) if m.task == "seq-cls" else ids.copy()
    return ids, mask, labels


def _graph_io_problems(root: Path, m: Manifest) -> list[str]:
    from device_runtime.inference import inference_session

    problems: list[str] = []
    try:
        sess = inference_session(root, m)
    except DeviceError as exc:
        return [f"inference.onnx: {exc}"]
    except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeErrors/Fail
        return [f"inference.onnx: does not load in ONNX Runtime ({str(exc).splitlines()[0][:200]})"]
    names = [i.name for i in sess.get_inputs()]
    if names != list(m.inputs):
        problems.append(f"inference.onnx: inputs {names} do not match the manifest's {list(m.inputs)}")
    ids, mask, _ = _dummy_batch(m)
    try:
        logits = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        if m.task == "seq-cls" and logits.shape[-1] != len(m.labels):
            problems.append(f"inference.onnx: {logits.shape[-1]} logits per row but the manifest has "
                            f"{len(m.labels)} labels")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"inference.onnx: inference failed ({str(exc).splitlines()[0][:200]})")
    return problems


def _step_problems(root: Path, m: Manifest) -> list[str]:
    """Load the step and eval graphs with the bundle's weights and train one step on a copy of the state."""
    from device_runtime.bundle.load import Bundle
    from device_runtime.step_backend import StepBackend
    from device_runtime.weights import weight_shapes

    bundle = Bundle(root=root, manifest=m)
    try:
        shapes = weight_shapes(bundle)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        return [f"weights.safetensors: unreadable ({str(exc).splitlines()[0][:200]})"]
    problems = []
    for name in m.trainable_names:
        if name not in shapes:
            problems.append(f"weights.safetensors: trainable tensor '{name}' listed in the manifest is absent")
        elif shapes[name] != tuple(m.tensor(name).shape):
            problems.append(f"weights.safetensors: tensor '{name}' has shape {shapes[name]}, the "
                            f"manifest says {tuple(m.tensor(name).shape)}")
    if problems:
        return problems
    ids, mask, labels = _dummy_batch(m)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    try:
        backend = StepBackend(bundle)
        backend.eval_batch(batch)
        loss = backend.train_step(batch, 1e-4, 0, 0)
    except DeviceError as exc:
        return [str(exc)]
    except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeErrors/Fail
        return [f"{m.step.train_graph if m.step else 'step.onnx'}: one training step failed "
                f"({str(exc).splitlines()[0][:200]})"]
    if not np.isfinite(loss):
        problems.append("step.onnx: one training step gave a non-finite loss")
    return problems


def _training_problems(root: Path, m: Manifest) -> list[str]:
    if m.format == "step":
        return _step_problems(root, m)
    from device_runtime.ort_training import load_training_api

    api = load_training_api()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        shutil.copy(root / "checkpoint", ckpt)  # never touch the bundle's own checkpoint
        try:
            state = api.CheckpointState.load_checkpoint(str(ckpt))
        except Exception as exc:  # noqa: BLE001
            return [f"checkpoint: does not load in ONNX Runtime ({str(exc).splitlines()[0][:200]})"]
        try:
            module = api.Module(str(root / "training_model.onnx"), state, str(root / "eval_model.onnx"))
            optimizer = api.Optimizer(str(root / "optimizer_model.onnx"), module)
        except Exception as exc:  # noqa: BLE001
            return [f"training_model.onnx/eval_model.onnx/optimizer_model.onnx: do not load together "
                    f"({str(exc).splitlines()[0][:200]})"]
        trainable = {}
        for name in m.trainable_names:
            try:
                p = state.parameters[name]
            except Exception:  # noqa: BLE001
                problems.append(f"checkpoint: trainable tensor '{name}' listed in the manifest is absent")
                continue
            trainable[name] = p
            shape = tuple(np.asarray(p.data).shape)
            if shape != tuple(m.tensor(name).shape):
                problems.append(f"checkpoint: tensor '{name}' has shape {shape}, the manifest says "
                                f"{tuple(m.tensor(name).shape)}")
            if not p.requires_grad:
                problems.append(f"checkpoint: tensor '{name}' is frozen but the manifest lists it as trainable")
        if problems:
            return problems
        ids, mask, labels = _dummy_batch(m)
        try:
            module.train()
            loss, _ = module(ids, mask, labels)
            optimizer.step()
        except Exception as exc:  # noqa: BLE001
            return [f"training_model.onnx: one training step failed ({str(exc).splitlines()[0][:200]})"]
        if not np.isfinite(float(loss)):
            problems.append("training_model.onnx: one training step gave a non-finite loss")
    return problems


def check_bundle(bundle_dir: str | Path, deep: bool = True) -> tuple[Manifest | None, list[str]]:
    """All problems found (empty: the bundle is good). ``deep`` loads the graphs and trains one step."""
    root = Path(bundle_dir)
    try:
        m = read_manifest(root)
    except DeviceError as exc:
        return None, [str(exc)]
    problems = bundle_problems(root, m)
    if deep and not problems:
        problems += _graph_io_problems(root, m)
        problems += _training_problems(root, m)
    return m, problems

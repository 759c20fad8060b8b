"""Per-depth training variants of one bundle, for the per-block profiler.

A block's training cost depends on how far backpropagation must reach: the profiler needs, for
each block d, the bundle's model with only block d's tensors (and the head) trainable. Rather than
re-exporting from the Hugging Face model (which a device does not have), a variant is rebuilt from
the bundle itself: the eval graph (forward + loss, parameters as inputs) gets the checkpoint's
values back as initializers, and ONNX Runtime generates training artifacts with a new trainable set.
Needs the ``onnx`` package (a dependency of onnxruntime-training), not torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from device_runtime.bundle.manifest import Manifest


def _forward_with_weights(bundle: Path):
    import onnx
    from onnx import numpy_helper

    from device_runtime.ort_training import load_training_api

    api = load_training_api()
    model = onnx.load(str(bundle / "eval_model.onnx"))
    state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
    values = {name: np.asarray(p.data) for name, p in state.parameters}
    g = model.graph
    keep = [i for i in g.input if i.name not in values]
    for name, arr in values.items():
        g.initializer.append(numpy_helper.from_array(arr, name))
    del g.input[:]
    g.input.extend(keep)
    return model, values


def make_variant(bundle: str | Path, trainable_blocks: list[int], out: str | Path, head: bool = True) -> Manifest:
    """Write training artifacts of ``bundle`` with only ``trainable_blocks`` (+ head) trainable."""
    from onnxruntime.training import artifacts  # noqa: F401  (host side: needs onnx)

    from export.training_artifacts import generate  # same generation path as the exporter

    bundle, out = Path(bundle), Path(out)
    m = Manifest.load(bundle)
    model, values = _forward_with_weights(bundle)
    specs = [t for t in m.trainable
             if (t.block in trainable_blocks) or (t.block is None and (head or t.kind != "head"))]
    if not specs:
        raise ValueError(f"blocks {trainable_blocks} have no trainable tensors in this bundle")
    out.mkdir(parents=True, exist_ok=True)
    generate(model, [t.name for t in specs], out)
    shutil.copy(bundle / "tokenizer.json", out / "tokenizer.json")
    variant = m.model_copy(update={
        "trainable": specs,
        "params_trainable": sum(t.numel for t in specs),
        "block_params": {b: (n if b in trainable_blocks else 0) for b, n in m.block_params.items()},
    })
    variant.dump(out)
    return variant

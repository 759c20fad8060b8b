"""Per-depth training variants of one bundle, for the per-block profiler and the block planner.

A block's training cost depends on how far backpropagation must reach: the profiler needs, for
each block d, the bundle's model with only block d's tensors (and the head) trainable. Rather than
re-exporting from the Hugging Face model (which a device does not have), a variant is rebuilt from
the bundle itself. Step-graph bundles: the step graph loses the outputs of the tensors that become
frozen, their inputs become weights read from ``weights.safetensors`` (where they already are), and
every node no remaining output needs is dropped, so the backward pass stops where the deepest
trainable tensor is. ``ort-training`` bundles: the eval graph gets the checkpoint's values back as
initializers and ONNX Runtime generates training artifacts with the new trainable set.
Needs the ``onnx`` package, not torch.
"""

from __future__ import annotations

import os
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


def _prune(graph) -> None:
    """Drop every node no graph output needs, then the inputs and initializers nothing reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for field in (graph.input, graph.initializer):
        live = [x for x in field if x.name in needed]
        del field[:]
        field.extend(live)


def _freeze(model, names: list[str], bundle: Path, drop_outputs: bool) -> list[str]:
    """Inputs ``names`` become weights read from the bundle's ``weights.safetensors``; with
    ``drop_outputs`` the step outputs that update them go too. Returns the names now external."""
    import onnx
    from onnx.external_data_helper import set_external_data

    from device_runtime.bundle.manifest import WEIGHTS_FILE
    from device_runtime.step_contract import ADAM_M, ADAM_V, NEW
    from device_runtime.weights import safetensors_offsets

    g = model.graph
    where = safetensors_offsets(bundle / WEIGHTS_FILE)
    frozen = set(names)
    if drop_outputs:
        gone = {NEW + p + n for n in names for p in ("", ADAM_M, ADAM_V)}
        live = [o for o in g.output if o.name not in gone]
        del g.output[:]
        g.output.extend(live)
    by_name = {i.name: i for i in g.input}
    for n in names:
        vi = by_name[n]
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        t = onnx.TensorProto(name=n, data_type=vi.type.tensor_type.elem_type, dims=dims, raw_data=b"")
        offset, length = where[n]
        set_external_data(t, location=WEIGHTS_FILE, offset=offset, length=length)
        t.ClearField("raw_data")
        g.initializer.append(t)
    live_inputs = [i for i in g.input if i.name not in frozen]
    del g.input[:]
    g.input.extend(live_inputs)
    _prune(g)
    return [t.name for t in g.initializer if t.name in frozen]


def _link(src: Path, dst: Path) -> None:
    try:  # the same bytes: link rather than copy the model again
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def _make_step_variant(bundle: Path, m: Manifest, specs: list, out: Path) -> Manifest:
    import onnx

    keep = {t.name for t in specs}
    frozen = [n for n in m.trainable_names if n not in keep]
    external = {}
    for graph, drop in ((m.step.train_graph, True), (m.step.eval_graph, False)):
        model = onnx.load(str(bundle / graph), load_external_data=False)
        external[graph] = list(m.step.external.get(graph, [])) + _freeze(model, frozen, bundle, drop)
        onnx.save(model, str(out / graph))
    for name in ("weights.safetensors", "inference.onnx", "tokenizer.json", *m.extras):
        _link(bundle / name, out / name)
    return m.model_copy(update={"step": m.step.model_copy(update={"external": external})})


def make_variant(bundle: str | Path, trainable_blocks: list[int], out: str | Path, head: bool = True) -> Manifest:
    """Write a bundle of ``bundle`` with only ``trainable_blocks`` (+ head) trainable into ``out`` (its
    manifest's ``files`` are the source's: the caller hashes the variant)."""
    bundle, out = Path(bundle), Path(out)
    m = Manifest.load(bundle)
    specs = [t for t in m.trainable
             if (t.block in trainable_blocks) or (t.block is None and (head or t.kind != "head"))]
    if not specs:
        raise ValueError(f"blocks {trainable_blocks} have no trainable tensors in this bundle")
    out.mkdir(parents=True, exist_ok=True)
    update = {
        "trainable": specs,
        "params_trainable": sum(t.numel for t in specs),
        "block_params": {b: (n if b in trainable_blocks else 0) for b, n in m.block_params.items()},
    }
    if m.format == "step":
        variant = _make_step_variant(bundle, m, specs, out).model_copy(update=update)
        variant.dump(out)
        return variant
    from onnxruntime.training import artifacts  # noqa: F401  (host side: needs onnx)

    from export.training_artifacts import generate  # same generation path as the exporter

    model, values = _forward_with_weights(bundle)
    generate(model, [t.name for t in specs], out)
    shutil.copy(bundle / "tokenizer.json", out / "tokenizer.json")
    variant = m.model_copy(update=update)
    variant.dump(out)
    return variant

"""Frozen weights stored in float16 (``--frozen-dtype float16``): half the bundle and half the
device's weight memory, with every computation still in float32.

A 1.1B-class emulator keeps about 400M frozen parameters: 1.6 GB in float32, too much for a 4 GB
board next to its OS. ONNX Runtime's CPU kernels (MatMul, Gemm, ...) are float32, so the graphs keep
computing in float32 and only the *storage* shrinks: each frozen initializer is declared float16
(still external data inside ``weights.safetensors``) and every node that reads it gets its own
``Cast`` to float32, placed right before that node. One cast per use, not one per weight, because a
shared cast's float32 output would live from the forward pass to the backward pass, i.e. all of them
at once: per use, each float32 copy lives for one kernel and the arena reuses its memory.
An embedding lookup (``Gather`` on the table) gathers the float16 rows first and casts only those.
A use reached through layout-only nodes counts too: the traced step's ``Transpose(W)`` feeds the
forward and the backward MatMul, so it is copied per use first (``unshare_views``).

ONNX Runtime would undo this at session creation: constant folding turns ``Cast(initializer)`` into
a float32 initializer, the CPU provider fuses each cast float16 initializer into a float32 one per use,
and common-subexpression elimination merges the per-use casts. The device disables exactly those
optimizers for such bundles (manifest ``frozen_dtype``;
``device_runtime.step_backend.FROZEN_CAST_OPTIMIZERS``); everything else stays at ONNX Runtime's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: storage dtype name (manifest ``frozen_dtype``) -> numpy dtype and ONNX element type
STORAGE = {"float32": (np.float32, onnx.TensorProto.FLOAT), "float16": (np.float16, onnx.TensorProto.FLOAT16)}


def stored_frozen(weights: Iterable[str], parameters: Iterable[str], trainable: Iterable[str]) -> set[str]:
    """The tensors of ``weights`` that the storage dtype applies to: frozen parameters of the base model.
    Not buffers (computed constants such as Llama's rotary ``inv_freq``: a few floats, and rounding
    them shifts every position's angle) and not adapter or head tensors (the LoRA tensors of blocks
    other devices train are replaced by the round's global state at run time, which must not be
    rounded); both stay float32."""
    from export.peft_setup import tensor_kind

    params, train = set(parameters), set(trainable)
    return {n for n in weights if n in params and n not in train and tensor_kind(n) == "other"}


def stored_weights(weights: Mapping[str, np.ndarray], frozen: Iterable[str], dtype: str) -> dict[str, np.ndarray]:
    """``weights`` with the ``frozen`` ones converted to the storage ``dtype`` (trainable stay float32).
    Converted one at a time, each float32 original released as it goes (``weights`` is emptied)."""
    np_dtype = STORAGE[dtype][0]
    frozen = set(frozen)
    out: dict[str, np.ndarray] = {}
    for name in list(weights):
        arr = weights.pop(name)  # type: ignore[attr-defined]
        out[name] = arr.astype(np_dtype) if name in frozen and arr.dtype != np_dtype else arr
    return out


#: layout-only ops: a stored weight may reach its uses through them (the traced step computes ``W.t()``
#: once and uses it in the forward and the backward pass)
_VIEWS = frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def unshare_views(graph: onnx.GraphProto, weights: set[str]) -> int:
    """Give every use of a layout-only node fed by one of ``weights`` (directly or through other such
    nodes) its own copy of that node, placed right before the use. Without it the per-use casts stop
    at the shared node: the traced step's ``Transpose(W)`` feeds the forward and the backward MatMul,
    so its float32 copy of W would live from one to the other, every weight's at once (1.2 GB on the
    1.1B emulator). Returns how many nodes were added."""
    added = 0
    while True:
        nodes = list(graph.node)
        derived, uses = set(weights), {}
        for k, node in enumerate(nodes):
            if node.op_type in _VIEWS and node.input and node.input[0] in derived:
                derived.add(node.output[0])
            for i, name in enumerate(node.input):
                uses.setdefault(name, []).append((k, i))
        outputs = {o.name for o in graph.output}
        shared = [n for n in nodes if n.op_type in _VIEWS and n.input and n.input[0] in derived
                  and len(uses.get(n.output[0], [])) > 1 and n.output[0] not in outputs]
        if not shared:
            return added
        before: dict[int, list[onnx.NodeProto]] = {}  # consumer's index -> clones to place right before it
        for node in shared:
            for j, (k, i) in enumerate(uses[node.output[0]][1:], start=1):
                clone = onnx.NodeProto()
                clone.CopyFrom(node)
                clone.output[0] = f"{node.output[0]}/use{j}"
                clone.name = f"{node.name or node.output[0]}/use{j}"
                nodes[k].input[i] = clone.output[0]
                before.setdefault(k, []).append(clone)
                added += 1
        ordered = []
        for k, node in enumerate(nodes):
            ordered += before.get(k, [])
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)


def cast_per_use(model: onnx.ModelProto, names: Iterable[str], dtype: str) -> int:
    """Declare the named float32 initializers of ``model`` as ``dtype`` and give each use a ``Cast`` to
    float32 (a ``Gather`` from one casts what it gathered). Returns how many casts were inserted."""
    if dtype == "float32":
        return 0
    elem = STORAGE[dtype][1]
    g = model.graph
    inits = {t.name: t for t in g.initializer if t.name in set(names) and t.data_type == onnx.TensorProto.FLOAT}
    for t in inits.values():
        if t.data_location == onnx.TensorProto.EXTERNAL:  # the bytes in weights.safetensors are already dtype
            t.data_type = elem
        else:  # bytes held in the graph: convert them too
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(STORAGE[dtype][0]), t.name))
    unshare_views(g, set(inits))
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in g.node:
        if node.op_type == "Gather" and node.input[0] in inits and node.input[0] not in node.input[1:]:
            gathered = f"{node.output[0]}/{dtype}"
            out = node.output[0]
            node.output[0] = gathered
            nodes += [node, helper.make_node("Cast", [gathered], [out], name=f"{node.name or out}/cast_f32",
                                             to=onnx.TensorProto.FLOAT)]
            count += 1
            continue
        for i, inp in enumerate(node.input):
            if inp in inits:
                cast_out = f"{inp}/f32/{count}"
                nodes.append(helper.make_node("Cast", [inp], [cast_out], name=f"{inp}/cast_f32/{count}",
                                              to=onnx.TensorProto.FLOAT))
                node.input[i] = cast_out
                count += 1
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    for vi in [*g.value_info, *g.input]:  # the old float32 type of an initializer, where recorded
        if vi.name in inits:
            vi.type.tensor_type.elem_type = elem
    return count

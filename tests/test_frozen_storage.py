"""float16 storage of frozen weights (``export/frozen_storage.py``) on a hand-made graph: one cast per
use, an embedding lookup gathers float16 rows before casting, ONNX Runtime computes what the float32
graph with the rounded weights computes, and the device's session options keep the casts (the
optimized graph still holds the float16 initializer, not a folded float32 copy)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from device_runtime.step_backend import FROZEN_CAST_OPTIMIZERS, session_kwargs
from export.frozen_storage import cast_per_use, stored_weights


def _graph(w: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], axis=0),
             helper.make_node("MatMul", ["emb", "W"], ["h"], name="first"),  # [B,3] @ [3,3]
             helper.make_node("MatMul", ["h", "W"], ["y"], name="second")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def test_cast_per_use_matches_rounded_float32(tmp_path):
    w = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    ref = _graph(w.astype(np.float16).astype(np.float32))
    m = _graph(w)
    assert cast_per_use(m, ["W"], "float16") == 3
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["Gather", "Cast", "Cast", "MatMul", "Cast", "MatMul"]  # gathered rows cast; one cast per use
    assert numpy_helper.to_array(m.graph.initializer[0]).dtype == np.float16  # bytes held in the graph: converted
    onnx.checker.check_model(m)
    ids = np.array([2, 0], dtype=np.int64)
    want = ort.InferenceSession(ref.SerializeToString()).run(None, {"ids": ids})[0]

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    manifest = type("M", (), {"frozen_dtype": "float16"})()
    got = ort.InferenceSession(m.SerializeToString(), opts, **session_kwargs(manifest)).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)
    kept = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [t.data_type for t in kept.graph.initializer if t.name == "W"] == [TensorProto.FLOAT16]
    assert sum(n.op_type == "Cast" for n in kept.graph.node) == 3
    assert "ConstantFolding" in FROZEN_CAST_OPTIMIZERS


def test_float32_storage_changes_nothing():
    m = _graph(np.ones((3, 3), dtype=np.float32))
    before = m.SerializeToString()
    assert cast_per_use(m, ["W"], "float32") == 0
    assert m.SerializeToString() == before
    assert session_kwargs(type("M", (), {"frozen_dtype": "float32"})()) == {}


def test_stored_weights_converts_frozen_only():
    weights = {"frozen": np.ones(4, dtype=np.float32), "lora": np.ones(2, dtype=np.float32)}
    out = stored_weights(weights, ["frozen"], "float16")
    assert out["frozen"].dtype == np.float16 and out["lora"].dtype == np.float32
    assert weights == {}  # originals released as they are converted


def test_a_shared_transpose_of_a_weight_is_cast_per_use():
    """The traced step computes W.t() once for the forward and the backward MatMul; each use gets its own
    Transpose and Cast, so no float32 copy of W lives from one to the other; same numbers."""
    w = np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32)

    def graph(arr):
        nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "Wt"], ["h"], name="forward"),
                 helper.make_node("Transpose", ["Wt"], ["Wtt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["h", "Wtt"], ["y"], name="backward")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
                              [numpy_helper.from_array(arr, "W")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 10
        return m

    m = graph(w)
    assert cast_per_use(m, ["W"], "float16") == 2
    onnx.checker.check_model(m)
    consumers: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 and all(consumers[c.output[0]] == 1 for c in casts)
    assert all(consumers[n.output[0]] == 1 for n in m.graph.node if n.op_type == "Transpose")
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    want = ort.InferenceSession(graph(w.astype(np.float16).astype(np.float32)).SerializeToString()).run(
        None, {"x": x})[0]
    manifest = type("M", (), {"frozen_dtype": "float16"})()
    got = ort.InferenceSession(m.SerializeToString(), **session_kwargs(manifest)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)

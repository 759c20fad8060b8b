"""Host side of the aarch64 proof: write what the emulated tests compare against.

``python -m tests.arm.make_fixtures OUT [NAME ...]`` runs on x86 in the main environment (numpy, onnx,
torch available) and writes one directory per fixture under ``OUT`` plus ``OUT/index.json``. The tests
in ``tests/arm`` read them through the ``arm_fixture`` fixture (``arm_fixture("payload")``), under
emulation and natively alike.

To add one (e.g. a tiny step-graph bundle and its x86 losses): write ``@fixture("name") def _(out): ...``
here, writing files into ``out``; a test then asks for ``arm_fixture("name")``.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

FIXTURES: dict[str, Callable[[Path], None]] = {}
OPSET = 18


def fixture(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        FIXTURES[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------ payload

#: what the device would send: LoRA-like tensors and a head, seeded
PAYLOAD_SHAPES = {"encoder.0.lora_A": (8, 32), "encoder.0.lora_B": (32, 8), "head.weight": (2, 32), "head.bias": (2,)}
#: name -> encode_update keywords (besides tensors); "base": True means a delta from the base tensors
PAYLOAD_CASES: dict[str, dict] = {
    "fp32": {"encoding": "fp32"},
    "int8": {"encoding": "int8"},
    "int8-delta": {"encoding": "int8", "base": True},
    "int8-row-topk": {"encoding": "int8-row", "base": True, "topk": 0.25},
    "fp16": {"encoding": "fp16"},
}
PAYLOAD_META = {"bundle_hash": "ab" * 32, "device_id": "pi-1", "round": 3, "samples": 64,
                "metrics": {"train_loss": 0.6931471805599453, "eval_accuracy": 0.8125}}


def payload_tensors() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trained, base) tensors; the same on every machine (seeded)."""
    rng = np.random.default_rng(20261203)
    base = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in PAYLOAD_SHAPES.items()}
    trained = {n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in base.items()}
    return trained, base


def encode_case(case: dict, trained: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> bytes:
    from device_runtime.payload import encode_update

    kw = {k: v for k, v in case.items() if k != "base"}
    return encode_update(trained, base=base if case.get("base") else None, **PAYLOAD_META, **kw)


@fixture("payload")
def _payload(out: Path) -> None:
    from device_runtime.payload import decode_update

    trained, base = payload_tensors()
    np.savez(out / "trained.npz", **trained)
    np.savez(out / "base.npz", **base)
    for name, case in PAYLOAD_CASES.items():
        blob = encode_case(case, trained, base)
        (out / f"{name}.safetensors").write_bytes(blob)
        np.savez(out / f"{name}.decoded.npz", **decode_update(blob).tensors)


# ------------------------------------------------------------------------------------------ ONNX graphs


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None, name: str = "g"):
    from onnx import checker, helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deftkit-arm")
    model.ir_version = 9  # readable by every onnxruntime the kit meets (1.19 on x86, 1.22 emulated)
    checker.check_model(model, full_check=True)
    return model


def mlp_model(rng: np.random.Generator):
    """MatMul + Add + GELU (Erf) + MatMul + Add + Softmax, dynamic batch: a classifier head."""
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    w = {"W1": rng.normal(0, 0.3, (16, 32)), "b1": rng.normal(0, 0.1, (32,)),
         "W2": rng.normal(0, 0.3, (32, 4)), "b2": rng.normal(0, 0.1, (4,)),
         "half": np.array(0.5), "one": np.array(1.0), "inv_sqrt2": np.array(2 ** -0.5)}
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in w.items()]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Mul", ["h1", "inv_sqrt2"], ["g0"]),
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["h1", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("X", f, ["N", 16])],
                  [helper.make_tensor_value_info("probs", f, ["N", 4])], inits, "mlp")


def sgd_step_model():
    """One hand-derived training step of softmax regression: loss, gradient, SGD update, as plain ops.

    loss = mean_n(-sum_k Y log softmax(XW + b)); dW = X^T (P - Y) / N; db = sum_n (P - Y) / N.
    A miniature of the step graph (state in, updated state out) with only ``ai.onnx`` ops.
    """
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=-1),
        helper.make_node("Mul", ["Y", "logp"], ["ylogp"]),
        helper.make_node("ReduceSum", ["ylogp"], ["nll_neg"], keepdims=0, noop_with_empty_axes=0),
        helper.make_node("Shape", ["X"], ["n_i"], start=0, end=1),
        helper.make_node("Cast", ["n_i"], ["n_v"], to=f),
        helper.make_node("Squeeze", ["n_v", "axis0"], ["n"]),
        helper.make_node("Div", ["nll_neg", "n"], ["neg_loss"]),
        helper.make_node("Neg", ["neg_loss"], ["loss"]),
        helper.make_node("Exp", ["logp"], ["p"]),
        helper.make_node("Sub", ["p", "Y"], ["err"]),
        helper.make_node("Div", ["err", "n"], ["g"]),
        helper.make_node("Transpose", ["X"], ["xt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xt", "g"], ["dW"]),
        helper.make_node("ReduceSum", ["g", "axis0"], ["db"], keepdims=0),
        helper.make_node("Mul", ["dW", "lr"], ["stepW"]),
        helper.make_node("Sub", ["W", "stepW"], ["W_new"]),
        helper.make_node("Mul", ["db", "lr"], ["stepb"]),
        helper.make_node("Sub", ["b", "stepb"], ["b_new"]),
    ]
    inputs = [helper.make_tensor_value_info("X", f, ["N", 16]), helper.make_tensor_value_info("Y", f, ["N", 4]),
              helper.make_tensor_value_info("W", f, [16, 4]), helper.make_tensor_value_info("b", f, [4]),
              helper.make_tensor_value_info("lr", f, [])]
    outputs = [helper.make_tensor_value_info("loss", f, []), helper.make_tensor_value_info("W_new", f, [16, 4]),
               helper.make_tensor_value_info("b_new", f, [4])]
    return _model(nodes, inputs, outputs, inits, "sgd_step")


SGD_STEPS = 8


def run_sgd(session, data: dict[str, np.ndarray], steps: int = SGD_STEPS) -> dict[str, np.ndarray]:
    """Chain ``steps`` updates through the step graph, batch ``i % batches`` at step i (the test does the same)."""
    W, b = data["W"], data["b"]
    losses = []
    for i in range(steps):
        j = i % data["X"].shape[0]
        loss, W, b = session.run(None, {"X": data["X"][j], "Y": data["Y"][j], "W": W, "b": b, "lr": data["lr"]})
        losses.append(float(loss))
    return {"losses": np.array(losses, dtype=np.float32), "W": W, "b": b}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@fixture("onnx")
def _onnx(out: Path) -> None:
    import onnx

    rng = np.random.default_rng(7)
    onnx.save(mlp_model(rng), out / "mlp.onnx")
    x = rng.normal(0, 1, (5, 16)).astype(np.float32)
    np.savez(out / "mlp.npz", X=x, probs=_session(out / "mlp.onnx").run(None, {"X": x})[0])

    onnx.save(sgd_step_model(), out / "sgd_step.onnx")
    labels = rng.integers(0, 4, (3, 12))
    data = {"X": rng.normal(0, 1, (3, 12, 16)).astype(np.float32),
            "Y": np.eye(4, dtype=np.float32)[labels],
            "W": rng.normal(0, 0.1, (16, 4)).astype(np.float32), "b": np.zeros(4, dtype=np.float32),
            "lr": np.array(0.5, dtype=np.float32)}
    np.savez(out / "sgd_inputs.npz", **data)
    np.savez(out / "sgd_expected.npz", **run_sgd(_session(out / "sgd_step.onnx"), data))


# ------------------------------------------------------------------------------------------ main


def host_info() -> dict:
    import onnxruntime

    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__}


# ------------------------------------------------------------------------------------------ step graph

#: the batches both sides train on: (input_ids, attention_mask, labels), seeded
STEP_BATCHES, STEP_BATCH, STEP_SEQ, STEP_LR = 4, 4, 12, 1e-2


def step_batches(n: int = STEP_BATCHES) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        ids = rng.integers(1000, 2000, (STEP_BATCH, STEP_SEQ)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[-1, STEP_SEQ // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": (np.arange(STEP_BATCH) % 2).astype(np.int64)})
    return out


def train_losses(bundle: Path) -> list[float]:
    """The losses of ``STEP_BATCHES`` steps of the step graph on ``step_batches()`` (device runtime)."""
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle

    backend = make_backend(load_bundle(bundle))
    return [backend.train_step(b, STEP_LR, i, 0) for i, b in enumerate(step_batches())]


@fixture("step_bundle")
def _step_bundle(out: Path) -> None:
    """A tiny BERT step-graph bundle exported here (x86, torch) and its x86 losses."""
    from tests._models import DEVICE_BUNDLE_OPTIONS, cached_bundle, tiny_model_path

    # from the shared test cache (exported once per CI run); its model stays there, where the bundle's
    # manifest names it: the edge coordinator plugs the trained tensors into it to score each round
    bundle = cached_bundle(tiny_model_path("bert"), **DEVICE_BUNDLE_OPTIONS["bert"])
    shutil.copytree(bundle, out / "bundle")
    losses = train_losses(out / "bundle")
    (out / "losses.json").write_text(json.dumps({"machine": platform.machine(), "losses": losses}))


def make(out: Path, names: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names or list(FIXTURES):
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        FIXTURES[name](d)
        made.append(name)
    index = {"fixtures": made, "host": host_info()}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tests.arm.make_fixtures OUT [NAME ...]", file=sys.stderr)
        return 2
    unknown = sorted(set(args[1:]) - set(FIXTURES))
    if unknown:
        print(f"error: unknown fixture(s) {', '.join(unknown)}; known: {', '.join(FIXTURES)}", file=sys.stderr)
        return 2
    index = make(Path(args[0]), args[1:])
    print(f"fixtures {', '.join(index['fixtures'])} written to {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""(d) standard ONNX graphs built on the host run in the device's onnxruntime with the host's results:
a classifier head, and a hand-written training step (loss, gradient, SGD update) chained 8 times."""

from __future__ import annotations

import numpy as np

from tests.arm.make_fixtures import SGD_STEPS, run_sgd

ATOL = 1e-5


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_classifier_graph_matches_the_host(arm_fixture):
    d = arm_fixture("onnx")
    ref = np.load(d / "mlp.npz")
    probs = _session(d / "mlp.onnx").run(None, {"X": ref["X"]})[0]
    assert probs.shape == ref["probs"].shape
    np.testing.assert_allclose(probs, ref["probs"], rtol=0, atol=ATOL)


def test_training_step_graph_matches_the_host(arm_fixture):
    d = arm_fixture("onnx")
    data = dict(np.load(d / "sgd_inputs.npz"))
    ref = np.load(d / "sgd_expected.npz")
    got = run_sgd(_session(d / "sgd_step.onnx"), data)
    assert got["losses"].shape == (SGD_STEPS,) and got["losses"][-1] < got["losses"][0]
    for key in ("losses", "W", "b"):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=ATOL, err_msg=key)

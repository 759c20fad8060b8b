"""The bundle's inference graph carries no weights of its own: they come from the checkpoint at load
time (the bundle ships them once). Its logits equal the eval graph's, before and after training."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from device_runtime.backends import make_backend
from device_runtime.bundle.load import load_bundle
from device_runtime.data import batch_indices, load_dataset
from device_runtime.errors import BundleError
from device_runtime.inference import inference_session
from tests._models import SST2_TRAIN, SST2_VALIDATION


def _logits(sess, batch):
    return sess.run(None, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]


@pytest.mark.parametrize("which", ["tiny_bert_bundle", "minilm_bundle"])
def test_weightless_inference_graph_matches_the_eval_graph_before_and_after_training(which, request):
    b = load_bundle(request.getfixturevalue(which))
    m = b.manifest
    graph = onnx.load(str(b.root / "inference.onnx"), load_external_data=False)
    weights = [t for t in graph.graph.initializer if t.name in set(m.inference_external)]
    assert len(weights) == len(m.inference_external) > 0
    assert all(not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    # the graph file is tiny next to the weights file that holds the weights
    assert (b.root / "inference.onnx").stat().st_size < 0.05 * (b.root / "weights.safetensors").stat().st_size

    ev = load_dataset(SST2_VALIDATION, m, b.tokenizer, limit=16)
    eb = ev.batch(np.arange(16))
    backend = make_backend(b, "ort")
    np.testing.assert_allclose(_logits(inference_session(b.root, m), eb), backend.logits(eb), atol=1e-5)

    ds = load_dataset(SST2_TRAIN, m, b.tokenizer, limit=64)
    for step in range(4):
        backend.train_step(ds.batch(batch_indices(len(ds), 16, 0, step)), 1e-2, step, 0)
    trained = backend.get_tensors()
    got = _logits(inference_session(b.root, m, tensors=trained), eb)
    np.testing.assert_allclose(got, backend.logits(eb), atol=1e-5)
    assert not np.allclose(got, _logits(inference_session(b.root, m), eb), atol=1e-4)  # training changed them


def test_wrong_trained_tensors_and_a_lone_graph_are_refused(tiny_bert_bundle, tmp_path):
    b = load_bundle(tiny_bert_bundle)
    name = b.manifest.trainable_names[0]
    with pytest.raises(BundleError, match="shape"):
        inference_session(b.root, b.manifest, tensors={name: np.zeros((3, 3), np.float32)})
    with pytest.raises(BundleError, match="not a weight"):
        inference_session(b.root, b.manifest, tensors={"nope": np.zeros(3, np.float32)})
    # the graph alone (without the bundle's weights file) does not silently run
    import onnxruntime

    (tmp_path / "inference.onnx").write_bytes((b.root / "inference.onnx").read_bytes())
    with pytest.raises(Exception, match="weights.safetensors"):
        onnxruntime.InferenceSession(str(tmp_path / "inference.onnx"), providers=["CPUExecutionProvider"])

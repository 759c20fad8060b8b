"""``deft export --format ort-training``: ONNX Runtime training artifacts, trained by the training-API
backend, for runtimes that have it (the 1.19.2 Python, C/C++ and Android training builds)."""

from __future__ import annotations

import numpy as np

from device_runtime.backends import make_backend
from device_runtime.bundle.check import check_bundle
from device_runtime.bundle.load import load_bundle
from device_runtime.inference import inference_session
from device_runtime.ort_backend import OrtBackend
from export import ExportConfig, build_peft_model, export_bundle
from export.loading import load_model
from tests._models import make_tiny_model
from tests._ort import EagerTrainer, batches

TOL = 1e-5


def test_ort_training_bundle_trains_like_pytorch_eager(tmp_path):
    src = make_tiny_model("bert", tmp_path / "bert")
    opts = dict(task="seq-cls", num_labels=2, max_length=32)
    man = export_bundle(str(src), tmp_path / "b", format="ort-training", **opts)
    assert man.format == "ort-training" and man.step is None
    assert {"training_model.onnx", "optimizer_model.onnx", "checkpoint"} <= set(man.files)
    _, problems = check_bundle(tmp_path / "b")
    assert problems == []

    bundle = load_bundle(tmp_path / "b")
    backend = make_backend(bundle)
    assert isinstance(backend, OrtBackend)
    cfg = ExportConfig(**opts)
    model, arch = load_model(str(src), cfg)
    eager = EagerTrainer(build_peft_model(model, arch, cfg)[0], man, lr=1e-3)
    data = batches(man, (tmp_path / "b" / "tokenizer.json").read_text(), 4)
    ort_losses, eager_losses = [], []
    for i in range(20):
        ids, mask, lab = data[i % 4]
        ort_losses.append(backend.train_step({"input_ids": ids, "attention_mask": mask, "labels": lab}, 1e-3, i, 0))
        eager_losses.append(eager.step(ids, mask, lab))
    np.testing.assert_allclose(ort_losses, eager_losses, atol=TOL, rtol=0)
    assert ort_losses[-1] < ort_losses[0]
    trained, ref = backend.get_tensors(), eager.tensors()
    for n in man.trainable_names:
        np.testing.assert_allclose(trained[n], ref[n], atol=TOL, rtol=0, err_msg=n)

    # the inference graph takes its weights from the checkpoint here
    sess = inference_session(tmp_path / "b", man, tensors=trained)
    ids, mask, _ = data[0]
    logits = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(logits, backend.logits({"input_ids": ids, "attention_mask": mask}), atol=TOL)

"""The torch backend (``model.pt2`` + autograd, no transformers/peft) against the ORT backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from device_runtime.backends import make_backend
from device_runtime.bundle.load import load_bundle
from device_runtime.data import batch_indices, load_dataset
from device_runtime.errors import BundleError
from device_runtime.train import TrainConfig, train
from tests._models import REPO, SST2_TRAIN, SST2_VALIDATION

pytest_plugins = ["tests._device_fixtures"]  # bundles shared by the device tests


def test_both_backends_follow_the_same_loss_curve(tiny_pt2_bundle):
    b = load_bundle(tiny_pt2_bundle)
    ds = load_dataset(SST2_TRAIN, b.manifest, b.tokenizer, limit=160)
    ev = load_dataset(SST2_VALIDATION, b.manifest, b.tokenizer, limit=64)
    runs = {name: train(b, ds, TrainConfig(steps=20, batch_size=8, lr=1e-2, schedule="linear", progress=False,
                                           backend=name), ev)
            for name in ("ort", "torch")}
    ort, pt = runs["ort"], runs["torch"]
    assert pt.report["backend"] == "torch" and len(pt.report["train_loss"]) == 20
    for n in ort.start_tensors:  # same starting point: model.pt2 and the ORT checkpoint agree
        np.testing.assert_array_equal(pt.start_tensors[n], ort.start_tensors[n])
    np.testing.assert_allclose(pt.report["train_loss"], ort.report["train_loss"], rtol=1e-4, atol=1e-5)
    for n in ort.tensors:
        np.testing.assert_allclose(pt.tensors[n], ort.tensors[n], rtol=1e-3, atol=1e-5, err_msg=n)
    assert not np.allclose(ort.tensors[n], ort.start_tensors[n])
    assert abs(pt.report["eval_accuracy"] - ort.report["eval_accuracy"]) <= 1 / 64


def test_torch_checkpoint_resumes_exactly(tiny_pt2_bundle, tmp_path):
    b = load_bundle(tiny_pt2_bundle)
    ds = load_dataset(SST2_TRAIN, b.manifest, b.tokenizer, limit=64)
    batches = [ds.batch(batch_indices(len(ds), 8, 0, s)) for s in range(6)]
    a = make_backend(b, "torch")
    for s in range(3):
        a.train_step(batches[s], 1e-2, s, 0)
    a.save(tmp_path / "state.ckpt")
    resumed = make_backend(b, "torch", checkpoint=tmp_path / "state.ckpt")
    for s in range(3, 6):
        la = a.train_step(batches[s], 1e-2, s, 0)
        lb = resumed.train_step(batches[s], 1e-2, s, 0)
        assert la == lb
    ta, tb = a.get_tensors(), resumed.get_tensors()
    assert all(np.array_equal(ta[n], tb[n]) for n in ta)


def test_bundle_without_program_is_refused(tiny_bert_bundle):
    with pytest.raises(BundleError, match="no model.pt2"):
        make_backend(load_bundle(tiny_bert_bundle), "torch")


def test_torch_backend_needs_no_transformers_or_peft(tiny_pt2_bundle, tmp_path):
    """Block transformers/peft/onnxruntime imports: the torch backend still trains via the CLI."""
    out = tmp_path / "u.safetensors"
    code = (
        "import sys\n"
        "for m in ('transformers', 'peft', 'onnx', 'onnxruntime'):\n"
        "    sys.modules[m] = None\n"
        "from deftkit.cli import main\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", code, "device", "train", "--bundle", str(tiny_pt2_bundle), "--data", str(SST2_TRAIN),
           "--eval-data", str(SST2_VALIDATION), "--limit", "48", "--backend", "torch", "--encoding", "int8",
           "--out", str(out), "--json", "--no-progress"]
    r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["backend"] == "torch" and rep["samples"] == 48 and rep["payload_bytes"] == out.stat().st_size

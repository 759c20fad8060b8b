"""The device runtime in an environment with only the ``device`` extra: no torch anywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SST2_TRAIN = REPO / "data" / "sst2" / "train.tsv"
SST2_VALIDATION = REPO / "data" / "sst2" / "validation.tsv"
HOST_ONLY = ("torch", "transformers", "peft")


@pytest.mark.skipif(os.environ.get("DEFT_DEVICE_ONLY") != "1", reason="only meaningful in the device-only venv")
def test_host_packages_are_not_installed():
    present = [m for m in HOST_ONLY if importlib.util.find_spec(m) is not None]
    assert present == [], f"the device environment has host packages installed: {present}"
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    with pytest.raises(ImportError):
        import onnxruntime.training  # noqa: F401  (plain onnxruntime: no training build)
    import onnxruntime

    assert tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) >= (1, 20)


def _newly_imported(before: set[str], names=(*HOST_ONLY, "onnx")) -> list[str]:
    """Host packages imported since ``before`` (in the main venv other tests may have loaded them)."""
    return [m for m in names if m in sys.modules and m not in before]


def test_training_and_payload_in_process_import_no_torch(device_bundle):
    before = set(sys.modules)
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.payload import decode_update, encode_update
    from device_runtime.predict import predict_proba
    from device_runtime.state import apply_global_state
    from device_runtime.train import TrainConfig, train

    b = load_bundle(device_bundle)
    ds = load_dataset(SST2_TRAIN, b.manifest, b.tokenizer, limit=64)
    ev = load_dataset(SST2_VALIDATION, b.manifest, b.tokenizer, limit=32)
    r = train(b, ds, TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False), ev)
    assert len(r.report["train_loss"]) == 4 and 0 <= r.report["eval_accuracy"] <= 1
    blob = encode_update(r.tensors, bundle_hash=b.hash, device_id="pi", encoding="int8", base=r.start_tensors)
    full = decode_update(blob, bundle_hash=b.hash).full_tensors(r.start_tensors)
    apply_global_state(r.backend, full)
    p = predict_proba(r.backend, ev)
    assert p.shape == (32, 2) and np.allclose(p.sum(-1), 1, atol=1e-5)
    leaked = _newly_imported(before)
    assert leaked == [], f"device runtime imported {leaked}"


def test_deft_device_train_exact_form(device_bundle, tmp_path):
    out = tmp_path / "update.safetensors"
    cmd = [sys.executable, "-c", "from deftkit.cli import main; main()", "device", "train", "--bundle",
           str(device_bundle), "--data", str(SST2_TRAIN), "--eval-data", str(SST2_VALIDATION), "--epochs", "1",
           "--encoding", "int8", "--out", str(out), "--json", "--limit", "96"]
    r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["samples"] == 96 and len(rep["train_loss"]) == 6 and rep["eval_rows"] == 872
    assert rep["payload_bytes"] == out.stat().st_size and rep["median_step_s"] > 0 and rep["peak_rss_mb"] > 0
    bad = subprocess.run(cmd[:6] + [str(device_bundle), "--data", str(tmp_path / "missing.tsv")], check=False,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "missing.tsv" in bad.stderr


def test_causal_lm_bundle_trains(device_lm_bundle, tmp_path):
    before = set(sys.modules)
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.train import TrainConfig, train

    b = load_bundle(device_lm_bundle)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(line.split("\t")[0] for line in SST2_TRAIN.read_text().splitlines()[1:33]))
    ds = load_dataset(text, b.manifest, b.tokenizer)
    r = train(b, ds, TrainConfig(epochs=3, batch_size=8, lr=1e-2, schedule="constant", progress=False))
    losses = r.report["train_loss"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert _newly_imported(before) == []

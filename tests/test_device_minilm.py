"""Issue 3 acceptance on the real MiniLM bundle (LoRA r=8 on query,value + head).

One training run per session (4,000 SST-2 rows, 1 epoch, batch 16, max length 64, lr 1e-3, linear
decay), shared by the checks below; evaluated on the 872-sentence GLUE SST-2 validation set.
"""

from __future__ import annotations

import pytest

from device_runtime.bundle.load import load_bundle
from device_runtime.data import load_dataset
from device_runtime.evaluate import evaluate
from device_runtime.payload import decode_update, encode_update
from device_runtime.train import TrainConfig, train
from tests._models import SST2_TRAIN, SST2_VALIDATION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def minilm_trained(minilm_bundle):
    b = load_bundle(minilm_bundle)
    ds = load_dataset(SST2_TRAIN, b.manifest, b.tokenizer, limit=4000)
    ev = load_dataset(SST2_VALIDATION, b.manifest, b.tokenizer)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, schedule="linear", seed=0, progress=False)
    result = train(b, ds, cfg, ev)
    return b, ev, result


def test_minilm_reaches_80_percent(minilm_trained):
    b, ev, r = minilm_trained
    rep = r.report
    assert b.manifest.max_length == 64 and rep["steps"] == 250 and rep["samples"] == 4000
    assert rep["eval_rows"] == 872
    assert rep["train_loss"][-1] < rep["train_loss"][0]
    assert rep["eval_accuracy"] >= 0.80, rep["eval_accuracy"]


def test_minilm_int8_payload_is_small_and_accurate(minilm_trained):
    b, ev, r = minilm_trained
    fp32_acc = r.report["eval_accuracy"]
    results = {}
    for enc in ("fp32", "fp16", "int8"):
        blob = encode_update(r.tensors, bundle_hash=b.hash, device_id="d0", round=0, samples=4000,
                             metrics={"eval_accuracy": fp32_acc}, encoding=enc)
        tensors = decode_update(blob, bundle_hash=b.hash).tensors
        r.backend.set_tensors(tensors)
        results[enc] = (len(blob), evaluate(r.backend, ev)["accuracy"])
    r.backend.set_tensors(r.tensors)
    print("payload bytes / accuracy per encoding:", results)
    assert results["fp32"][1] == pytest.approx(fp32_acc, abs=1e-9)  # exact decode
    assert results["int8"][0] <= 80_000
    assert abs(results["int8"][1] - fp32_acc) <= 0.003
    assert abs(results["fp16"][1] - fp32_acc) <= 0.003

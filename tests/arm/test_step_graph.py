"""The step graph trains under plain onnxruntime on aarch64 (emulated under ``make test-arm``) with the
losses the x86 host computed for the same bundle and batches, and its update round-trips."""

from __future__ import annotations

import json

import numpy as np

from tests.arm.make_fixtures import train_losses


def test_step_graph_losses_match_x86(arm_fixture):
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle
    from device_runtime.payload import decode_update, encode_update
    from tests.arm.make_fixtures import STEP_LR, step_batches

    d = arm_fixture("step_bundle")
    x86 = json.loads((d / "losses.json").read_text())["losses"]
    here = train_losses(d / "bundle")
    np.testing.assert_allclose(here, x86, atol=1e-4, rtol=0)
    assert here[-1] < here[0]

    bundle = load_bundle(d / "bundle")
    backend = make_backend(bundle)
    start = backend.get_tensors()
    backend.train_step(step_batches(1)[0], STEP_LR, 0, 0)
    trained = backend.get_tensors()
    blob = encode_update(trained, bundle_hash=bundle.hash, device_id="pi-1", encoding="fp32", base=start)
    back = decode_update(blob, bundle_hash=bundle.hash).full_tensors(start)
    for name, value in trained.items():
        np.testing.assert_allclose(back[name], value, atol=1e-6, rtol=0, err_msg=name)

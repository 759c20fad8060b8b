"""(c) update payloads are the same bytes on aarch64 as on x86: what the device encodes is exactly what
the host's encoder writes for the same tensors, and the host's payloads decode to the same values."""

from __future__ import annotations

import numpy as np
import pytest

from tests.arm.make_fixtures import PAYLOAD_CASES, encode_case


@pytest.fixture(scope="module")
def host_payloads(arm_fixture):
    d = arm_fixture("payload")
    trained, base = np.load(d / "trained.npz"), np.load(d / "base.npz")
    return d, {k: trained[k] for k in trained.files}, {k: base[k] for k in base.files}


@pytest.mark.parametrize("case", list(PAYLOAD_CASES))
def test_payload_bytes_match_the_hosts(host_payloads, case):
    from device_runtime.payload import decode_update

    d, trained, base = host_payloads
    host_blob = (d / f"{case}.safetensors").read_bytes()
    blob = encode_case(PAYLOAD_CASES[case], trained, base)
    assert blob == host_blob, f"{case}: {len(blob)} bytes here, {len(host_blob)} on the host, contents differ"
    host_decoded = np.load(d / f"{case}.decoded.npz")
    here = decode_update(host_blob, bundle_hash="ab" * 32)
    assert sorted(here.tensors) == sorted(host_decoded.files)
    for name, value in here.tensors.items():
        assert value.dtype == np.float32 and np.array_equal(value, host_decoded[name]), f"{case}: {name} differs"
    if PAYLOAD_CASES[case].get("base"):
        full = here.full_tensors(base)
        assert all(full[n].shape == trained[n].shape for n in trained)

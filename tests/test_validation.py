"""Update validation: one typed reason per way an update can be wrong; real payloads from device_runtime."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.bundle.manifest import TensorSpec
from device_runtime.payload import encode_update
from edge_broker.validation import RejectReason, UpdateRules, validate_payload, validate_update

BUNDLE = "b" * 64
SPECS = [TensorSpec(name="encoder.layer.0.q.lora_A", shape=(8, 16), kind="lora_A", block=0),
         TensorSpec(name="encoder.layer.0.q.lora_B", shape=(16, 8), kind="lora_B", block=0),
         TensorSpec(name="classifier.weight", shape=(2, 16), kind="head")]


def _rules(**kw) -> UpdateRules:
    return UpdateRules(**{"devices": {"dev1", "dev2"}, "round": 3, "bundle_hash": BUNDLE, "specs": SPECS, **kw})


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}


def _check(tensors=None, **kw):
    args = {"device": "dev1", "round": 3, "bundle_hash": BUNDLE, "tensors": tensors or _tensors(), "samples": 100}
    args.update(kw)
    return validate_update(_rules(), **args)


def test_a_good_update_passes():
    assert _check() is None


@pytest.mark.parametrize("kw, reason, words", [
    ({"device": "intruder"}, RejectReason.UNKNOWN_DEVICE, "intruder"),
    ({"round": 2}, RejectReason.WRONG_ROUND, "round 2"),
    ({"bundle_hash": "c" * 64}, RejectReason.WRONG_BUNDLE, "cccccccccccc"),
    ({"samples": 0}, RejectReason.BAD_SAMPLES, "samples=0"),
    ({"samples": 10**12}, RejectReason.BAD_SAMPLES, "1.."),
    ({"payload_bytes": 10**9}, RejectReason.TOO_LARGE, "limit"),
])
def test_identity_and_size_rejections(kw, reason, words):
    rej = _check(**kw)
    assert rej is not None and rej.reason is reason and words in str(rej)


def test_tensor_rejections_name_the_tensor():
    t = _tensors()
    t.pop("classifier.weight")
    assert _check(t).reason is RejectReason.MISSING_TENSOR and "classifier.weight" in _check(t).detail
    t = _tensors() | {"encoder.layer.5.k.lora_A": np.zeros((8, 16), np.float32)}
    assert _check(t).reason is RejectReason.UNEXPECTED_TENSOR
    t = _tensors() | {"classifier.weight": np.zeros((3, 16), np.float32)}
    rej = _check(t)
    assert rej.reason is RejectReason.WRONG_SHAPE and "(3, 16)" in rej.detail and "(2, 16)" in rej.detail
    t = _tensors() | {"classifier.weight": np.zeros((2, 16), np.float64)}
    assert _check(t).reason is RejectReason.WRONG_DTYPE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    t = _tensors()
    t["encoder.layer.0.q.lora_B"][3, 2] = bad
    rej = _check(t)
    assert rej.reason is RejectReason.NON_FINITE and "1 NaN/Inf" in rej.detail


def test_subset_allowed_per_device_specs():
    rules = _rules(allow_subset=True, device_specs={"dev2": SPECS[:2]})
    only_head = {"classifier.weight": _tensors()["classifier.weight"]}
    assert validate_update(rules, device="dev1", round=3, bundle_hash=BUNDLE, tensors=only_head, samples=5) is None
    rej = validate_update(rules, device="dev2", round=3, bundle_hash=BUNDLE, tensors=only_head, samples=5)
    assert rej.reason is RejectReason.UNEXPECTED_TENSOR  # dev2 was not assigned the head
    assert validate_update(rules, device="dev1", round=3, bundle_hash=BUNDLE, tensors={}, samples=5).reason \
        is RejectReason.MISSING_TENSOR


def test_real_payloads_decode_and_validate():
    blob = encode_update(_tensors(), bundle_hash=BUNDLE, device_id="dev1", round=3, samples=64, encoding="int8",
                         base=_tensors(1))
    ok, rej = validate_payload(_rules(), blob, sender="dev1", round=3)
    assert rej is None and ok.samples == 64 and ok.is_delta
    np.testing.assert_allclose(ok.tensors["classifier.weight"],
                               _tensors()["classifier.weight"] - _tensors(1)["classifier.weight"],
                               atol=0.05)


@pytest.mark.parametrize("mutate, sender, reason", [
    (lambda b: b[: len(b) // 2], "dev1", RejectReason.MALFORMED),                      # truncated
    (lambda b: b[:-3] + bytes([b[-3] ^ 1]) + b[-2:], "dev1", RejectReason.MALFORMED),   # tampered
    (lambda b: b, "dev2", RejectReason.DEVICE_MISMATCH),                                # replayed by another login
    (lambda b: b, "mallory", RejectReason.UNKNOWN_DEVICE),
])
def test_bad_payloads_get_typed_reasons(mutate, sender, reason):
    blob = encode_update(_tensors(), bundle_hash=BUNDLE, device_id="dev1", round=3, samples=64)
    ok, rej = validate_payload(_rules(), mutate(blob), sender=sender, round=3)
    assert ok is None and rej.reason is reason, rej


def test_payload_with_wrong_shape_bundle_or_round():
    t = _tensors() | {"classifier.weight": np.zeros((4, 16), np.float32)}
    blob = encode_update(t, bundle_hash=BUNDLE, device_id="dev1", round=3, samples=8)
    assert validate_payload(_rules(), blob, sender="dev1")[1].reason is RejectReason.WRONG_SHAPE
    blob = encode_update(_tensors(), bundle_hash="e" * 64, device_id="dev1", round=3, samples=8)
    assert validate_payload(_rules(), blob, sender="dev1")[1].reason is RejectReason.WRONG_BUNDLE
    blob = encode_update(_tensors(), bundle_hash=BUNDLE, device_id="dev1", round=2, samples=8)
    assert validate_payload(_rules(), blob, sender="dev1", round=3)[1].reason is RejectReason.WRONG_ROUND
    assert validate_payload(_rules(max_bytes=100), blob, sender="dev1")[1].reason is RejectReason.TOO_LARGE

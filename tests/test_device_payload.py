"""Update payloads: exact fp32, bounded fp16/int8, delta, top-k, and refusal of damaged blobs."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from device_runtime.errors import PayloadError
from device_runtime.payload import (
    ENCODINGS,
    apply_delta,
    decode_update,
    encode_update,
    max_decode_error,
    read_meta,
)

BUNDLE = "ab" * 32


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "base_model.model.encoder.layer.0.query.lora_A.default.weight": rng.standard_normal((8, 48)).astype(np.float32),
        "base_model.model.encoder.layer.0.query.lora_B.default.weight":
            (rng.standard_normal((48, 8)) * np.linspace(0.01, 3, 48)[:, None]).astype(np.float32),
        "base_model.model.classifier.modules_to_save.default.bias": rng.standard_normal(2).astype(np.float32),
    }


def _encode(t, **kw):
    return encode_update(t, bundle_hash=BUNDLE, device_id="pi-7", round=3, samples=4000,
                         metrics={"eval_accuracy": 0.81, "train_loss": [0.7, 0.5]}, **kw)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_roundtrip_error_is_bounded(encoding):
    t = _tensors()
    u = decode_update(_encode(t, encoding=encoding), bundle_hash=BUNDLE)
    assert u.meta.encoding == encoding and u.meta.kind == "full" and u.meta.device_id == "pi-7"
    assert u.meta.round == 3 and u.meta.samples == 4000 and u.meta.metrics["eval_accuracy"] == 0.81
    for n, x in t.items():
        assert u.tensors[n].dtype == np.float32 and u.tensors[n].shape == x.shape
        err = float(np.abs(u.tensors[n] - x).max())
        assert err <= max_decode_error(x, encoding), (n, err)
        if encoding == "fp32":
            assert np.array_equal(u.tensors[n], x)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_strided_views_encode_their_elements(encoding):
    """A sliced (non-contiguous) tensor is sent as its elements, not its parent's buffer."""
    parent = _tensors()
    t = {n: x[..., ::2] if x.ndim > 1 else x[::2] for n, x in parent.items()}
    assert not all(x.flags["C_CONTIGUOUS"] for x in t.values())
    u = decode_update(_encode(t, encoding=encoding), bundle_hash=BUNDLE)
    for n, x in t.items():
        assert float(np.abs(u.tensors[n] - x).max()) <= max_decode_error(np.ascontiguousarray(x), encoding), n


def test_sizes_shrink_and_per_row_helps_uneven_rows():
    t = _tensors()
    sizes = {e: len(_encode(t, encoding=e)) for e in ENCODINGS}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    b = "base_model.model.encoder.layer.0.query.lora_B.default.weight"
    err = {e: np.abs(decode_update(_encode(t, encoding=e)).tensors[b] - t[b]).mean() for e in ("int8", "int8-row")}
    assert err["int8-row"] < err["int8"] / 2


def test_delta_and_topk():
    base, trained = _tensors(0), _tensors(1)
    u = decode_update(_encode(trained, encoding="fp32", base=base))
    assert u.meta.kind == "delta"
    full = u.full_tensors(base)
    assert all(np.allclose(full[n], trained[n], atol=1e-6) for n in trained)
    with pytest.raises(PayloadError, match="delta"):
        u.full_tensors()
    np.testing.assert_allclose(apply_delta(u.tensors, base)[next(iter(base))], trained[next(iter(base))], atol=1e-6)

    delta = {n: trained[n] - base[n] for n in base}
    sparse = decode_update(_encode(trained, encoding="fp32", base=base, topk=0.1))
    for n, d in delta.items():
        got = sparse.tensors[n]
        k = max(1, int(d.size * 0.1 + 0.5))
        assert np.count_nonzero(got) == k
        kept = np.abs(d).reshape(-1)[np.flatnonzero(got.reshape(-1))]
        assert kept.min() >= np.sort(np.abs(d).reshape(-1))[-k] - 1e-7  # the largest entries were kept
        np.testing.assert_array_equal(got[got != 0], d[got != 0])
    q = decode_update(_encode(trained, encoding="int8-row", base=base, topk=0.25))
    assert q.meta.topk == 0.25 and all(q.tensors[n].shape == base[n].shape for n in base)


def test_truncated_payload_is_refused_at_every_cut():
    blob = _encode(_tensors(), encoding="int8")
    for cut in (0, 5, 8, 100, len(blob) // 2, len(blob) - 1):
        with pytest.raises(PayloadError, match="truncated"):
            decode_update(blob[:cut])


def test_tampered_payload_is_refused():
    blob = bytearray(_encode(_tensors(), encoding="fp32"))
    blob[-3] ^= 0x01  # one bit in the last tensor
    with pytest.raises(PayloadError, match="does not match its sha256"):
        decode_update(bytes(blob))
    # a header edit (e.g. inflating the sample count) is caught as well
    good = _encode(_tensors(), encoding="fp32")
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    meta = json.loads(header["__metadata__"]["deftkit"])
    meta["samples"] = 10**9
    header["__metadata__"]["deftkit"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    forged = struct.pack("<Q", len(hb)) + hb + good[8 + n:]
    assert read_meta(forged).samples == 10**9
    with pytest.raises(PayloadError, match="sha256"):
        decode_update(forged)


def test_other_blobs_and_bad_arguments():
    from safetensors.numpy import save

    plain = save({"x": np.zeros(3, np.float32)})
    with pytest.raises(PayloadError, match="not a deftkit update"):
        decode_update(plain)
    with pytest.raises(PayloadError, match="made for bundle"):
        decode_update(_encode(_tensors()), bundle_hash="cd" * 32)
    with pytest.raises(PayloadError, match="unknown encoding"):
        _encode(_tensors(), encoding="int4")
    with pytest.raises(PayloadError, match="NaN"):
        _encode({"a": np.array([np.nan], np.float32)})
    with pytest.raises(PayloadError, match="top-k"):
        _encode(_tensors(), topk=1.5)
    with pytest.raises(PayloadError, match="fp16 range"):
        _encode({"a": np.array([1e6], np.float32)}, encoding="fp16")

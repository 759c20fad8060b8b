"""Envelope framing: round trip, and every corruption is detected and named."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.protocol.envelope import MAGIC, Envelope, make_ack
from device_runtime.protocol.errors import EnvelopeError, HashMismatch, TruncatedEnvelope, UnsupportedVersion


def _env(body: bytes = b"\x00\x01safetensors-ish" * 50) -> Envelope:
    return Envelope.build("update", sender="dev1", fleet="lab", round=4, body=body, content="safetensors",
                          meta={"samples": 128, "bundle": "ab" * 32})


def test_round_trip_keeps_header_and_body():
    e = _env()
    d = Envelope.decode(e.encode())
    assert d.body == e.body
    assert d.header == e.header
    assert d.header.meta["samples"] == 128 and d.header.round == 4 and d.header.length == len(e.body)
    assert len(e.encode()) == e.encoded_size


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096))
def test_any_body_round_trips_and_any_cut_is_truncation(body):
    raw = Envelope.build("bundle", sender="edge", fleet="lab", body=body).encode()
    assert Envelope.decode(raw).body == body
    for cut in {0, 3, 7, len(raw) // 2, len(raw) - 1}:
        if cut < len(raw) and (cut < len(raw) - len(body) or body):
            with pytest.raises(TruncatedEnvelope):
                Envelope.decode(raw[:cut])


def test_flipped_body_byte_is_a_hash_mismatch():
    raw = bytearray(_env().encode())
    raw[-10] ^= 0x01
    with pytest.raises(HashMismatch, match="from dev1.*sha256 check"):
        Envelope.decode(bytes(raw))


def test_body_swapped_for_same_length_other_body_is_detected():
    a, b = _env(b"A" * 100), _env(b"B" * 100)
    raw = a.encode()[: -100] + b.body
    with pytest.raises(HashMismatch):
        Envelope.decode(raw)


def test_truncated_body_names_the_byte_counts():
    raw = _env().encode()
    with pytest.raises(TruncatedEnvelope, match=r"body has 845 of 850 bytes"):
        Envelope.decode(raw[:-5])


def test_trailing_garbage_is_refused():
    with pytest.raises(EnvelopeError, match="after its body"):
        Envelope.decode(_env().encode() + b"x")


def _with_header(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">4sI", MAGIC, len(h)) + h + body


def test_unknown_version_is_named_before_schema_checks():
    h = json.loads(_env().header.model_dump_json())
    h["v"] = 9
    h["type"] = "something-new"
    with pytest.raises(UnsupportedVersion, match="protocol version 9"):
        Envelope.decode(_with_header(h))


def test_foreign_payload_and_bad_header_are_named():
    with pytest.raises(EnvelopeError, match="not a deft envelope"):
        Envelope.decode(b"hello world, not an envelope")
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        Envelope.decode(struct.pack(">4sI", MAGIC, 3) + b"{{{")
    h = json.loads(_env().header.model_dump_json())
    h["type"] = "teleport"
    with pytest.raises(EnvelopeError, match="'type'"):
        Envelope.decode(_with_header(h, _env().body))


def test_ack_refers_to_the_acknowledged_key():
    e = _env()
    ack = Envelope.decode(make_ack(e, sender="edge", accepted=False, reason="wrong_round").encode())
    assert ack.header.type == "ack" and ack.header.round == 4
    assert ack.json() == {"ack": e.header.key, "type": "update", "accepted": False, "reason": "wrong_round"}


def test_json_on_a_binary_body_is_refused():
    with pytest.raises(EnvelopeError, match="not JSON"):
        _env().json()


def test_json_bodies_round_trip_and_name_bad_fields():
    from device_runtime.protocol.messages import Hello, Task, parse_body, to_envelope

    task = Task(round=2, bundle_hash="ab" * 32, global_round=1, hyperparams={"lr": 1e-3}, encoding="int8")
    env = Envelope.decode(to_envelope(task, sender="edge", fleet="lab", round=2).encode())
    assert env.header.type == "task" and parse_body(env, Task) == task
    with pytest.raises(EnvelopeError, match="expected a hello message, got task"):
        parse_body(env, Hello)
    bad = Envelope.build("task", sender="edge", fleet="lab", body=b'{"round": -1, "bundle_hash": "x"}', content="json")
    with pytest.raises(EnvelopeError, match="field 'round'"):
        parse_body(bad, Task)

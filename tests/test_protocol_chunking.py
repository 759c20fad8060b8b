"""Chunking: every chunk fits; reassembly is order-free, duplicate-proof, verified and resumable."""

import random

import pytest

from device_runtime.protocol.chunking import Reassembler, payload_budget, split
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import HashMismatch, PayloadTooLarge


def _big(n: int = 300_000, key: str | None = None) -> Envelope:
    body = random.Random(n).randbytes(n)
    return Envelope.build("bundle", sender="edge", fleet="lab", body=body, key=key, meta={"name": "bundle.tar"})


@pytest.mark.parametrize("limit", [2_000, 10_000, 65_536])
def test_every_chunk_fits_and_reassembles_in_any_order(limit):
    msg = _big()
    chunks = split(msg, limit)
    assert len(chunks) > 1
    assert all(len(c.encode()) <= limit for c in chunks)
    wire = [Envelope.decode(c.encode()) for c in chunks]
    random.Random(1).shuffle(wire)
    r = Reassembler()
    outs = [r.add(c) for c in wire + wire[:3]]  # + redelivered duplicates after completion
    done = [o for o in outs if o is not None]
    assert len(done) == 1
    assert done[0].body == msg.body
    assert done[0].header.key == msg.header.key and done[0].header.chunk is None
    assert done[0].header.meta == {"name": "bundle.tar"}


def test_small_message_passes_unchunked():
    msg = _big(100)
    assert split(msg, 10_000) == [msg]
    assert Reassembler().add(msg) is msg


def test_missing_reports_exactly_the_absent_indices():
    chunks = split(_big(), 20_000)
    r = Reassembler()
    for c in chunks:
        if c.header.chunk.index % 3 != 0:
            assert r.add(c) is None
    tid = chunks[0].header.chunk.transfer
    assert r.missing(tid) == [i for i in range(len(chunks)) if i % 3 == 0]
    assert r.progress(tid) == (len(chunks) - len(r.missing(tid)), len(chunks))


def test_resume_from_spool_after_receiver_restart(tmp_path):
    msg = _big(key="bundle-abc")
    chunks = split(msg, 20_000, transfer="bundle-abc")
    first = Reassembler(spool_dir=tmp_path)
    for c in chunks[: len(chunks) // 2]:
        first.add(c)
    del first  # the device process dies
    second = Reassembler(spool_dir=tmp_path)
    assert second.missing("bundle-abc") == list(range(len(chunks) // 2, len(chunks)))
    out = [second.add(c) for c in chunks[len(chunks) // 2 :]]
    assert out[-1] is not None and out[-1].body == msg.body
    assert list(tmp_path.iterdir()) == []  # spool cleaned after completion


def test_tampered_chunk_fails_the_transfer_hash():
    chunks = split(_big(), 20_000)
    bad = chunks[2]
    forged_body = bytes(len(bad.body))
    # a forger who also fixes the chunk's own hash still cannot fix the transfer hash
    chunks[2] = Envelope.build("bundle", sender="edge", fleet="lab", body=forged_body)
    chunks[2] = Envelope(bad.header.model_copy(update={"sha256": chunks[2].header.sha256}), forged_body)
    r = Reassembler()
    with pytest.raises(HashMismatch, match="reassembled"):
        for c in chunks:
            r.add(Envelope.decode(c.encode()))


def test_sender_restarting_a_transfer_with_new_content_starts_over():
    a = split(_big(200_000, key="t"), 20_000, transfer="t")
    b = split(_big(210_000, key="t"), 20_000, transfer="t")
    r = Reassembler()
    for c in a[:3]:
        r.add(c)
    outs = [r.add(c) for c in b]
    assert outs[-1] is not None and len(outs[-1].body) == 210_000


def test_announced_transfer_over_the_limit_is_refused():
    chunks = split(_big(), 20_000)
    with pytest.raises(PayloadTooLarge, match="limit"):
        Reassembler(max_transfer_bytes=100_000).add(chunks[0])


def test_budget_accounts_for_topic_and_refuses_tiny_limits():
    assert payload_budget(65_536, "deft/v1/lab/device/x/update/1") < 65_536 - 30
    with pytest.raises(PayloadTooLarge, match="max_packet_size"):
        payload_budget(500, "t")

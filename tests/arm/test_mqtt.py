"""(e) a DeftClient on the device (emulated aarch64 under make test-arm) talks to a Mosquitto the host
runs on 127.0.0.1: a hello and an int8 update published here arrive at a host-side edge subscriber,
which decodes the update on x86 to the values this side decodes."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

PEER_TIMEOUT_S = 180


def test_device_client_reaches_the_hosts_mosquitto(arm_fixture, host_process, tmp_path):
    from device_runtime.payload import decode_update, encode_update
    from device_runtime.protocol.client import DeftClient
    from device_runtime.protocol.envelope import Envelope
    from device_runtime.protocol.messages import Hello, to_envelope
    from device_runtime.protocol.topics import Topics

    trained = dict(np.load(arm_fixture("payload") / "trained.npz"))
    peer = host_process("-m", "tests.arm.host_mqtt_peer", str(tmp_path / "broker"), "--expect", "2",
                        "--timeout", str(PEER_TIMEOUT_S))
    line = peer.stdout.readline()  # bounded: the peer gives up after its broker start and timeout
    assert line, f"the host peer exited before the broker was up:\n{peer.stderr.read()[-3000:]}"
    info = json.loads(line)
    if "skip" in info:
        pytest.skip(info["skip"])
    assert info["host"] == "127.0.0.1"
    topics = Topics(info["fleet"])
    dev = info["device"]
    with DeftClient(info["host"], info["port"], client_id=f"{dev}-{uuid.uuid4().hex[:8]}", username=dev,
                    password=info["password"], persistent_session=False,
                    max_packet_size=info["max_packet_size"]).connect(timeout=60) as client:
        hello = to_envelope(Hello(kit_version="arm-proof", capabilities={"backend": "onnxruntime"}),
                            sender=dev, fleet=info["fleet"])
        blob = encode_update(trained, bundle_hash="ab" * 32, device_id=dev, round=1, samples=8, encoding="int8")
        update = Envelope.build("update", sender=dev, fleet=info["fleet"], round=1, body=blob, content="safetensors")
        client.publish(topics.hello(dev), hello, timeout=60)
        client.publish(topics.update(dev, 1), update, timeout=60)
        out, err = peer.communicate(timeout=PEER_TIMEOUT_S + 30)
    assert peer.returncode == 0, f"the host subscriber did not get both messages:\n{out[-2000:]}\n{err[-3000:]}"
    got = json.loads(out.strip().splitlines()[-1])["received"]
    by_type = {m["type"]: m for m in got}
    assert set(by_type) == {"hello", "update"} and all(m["sender"] == dev for m in got)
    assert by_type["hello"]["key"] == hello.header.key and by_type["hello"]["json"]["kit_version"] == "arm-proof"
    up = by_type["update"]
    assert up["topic"] == topics.update(dev, 1) and up["sha256"] == update.header.sha256
    assert up["payload"]["meta"]["device_id"] == dev and up["payload"]["meta"]["encoding"] == "int8"
    mine = decode_update(blob).tensors
    for name, values in up["payload"]["tensors"].items():
        assert np.array_equal(np.asarray(values, dtype=np.float32), mine[name].ravel()), name

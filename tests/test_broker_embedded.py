"""The same protocol round trip against the embedded amqtt broker (the zero-install fallback)."""

from __future__ import annotations

import queue

import pytest

from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import AuthRefused
from edge_broker.broker.embedded import LIMITS, EmbeddedBroker, EmbeddedBrokerWarning
from tests._broker import FLEET


def test_auto_protocol_falls_back_to_311_with_nodelay(embedded_broker, mqtt_client):
    import socket

    c = mqtt_client(embedded_broker, "dev1", protocol="auto", v5_probe_s=1.0)
    assert c.protocol_version == "3.1.1"
    assert c.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_round_trip_chunked_update_task_and_retained_global(embedded_broker, mqtt_client):
    t = embedded_broker.topics
    edge = mqtt_client(embedded_broker, "edge", max_packet_size=64 * 1024)
    updates = edge.subscribe(t.from_devices("update"))
    edge.publish(t.global_state(), Envelope.build("global", sender="edge", fleet=FLEET, round=1, body=b"G" * 5000),
                 retain=True)
    dev2 = mqtt_client(embedded_broker, "dev2", max_packet_size=64 * 1024)
    inbox = dev2.subscribe(t.device_inbox("dev2")[0])
    to_all = dev2.subscribe(t.device_inbox("dev2")[1])
    g = to_all.get(timeout=5)
    assert g.retained and g.envelope.body == b"G" * 5000
    edge.publish(t.task_for("dev2", 1), Envelope.json_message("task", {"epochs": 1}, sender="edge", fleet=FLEET,
                                                              round=1))
    assert inbox.get(timeout=5).envelope.json() == {"epochs": 1}
    body = bytes(range(256)) * 800  # 200 KB, chunked at 64 KiB
    assert dev2.publish(t.update("dev2", 1), Envelope.build("update", sender="dev2", fleet=FLEET, round=1,
                                                            body=body)) > 1
    got = updates.get(timeout=10)
    assert got.envelope.body == body and got.info.device == "dev2"


def test_acl_keeps_devices_in_their_subtree(embedded_broker, mqtt_client):
    t = embedded_broker.topics
    edge = mqtt_client(embedded_broker, "edge")
    updates = edge.subscribe(t.from_devices("update"))
    dev3 = mqtt_client(embedded_broker, "dev3")
    dev3.publish(t.update("dev4", 1), Envelope.build("update", sender="dev4", fleet=FLEET, round=1, body=b"forged"))
    with pytest.raises(queue.Empty):
        updates.get(timeout=1.0)
    dev3.publish(t.update("dev3", 1), Envelope.build("update", sender="dev3", fleet=FLEET, round=1, body=b"own"))
    assert updates.get(timeout=5).envelope.body == b"own"


def test_wrong_password_is_refused(embedded_broker, mqtt_client):
    with pytest.raises(AuthRefused, match="dev1"):
        mqtt_client(embedded_broker, "dev1", password="wrong")


def test_starting_it_warns_about_its_limits(tmp_path):
    from edge_broker.broker import make_accounts
    from edge_broker.broker.base import free_port

    b = EmbeddedBroker(tmp_path, make_accounts(["d"]), port=free_port(), fleets=[FLEET])
    with pytest.warns(EmbeddedBrokerWarning, match="MQTT 3.1.1 only.*lost"):
        b.start()
    try:
        assert b.is_running() and b.client_options()["protocol"] == "3.1.1"
        assert "127.0.0.1" in (tmp_path / "amqtt.json").read_text()
    finally:
        b.stop()
    assert not b.is_running()
    assert "no persistence" in LIMITS

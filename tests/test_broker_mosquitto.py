"""The protocol against a REAL Mosquitto run from the kit-written config (password file + ACL)."""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import subprocess
import threading

import pytest

from device_runtime.protocol.client import DeftClient
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import (
    AuthRefused,
    HashMismatch,
    PayloadTooLarge,
    PublishRefused,
    TruncatedEnvelope,
)
from device_runtime.protocol.topics import parse_topic
from edge_broker.broker.base import BrokerError
from tests._broker import FLEET, TEST_MAX_PACKET, wait_until

pytestmark = pytest.mark.mosquitto


def _update(device: str, rnd: int, body: bytes = b"weights", **kw) -> Envelope:
    return Envelope.build("update", sender=device, fleet=FLEET, round=rnd, body=body, content="safetensors", **kw)


def _nothing_arrives(q: queue.Queue, seconds: float = 1.0) -> bool:
    try:
        q.get(timeout=seconds)
    except queue.Empty:
        return True
    return False


def test_wrong_password_is_refused(mosquitto_broker, mqtt_client):
    with pytest.raises(AuthRefused, match="refused user 'dev1'.*password"):
        mqtt_client(mosquitto_broker, "dev1", password="not-the-password")
    with pytest.raises(AuthRefused):
        mqtt_client(mosquitto_broker, "intruder", password="x")
    ok = mqtt_client(mosquitto_broker, "dev1")
    assert ok.connected


def test_connection_is_mqtt5_with_nodelay_and_the_broker_limit(mosquitto_broker, mqtt_client):
    c = mqtt_client(mosquitto_broker, "dev1")
    assert c.protocol_version == "5"
    assert c.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert c.broker_max_packet == TEST_MAX_PACKET  # announced by Mosquitto in CONNACK


def test_device_cannot_publish_on_another_devices_topic(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    updates = edge.subscribe(t.from_devices("update"))
    dev1 = mqtt_client(mosquitto_broker, "dev1")
    with pytest.raises(PublishRefused, match="dev2.*ACL"):
        dev1.publish(t.update("dev2", 1), _update("dev2", 1))  # impersonation attempt
    with pytest.raises(PublishRefused):
        dev1.publish(t.global_state(), Envelope.build("global", sender="dev1", fleet=FLEET), retain=True)
    assert _nothing_arrives(updates)
    # MQTT 3.1.1 has no refusal code: the message is silently dropped, and still never arrives
    dev1_v3 = mqtt_client(mosquitto_broker, "dev1", protocol="3.1.1")
    dev1_v3.publish(t.update("dev2", 1), _update("dev2", 1))
    assert _nothing_arrives(updates)
    # ... while its own topic works (the path is open; only the ACL stopped the others)
    dev1.publish(t.update("dev1", 1), _update("dev1", 1))
    got = updates.get(timeout=5)
    assert got.info.device == "dev1" and got.envelope.header.sender == "dev1"


def test_publish_many_delivers_each_once_and_names_a_refused_topic(mosquitto_broker, mqtt_client):
    """The coordinator sends a round's tasks with publish_many (one wait for all PUBACKs): each
    device gets exactly its own task, chunked ones reassembled; a refused publish is named."""
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    inboxes = {d: mqtt_client(mosquitto_broker, d).subscribe(t.device_inbox(d)[0]) for d in ("dev1", "dev2")}
    big = bytes(range(256)) * (3 * TEST_MAX_PACKET // 256)  # over the packet limit: chunked
    items = [(t.task_for("dev1", 3), Envelope.build("task", sender="edge", fleet=FLEET, round=3, body=b"one")),
             (t.task_for("dev2", 3), Envelope.build("task", sender="edge", fleet=FLEET, round=3, body=big))]
    packets = edge.publish_many(items, timeout=30)
    assert packets > 2  # the big one went as several chunks
    assert inboxes["dev1"].get(timeout=5).envelope.body == b"one"
    assert inboxes["dev2"].get(timeout=10).envelope.body == big
    assert _nothing_arrives(inboxes["dev1"], 0.5) and _nothing_arrives(inboxes["dev2"], 0.5)
    dev1 = mqtt_client(mosquitto_broker, "dev1")
    with pytest.raises(PublishRefused, match="dev2"):
        dev1.publish_many([(t.update("dev1", 3), _update("dev1", 3)), (t.update("dev2", 3), _update("dev2", 3))])


def test_device_cannot_read_what_is_addressed_to_another(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    dev1 = mqtt_client(mosquitto_broker, "dev1")
    dev2 = mqtt_client(mosquitto_broker, "dev2")
    snoop = dev1.subscribe(f"deft/v1/{FLEET}/to/dev2/#")
    snoop_updates = dev1.subscribe(f"deft/v1/{FLEET}/device/+/update/+")
    inbox2 = dev2.subscribe(t.device_inbox("dev2")[0])
    edge.publish(t.task_for("dev2", 5), Envelope.json_message("task", {"lr": 1e-3}, sender="edge", fleet=FLEET,
                                                              round=5))
    dev2.publish(t.update("dev2", 5), _update("dev2", 5))
    assert inbox2.get(timeout=5).envelope.json() == {"lr": 1e-3}
    assert _nothing_arrives(snoop) and _nothing_arrives(snoop_updates, 0.3)


def test_oversize_envelope_is_chunked_and_arrives_intact(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    updates = edge.subscribe(t.from_devices("update"))
    dev3 = mqtt_client(mosquitto_broker, "dev3")
    body = bytes(range(256)) * 1200  # 307 KB over a 64 KiB broker limit
    msg = _update("dev3", 2, body)
    packets = dev3.publish(t.update("dev3", 2), msg)
    assert packets == 5
    got = updates.get(timeout=10)
    assert got.envelope.body == body and got.envelope.header.key == msg.header.key
    assert dev3.stats.connects == 1 and edge.stats.connects == 1  # nobody was thrown off


def test_oversize_that_cannot_be_chunked_is_refused_clearly_and_the_connection_survives(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    dev4 = mqtt_client(mosquitto_broker, "dev4")
    with pytest.raises(PayloadTooLarge, match="max packet size 65536"):
        dev4.publish(t.update("dev4", 1), b"\0" * (TEST_MAX_PACKET + 1))
    with pytest.raises(PayloadTooLarge, match="chunking is off"):
        dev4.publish(t.update("dev4", 1), _update("dev4", 1, b"\0" * TEST_MAX_PACKET), chunk=False)
    edge = mqtt_client(mosquitto_broker, "edge")
    with pytest.raises(PayloadTooLarge, match="retained messages cannot be chunked"):
        edge.publish(t.global_state(),
                     Envelope.build("global", sender="edge", fleet=FLEET, body=b"\0" * TEST_MAX_PACKET),
                     retain=True)
    # a PUBACK for a later packet on the same connection: the broker read past where an oversize packet
    # would have been, and a client that had sent one would have been disconnected by then
    assert dev4.publish(t.heartbeat("dev4"), Envelope.build("heartbeat", sender="dev4", fleet=FLEET)) == 1
    assert dev4.connected and dev4.stats.connects == 1


def test_what_the_size_check_prevents(mosquitto_broker):
    """Plain paho sending one packet over max_packet_size is disconnected by Mosquitto (and would resend it)."""
    import paho.mqtt.client as mqtt

    b = mosquitto_broker.broker
    drops = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-paho", protocol=mqtt.MQTTv311)
    c.username_pw_set("dev5", mosquitto_broker.passwords["dev5"])
    c.on_disconnect = lambda *a: drops.append(a[3])
    c.connect(b.host, b.port)
    c.loop_start()
    try:
        c.publish(f"deft/v1/{FLEET}/device/dev5/update/1", b"\0" * (TEST_MAX_PACKET + 100), qos=1)
        wait_until(lambda: drops, 5, "Mosquitto dropping a client that exceeds max_packet_size")
    finally:
        c.loop_stop()
        c.disconnect()


def test_retained_global_state_reaches_a_late_subscriber(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    state = bytes(range(200)) * 100
    edge.publish(t.global_state(), Envelope.build("global", sender="edge", fleet=FLEET, round=3, body=state,
                                                  content="safetensors"), retain=True)
    edge.close()
    late = mqtt_client(mosquitto_broker, "dev5")
    q = late.subscribe(t.device_inbox("dev5")[1])
    got = q.get(timeout=5)
    assert got.retained and got.info.kind == "global"
    assert got.envelope.header.round == 3 and got.envelope.body == state


def test_tampered_and_truncated_messages_are_reported_with_their_sender(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    edge = mqtt_client(mosquitto_broker, "edge")
    edge.subscribe(t.from_devices("update"))
    dev2 = mqtt_client(mosquitto_broker, "dev2")
    raw = bytearray(_update("dev2", 7, b"x" * 1000).encode())
    raw[-1] ^= 0xFF
    dev2.publish(t.update("dev2", 7), bytes(raw))
    dev2.publish(t.update("dev2", 7), _update("dev2", 7, b"y" * 1000).encode()[:-10])
    first, second = edge.errors.get(timeout=5), edge.errors.get(timeout=5)
    assert isinstance(first.error, HashMismatch) and first.info.device == "dev2" and first.info.round == 7
    assert isinstance(second.error, TruncatedEnvelope)


def test_restart_while_connected_reconnects_and_qos1_gets_through(fresh_mosquitto, mqtt_client):
    but = fresh_mosquitto()
    t = but.topics
    edge = mqtt_client(but, "edge", persistent_session=True, client_id="edge")
    updates = edge.subscribe(t.from_devices("update"))
    dev1 = mqtt_client(but, "dev1", persistent_session=True, client_id="dev1", reconnect_max_s=1.0)
    but.broker.stop()  # SIGTERM: Mosquitto saves sessions + subscriptions
    assert not but.broker.is_running()
    result: dict = {}

    def send() -> None:  # the device publishes while the broker is down; paho queues, resends, waits for PUBACK
        try:
            result["packets"] = dev1.publish(t.update("dev1", 9), _update("dev1", 9, b"survives"), timeout=30)
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    th = threading.Thread(target=send)
    th.start()
    wait_until(lambda: not dev1.connected, 10, "the device noticing the broker is down")
    but.broker.start()
    th.join(35)
    assert result == {"packets": 1}
    got = updates.get(timeout=15)
    assert got.envelope.body == b"survives" and got.envelope.header.round == 9
    assert dev1.stats.connects >= 2 and edge.stats.connects >= 2


def _seen(lines: queue.Queue[bytes], topic: str) -> bool:
    """Whether a line for ``topic`` arrived (waiting briefly), dropping what came before it."""
    with contextlib.suppress(queue.Empty):
        while True:
            if lines.get(timeout=0.2).startswith(topic.encode() + b" "):
                return True
    return False


def test_mosquitto_sub_shows_the_documented_topics(mosquitto_broker, mqtt_client):
    sub = shutil.which("mosquitto_sub")
    if not sub:
        pytest.skip("mosquitto_sub not installed (apt install mosquitto-clients)")
    b, t = mosquitto_broker.broker, mosquitto_broker.topics
    proc = subprocess.Popen(
        [sub, "-h", b.host, "-p", str(b.port), "-u", "edge", "-P", mosquitto_broker.passwords["edge"],
         "-t", t.everything(), "-v", "-R", "-W", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    dev1 = mqtt_client(mosquitto_broker, "dev1")
    beat = Envelope.build("heartbeat", sender="dev1", fleet=FLEET)
    try:  # heartbeats until mosquitto_sub shows one: its subscription is live
        wait_until(lambda: dev1.publish(t.heartbeat("dev1"), beat) and _seen(lines, t.heartbeat("dev1")), 15,
                   "mosquitto_sub subscribing")
        dev1.publish(t.hello("dev1"), Envelope.json_message("hello", {"profile": "pi5"}, sender="dev1", fleet=FLEET))
        dev1.publish(t.update("dev1", 1), _update("dev1", 1))
        edge = mqtt_client(mosquitto_broker, "edge")
        edge.publish(t.task_for("dev1", 2), Envelope.json_message("task", {}, sender="edge", fleet=FLEET, round=2))
        topics: list[str] = []
        while len(topics) < 3:
            topic = lines.get(timeout=15).split(b" ", 1)[0].decode()
            if topic.startswith("deft/") and topic != t.heartbeat("dev1"):
                topics.append(topic)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert topics == [t.hello("dev1"), t.update("dev1", 1), t.task_for("dev1", 2)], err
    assert [parse_topic(x).kind for x in topics] == ["hello", "update", "task"]


def test_config_is_loopback_with_nodelay_limits_and_no_anonymous(mosquitto_broker):
    conf = mosquitto_broker.broker.conf_path.read_text()
    b = mosquitto_broker.broker
    for line in ("allow_anonymous false", "set_tcp_nodelay true", f"max_packet_size {TEST_MAX_PACKET}",
                 "persistence true", f"listener {b.port} 127.0.0.1", "max_queued_messages 1000"):
        assert line in conf.splitlines()
    acl = (b.workdir / "acl").read_text()
    assert f"pattern write deft/v1/{FLEET}/device/%u/#" in acl
    passwd = (b.workdir / "passwd").read_text()
    assert "dev1-secret" not in passwd and "dev1:$" in passwd  # hashed by mosquitto_passwd


def test_an_anonymous_client_is_refused(mosquitto_broker):
    c = DeftClient(mosquitto_broker.broker.host, mosquitto_broker.broker.port, client_id="anon")
    with pytest.raises(AuthRefused):
        c.connect(timeout=5)


def test_port_in_use_is_a_clear_error(mosquitto_broker, mosquitto_binary, tmp_path):
    from edge_broker.broker.mosquitto import MosquittoBroker, MosquittoConfig

    other = MosquittoBroker(tmp_path, mosquitto_broker.broker.accounts,
                            MosquittoConfig(port=mosquitto_broker.broker.port, fleets=[FLEET]), binary=mosquitto_binary)
    with pytest.raises(BrokerError, match=f"did not start on 127.0.0.1:{mosquitto_broker.broker.port}"):
        other.start(timeout=3)

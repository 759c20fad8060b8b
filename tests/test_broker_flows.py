"""Protocol flows over a real Mosquitto: resumable bundle download, last will of a killed device."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from device_runtime.protocol.chunking import split
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.messages import BundleRequest, Status, parse_body, to_envelope
from tests._broker import FLEET, wait_until

pytestmark = pytest.mark.mosquitto


def test_bundle_download_resumes_after_a_device_restart(mosquitto_broker, mqtt_client, tmp_path):
    t = mosquitto_broker.topics
    bundle = os.urandom(600_000)
    bid = "c0ffee" * 4
    msg = Envelope.build("bundle", sender="edge", fleet=FLEET, body=bundle, key=bid, meta={"name": "bundle.tar"})
    chunks = split(msg, 60_000, transfer=bid)
    assert len(chunks) > 8
    spool = tmp_path / "spool"

    edge = mqtt_client(mosquitto_broker, "edge")
    requests = edge.subscribe(t.from_devices("bundle-request"))
    dev = mqtt_client(mosquitto_broker, "dev1", spool_dir=str(spool))
    inbox_all = dev.subscribe(t.bundle_all(bid))
    for c in chunks[::2]:  # the device gets only half before it goes away
        edge.publish(t.bundle_all(bid), c, chunk=False)
    wait_until(lambda: (dev.reassembler.progress(bid) or (0, 0))[0] >= len(chunks[::2]), 10, "half the chunks arriving")
    assert inbox_all.empty()
    dev.close()

    dev2 = mqtt_client(mosquitto_broker, "dev1", spool_dir=str(spool))  # restarted device, same spool
    missing = dev2.reassembler.missing(bid)
    assert missing == list(range(1, len(chunks), 2))
    inbox = dev2.subscribe(t.device_inbox("dev1")[0])
    dev2.publish(t.bundle_request("dev1"), to_envelope(BundleRequest(bundle=bid, missing=missing), sender="dev1",
                                                       fleet=FLEET))
    req = parse_body(requests.get(timeout=5).envelope, BundleRequest)
    for i in req.missing:  # the edge resends exactly what is missing, addressed to that device
        edge.publish(t.bundle_to("dev1", bid), chunks[i], chunk=False)
    got = inbox.get(timeout=10).envelope
    assert got.body == bundle and got.header.meta == {"name": "bundle.tar"}
    sent_down = sum(len(chunks[i].encode()) for i in missing)
    assert sent_down < 0.6 * len(bundle)  # only the missing half travelled again


_DEVICE = textwrap.dedent("""
    import sys, time
    from device_runtime.protocol.client import DeftClient
    from device_runtime.protocol.messages import Status, to_envelope
    from device_runtime.protocol.topics import Topics
    host, port, pw, fleet = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    t = Topics(fleet)
    will = (t.status("dev2"), to_envelope(Status(state="offline"), sender="dev2", fleet=fleet))
    c = DeftClient(host, port, client_id="dev2-proc", username="dev2", password=pw, will=will, keepalive=2,
                   persistent_session=False).connect()
    c.publish(t.status("dev2"), to_envelope(Status(state="online"), sender="dev2", fleet=fleet), retain=True)
    print("up", flush=True)
    time.sleep(60)
""")


def test_a_killed_device_publishes_its_last_will(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    b = mosquitto_broker.broker
    edge = mqtt_client(mosquitto_broker, "edge")
    statuses = edge.subscribe(t.status("dev2"))
    proc = subprocess.Popen([sys.executable, "-c", _DEVICE, b.host, str(b.port), mosquitto_broker.passwords["dev2"],
                             FLEET],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "up"
        assert parse_body(statuses.get(timeout=5).envelope, Status).state == "online"
        os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker sends the will
        proc.wait(5)
        last = statuses.get(timeout=10)
        assert parse_body(last.envelope, Status).state == "offline" and last.info.device == "dev2"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    late = mqtt_client(mosquitto_broker, "edge")  # and it is retained for whoever looks later
    q = late.subscribe(t.status("dev2"))
    assert parse_body(q.get(timeout=5).envelope, Status).state == "offline"


def test_embedded_broker_restart_client_reconnects(tmp_path, mqtt_client):
    import warnings

    from edge_broker.broker import make_accounts
    from edge_broker.broker.base import free_port
    from edge_broker.broker.embedded import EmbeddedBroker
    from tests._broker import PASSWORDS, BrokerUnderTest

    b = EmbeddedBroker(tmp_path, make_accounts(["dev1"], passwords=PASSWORDS), port=free_port(), fleets=[FLEET])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.start()
    try:
        but = BrokerUnderTest(b)
        t = but.topics
        edge = mqtt_client(but, "edge", reconnect_max_s=1.0)
        q = edge.subscribe(t.from_devices("update"))
        dev = mqtt_client(but, "dev1", reconnect_max_s=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b.restart()
        wait_until(lambda: min(edge.stats.connects, dev.stats.connects) >= 2, 15, "both clients reconnecting")
        assert edge.connected and dev.connected
        # the edge re-subscribes on reconnect (amqtt keeps no sessions): resend until that subscription is live
        got = None
        deadline = time.monotonic() + 15
        while got is None and time.monotonic() < deadline:
            dev.publish(t.update("dev1", 1), Envelope.build("update", sender="dev1", fleet=FLEET, round=1, body=b"x"),
                        timeout=15)
            with contextlib.suppress(queue.Empty):
                got = q.get(timeout=0.5)
        assert got is not None and got.envelope.body == b"x"
        assert edge.stats.connects == 2
    finally:
        b.stop()

"""Host side of the emulated MQTT test: a kit-configured Mosquitto on 127.0.0.1 and an edge subscriber.

``python -m tests.arm.host_mqtt_peer WORKDIR --expect N --timeout S`` (host Python) starts Mosquitto with
the test accounts (tests/_broker.py), subscribes the edge account to every device topic, prints one
JSON line with the broker's address and a device account, then waits for N complete messages (at most
S seconds), prints one JSON line describing them (update payloads decoded here, on x86) and stops the
broker. Without Mosquitto it prints ``{"skip": reason}``. Every wait is bounded, so a reader of its
stdout never hangs longer than S plus the broker's start.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from pathlib import Path

DEVICE = "dev1"


def describe(item) -> dict:  # item: device_runtime.protocol.client.Received
    from device_runtime.payload import decode_update

    env = item.envelope
    out = {"topic": item.topic, "type": env.header.type, "sender": env.header.sender, "key": env.header.key,
           "sha256": env.header.sha256, "length": env.header.length}
    if env.header.type == "update":
        up = decode_update(env.body)
        out["payload"] = {"meta": up.meta.model_dump(mode="json"),
                          "tensors": {k: v.ravel().tolist() for k, v in up.tensors.items()}}
    elif env.header.content == "json":
        out["json"] = env.json()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--expect", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0)
    ns = ap.parse_args(argv)

    from device_runtime.protocol.client import DeftClient
    from device_runtime.protocol.topics import Topics
    from edge_broker.broker.mosquitto import find_mosquitto
    from tests._broker import FLEET, PASSWORDS, TEST_MAX_PACKET, _start_mosquitto

    binary = find_mosquitto()
    if not binary:
        print(json.dumps({"skip": "mosquitto binary not found (apt install mosquitto)"}), flush=True)
        return 0
    broker = _start_mosquitto(ns.workdir, binary)
    edge = None
    try:
        edge = DeftClient(broker.host, broker.port, client_id=f"edge-{uuid.uuid4().hex[:8]}", username="edge",
                          password=PASSWORDS["edge"], persistent_session=False, **broker.client_options())
        edge.connect(timeout=10)
        inbox = edge.subscribe(Topics(FLEET).from_devices())
        print(json.dumps({"host": broker.host, "port": broker.port, "fleet": FLEET, "device": DEVICE,
                          "password": PASSWORDS[DEVICE], "max_packet_size": TEST_MAX_PACKET}), flush=True)
        received: list[dict] = []
        deadline = time.monotonic() + ns.timeout
        while len(received) < ns.expect:
            try:
                item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            received.append(describe(item))
        print(json.dumps({"received": received, "timed_out": len(received) < ns.expect}), flush=True)
        return 0 if len(received) == ns.expect else 1
    finally:
        if edge is not None:
            edge.close()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())

"""The browser device (device_web/) in headless Chromium, next to Python devices, over a real Mosquitto's
MQTT-over-WebSockets listener: one federated round end to end (the page's update accepted and
aggregated, the round's plug-in accuracy reported), the page's first training losses against the
Python step backend on the same batches, its payload through the Python ``decode_update``, and the
bad inputs: a tampered bundle chunk, a wrong password, the ACL of a WebSocket account."""

from __future__ import annotations

import json
import os
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_runtime.bundle.archive import pack_bundle
from device_runtime.bundle.load import load_bundle
from device_runtime.payload import decode_update
from device_runtime.protocol import Envelope, Task, split, to_envelope
from tests._broker import FLEET
from tests._browser import replay_in_python
from tests._fleet import Fleet, fedavg_from_store, running_fleet, store_updates, write_shard
from tests._models import SST2_VALIDATION

pytestmark = pytest.mark.mosquitto

PY_DEVICES = ["dev1", "dev2"]
WEB_DEVICE = "dev3"
SHARDS = {"dev1": (0, 48), "dev2": (48, 48), "dev3": (96, 40)}


@pytest.fixture
def ws_broker(fresh_mosquitto):
    """A private Mosquitto with the kit's WebSocket listener (same accounts and ACL as its TCP one)."""
    from edge_broker.broker.base import free_port
    from edge_broker.broker.mosquitto import WebSocketListener

    return fresh_mosquitto(websockets=WebSocketListener(port=free_port()))


def ws_url(but) -> str:
    return f"ws://127.0.0.1:{but.broker.config.websockets.port}"


@pytest.fixture
def ws_fleet(ws_broker, tiny_bert_bundle, tmp_path) -> Iterator[Fleet]:
    with running_fleet(ws_broker, tiny_bert_bundle, tmp_path / "fleet") as f:
        yield f


def join(page, password: str, *, data: Path | None = None, rows: str | None = None) -> None:
    page.fill("#password", password)
    if data is not None:
        page.set_input_files("#file", str(data))
    if rows is not None:
        page.fill("#rows", rows)
    page.click("#join")


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    """The page as a PNG under the test's tmp dir (and under $DEFT_WEB_SCREENSHOTS if set, to keep)."""
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    keep = os.environ.get("DEFT_WEB_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(keep) / name)
    return out


def run_round(fleet: Fleet, browser_page, tmp_path: Path, shots: str) -> dict:
    """One round: 2 Python devices + the page, which ``deft edge serve --web`` serves (with the bundle);
    returns the page's state, the edge's result and the screenshot's path."""
    from edge_broker.broker.base import free_port

    data = {d: write_shard(tmp_path / f"{d}.tsv", *SHARDS[d]) for d in [*PY_DEVICES, WEB_DEVICE]}
    web = ["--web", "--web-host", "127.0.0.1", "--web-port", str(free_port()), "--ws-url", ws_url(fleet.but)]
    edge = fleet.coordinator(devices=[*PY_DEVICES, WEB_DEVICE], rounds=1, min_devices=3, eval_data=SST2_VALIDATION,
                             deadline=240, batch_size=16, lr=1e-3, extra=web)
    devs = [fleet.device(d, data[d], max_rounds=1) for d in PY_DEVICES]
    # the edge prints the page's URL (broker and fleet filled in) and a QR code
    line = fleet.wait_until(lambda: next((ln for ln in edge.log().splitlines() if "browser devices: open" in ln), None),
                            60, "the edge's page URL", watch=[edge])
    url = line.split("open ", 1)[1].strip()
    assert f"fleet={FLEET}" in url and "broker=ws" in url and "\u2588" in edge.log()  # QR code blocks
    page = browser_page(f"{url}&id={WEB_DEVICE}&threads=2")
    join(page, fleet.but.passwords[WEB_DEVICE], data=data[WEB_DEVICE])
    page.wait_for_function("window.deft.rounds.length > 0 || window.deft.error", timeout=300_000)
    state = page.evaluate("window.deft")
    assert state["error"] is None, state["error"]
    assert edge.wait(240) == 0, fleet.logs()
    for p in devs:
        assert p.wait(60) == 0, p.tail()
    page.wait_for_timeout(300)  # let the last status line paint before the screenshot
    shot = save_screenshot(page, tmp_path, shots)
    return {"page": state, "edge": edge.result(), "shot": shot}


def check_round(fleet: Fleet, got: dict, tmp_path: Path, name: str) -> dict:
    """The acceptance checks of one browser round; returns the measured figures (also written as JSON)."""
    page, out = got["page"], got["edge"]
    rnd = page["rounds"][0]
    assert rnd["accepted"] is True, rnd
    # the edge counted the page's update and aggregated it with the Python devices' (FedAvg recomputed)
    assert fleet.counted(1) == {d: 1 for d in [*PY_DEVICES, WEB_DEVICE]}
    _, devices = fedavg_from_store(fleet.db_path, 1)
    assert sorted(devices) == [*PY_DEVICES, WEB_DEVICE]
    assert len(out["accuracy"]) == 1 and 0.0 <= out["accuracy"][0] <= 1.0
    # its payload is the Python format: decode_update reads it, with the page's metrics
    stored = {d: p for _, d, _, p, _ in store_updates(fleet.db_path, 1)}
    upd = decode_update(stored[WEB_DEVICE], bundle_hash=load_bundle(fleet.bundle).hash)
    assert upd.meta.device_id == WEB_DEVICE and upd.meta.samples == SHARDS[WEB_DEVICE][1]
    assert upd.meta.kind == "delta" and upd.meta.metrics["steps"] == len(rnd["losses"])
    assert max(float(np.abs(v).max()) for v in upd.tensors.values()) > 1e-6  # it trained
    # parity: the page's first 3 losses = the Python step backend's on the same batches, within 1e-4
    trace = rnd["trace"][:3]
    assert len(trace) == 3
    py, py_s = replay_in_python(fleet.bundle, trace)
    web = [t["loss"] for t in trace]
    np.testing.assert_allclose(web, py, atol=1e-4)
    assert got["shot"].stat().st_size > 10_000
    py_step = {d: decode_update(stored[d]).meta.metrics.get("median_step_s") for d in PY_DEVICES}
    figures = {"bundle": name, "accuracy": out["accuracy"][0], "page_losses": web, "python_losses": py,
               "page_threads": page["threads"], "page_isolated": page["isolated"],
               "page_step_ms": rnd["stepMs"], "page_median_step_s": float(np.median(rnd["stepMs"])) / 1000,
               "page_trace_step_ms": [t["ms"] for t in trace], "python_trace_step_s_2_threads": py_s,
               "python_median_step_s_1_thread": py_step, "screenshot": str(got["shot"])}
    (tmp_path / f"figures-{name}.json").write_text(json.dumps(figures, indent=1))
    keep = os.environ.get("DEFT_WEB_SCREENSHOTS")
    if keep:
        shutil.copy(tmp_path / f"figures-{name}.json", Path(keep) / f"figures-{name}.json")
    print(json.dumps(figures))
    return figures


def test_page_joins_a_round_with_python_devices(ws_fleet, browser_page, web_dist, tmp_path):
    got = run_round(ws_fleet, browser_page, tmp_path, "web-device-round-tiny.png")
    figures = check_round(ws_fleet, got, tmp_path, "tiny-bert")
    assert figures["page_threads"] == 2 and figures["page_isolated"]  # the edge's headers gave it WASM threads


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEFT_WEB_MINILM"),
                    reason="the MiniLM browser round takes minutes: `make test-web-minilm` (DEFT_WEB_MINILM=1)")
def test_page_joins_a_minilm_round(fresh_mosquitto, request, browser_page, web_dist, tmp_path):
    from edge_broker.broker.base import free_port
    from edge_broker.broker.mosquitto import DEFAULT_MAX_PACKET_SIZE, WebSocketListener

    # DEFT_WEB_MINILM_BUNDLE: a MiniLM bundle already exported (the README's default), to skip the export
    given = os.environ.get("DEFT_WEB_MINILM_BUNDLE")
    minilm_bundle = Path(given) if given else request.getfixturevalue("minilm_bundle")
    # the kit's default packet limit: MiniLM's global state (890 kB, retained) is one message
    but = fresh_mosquitto(websockets=WebSocketListener(port=free_port()), max_packet_size=DEFAULT_MAX_PACKET_SIZE)
    with running_fleet(but, minilm_bundle, tmp_path / "fleet") as fleet:
        got = run_round(fleet, browser_page, tmp_path, "web-device-round-minilm.png")
        check_round(fleet, got, tmp_path, "minilm")


def test_tampered_bundle_chunk_is_refused_in_the_page(ws_broker, tiny_bert_bundle, web_page, mqtt_client, tmp_path):
    """The test plays the edge: a task, then the bundle with one chunk's bytes altered in transit."""
    t, dev = ws_broker.topics, "dev4"
    edge = mqtt_client(ws_broker, "edge")
    hello = edge.subscribe(t.hello(dev))
    requests = edge.subscribe(t.bundle_request(dev))
    page = web_page(ws_url(ws_broker), FLEET, dev)
    join(page, ws_broker.passwords[dev], rows="sentence\tlabel\na fine film\t1\nawful\t0\n")
    hello.get(timeout=30)
    bundle = load_bundle(tiny_bert_bundle)
    edge.publish(t.task_for(dev, 1), to_envelope(Task(round=1, bundle_hash=bundle.hash), sender="edge", fleet=FLEET))
    req = requests.get(timeout=30)
    assert req.envelope.header.type == "bundle-request"
    whole = Envelope.build("bundle", sender="edge", fleet=FLEET, body=pack_bundle(tiny_bert_bundle), key=bundle.hash)
    chunks = [c.encode() for c in split(whole, 60_000, transfer=bundle.hash)]
    bad = bytearray(chunks[1])
    bad[-10] ^= 0xFF  # one byte of the body flipped; the header (and its sha256) left as sent
    chunks[1] = bytes(bad)
    edge.publish_many([(t.bundle_to(dev, bundle.hash), c) for c in chunks], timeout=60)
    page.wait_for_function("window.deft.error !== null", timeout=60_000)
    err = page.inner_text("#error")
    assert page.is_visible("#error") and "refused a bundle chunk" in err and "sha256" in err, err
    assert page.evaluate("window.deft.progress") is None  # nothing was trained on it
    save_screenshot(page, tmp_path, "web-device-tampered.png")


def test_wrong_password_shows_a_clear_error(ws_broker, web_page, tmp_path):
    page = web_page(ws_url(ws_broker), FLEET, "dev5")
    join(page, "not-the-password", rows="sentence\tlabel\nfine\t1\n")
    page.wait_for_function("window.deft.error !== null", timeout=30_000)
    err = page.inner_text("#error")
    assert "wrong password for device 'dev5'" in err, err
    assert page.is_enabled("#join")  # the user can correct it and try again
    save_screenshot(page, tmp_path, "web-device-wrong-password.png")


def test_websocket_account_gets_the_same_acl_as_a_python_device(ws_broker, mqtt_client):
    """What the page's account may do over the WebSocket listener: its own topics only."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties  # noqa: F401 - MQTT 5 client below

    t = ws_broker.topics
    edge = mqtt_client(ws_broker, "edge")
    updates = edge.subscribe(t.from_devices("update"))
    events: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws-dev3", transport="websockets",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set("dev3", ws_broker.passwords["dev3"])
    c.on_connect = lambda *a: events.put(("connect", a[3]))
    c.on_publish = lambda cl, ud, mid, rc, props: events.put(("puback", mid, rc))
    c.on_subscribe = lambda cl, ud, mid, codes, props: events.put(("suback", mid, codes))
    c.connect("127.0.0.1", ws_broker.broker.config.websockets.port)
    c.loop_start()
    try:
        kind, rc = events.get(timeout=10)
        assert kind == "connect" and not rc.is_failure
        body = Envelope.build("update", sender="dev3", fleet=FLEET, round=1, body=b"x").encode()
        # another device's update topic: refused (MQTT 5 reason code), never delivered
        mid = c.publish(t.update("dev2", 1), body, qos=1).mid
        kind, got_mid, rc = events.get(timeout=10)
        assert (kind, got_mid) == ("puback", mid) and rc.is_failure, rc
        # reading another device's inbox: Mosquitto grants the subscription but delivers nothing on it, while
        # the device it is addressed to gets it (the same as for a TCP device)
        c.on_message = lambda cl, ud, m: events.put(("message", m.topic))
        mid = c.subscribe(f"{t.base}/to/dev2/#", qos=1)[1]
        kind, got_mid, _ = events.get(timeout=10)
        assert (kind, got_mid) == ("suback", mid)
        inbox2 = mqtt_client(ws_broker, "dev2").subscribe(t.device_inbox("dev2")[0])
        edge.publish(t.task_for("dev2", 5), Envelope.json_message("task", {"lr": 1e-3}, sender="edge", fleet=FLEET,
                                                                  round=5))
        assert inbox2.get(timeout=5).envelope.json() == {"lr": 1e-3}
        with pytest.raises(queue.Empty):
            events.get(timeout=0.5)
        with pytest.raises(queue.Empty):
            updates.get(timeout=0.5)
        # its own topic works: the path is open, only the ACL stopped the others
        mid = c.publish(t.update("dev3", 1), body, qos=1).mid
        kind, got_mid, rc = events.get(timeout=10)
        assert not rc.is_failure
        got = updates.get(timeout=5)
        assert got.info.device == "dev3"
    finally:
        c.loop_stop()
        c.disconnect()

"""End to end through a real Mosquitto: real payloads, validation, store. Replays count once; bad ones get reasons."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from device_runtime.bundle.manifest import TensorSpec
from device_runtime.payload import encode_update
from device_runtime.protocol.envelope import Envelope
from edge_broker.aggregation import ClientUpdate, get_strategy
from edge_broker.store import Store
from edge_broker.validation import RejectReason, UpdateRules, validate_payload
from tests._broker import DEVICES, FLEET

pytestmark = pytest.mark.mosquitto

BUNDLE = "a" * 64
SPECS = [TensorSpec(name="layer.0.lora_A", shape=(8, 64)), TensorSpec(name="layer.0.lora_B", shape=(64, 8))]


def _ingest(store: Store, rules: UpdateRules, q: queue.Queue, n: int) -> list[str]:
    """What the coordinator does per received update: validate, then store once under its key."""
    outcomes = []
    for _ in range(n):
        msg = q.get(timeout=10)
        env = msg.envelope
        checked, rej = validate_payload(rules, env.body, sender=msg.info.device, round=msg.info.round)
        if rej is not None:
            outcomes.append(store.add_update(env.header.key, round=rules.round, device=msg.info.device, samples=0,
                                             payload=None, accepted=False, reason=rej.reason.value))
        else:
            outcomes.append(store.add_update(env.header.key, round=checked.round, device=checked.device,
                                             samples=checked.samples, payload=env.body))
    return outcomes


def test_replayed_and_bad_updates_over_mosquitto(mosquitto_broker, mqtt_client, tmp_path):
    t = mosquitto_broker.topics
    rules = UpdateRules(devices=set(DEVICES), round=1, bundle_hash=BUNDLE, specs=SPECS)
    rng = np.random.default_rng(0)
    g0 = {s.name: np.zeros(s.shape, np.float32) for s in SPECS}
    edge = mqtt_client(mosquitto_broker, "edge")
    q = edge.subscribe(t.from_devices("update"))
    store = Store(tmp_path / "edge.db")
    store.open_round(1, bundle_hash=BUNDLE)

    sent = {}
    for dev in ("dev1", "dev2"):
        tensors = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}
        blob = encode_update(tensors, bundle_hash=BUNDLE, device_id=dev, round=1, samples=100, base=g0)
        env = Envelope.build("update", sender=dev, fleet=FLEET, round=1, body=blob, content="safetensors")
        sent[dev] = (env, tensors)
        mqtt_client(mosquitto_broker, dev).publish(t.update(dev, 1), env)
    dev1 = mqtt_client(mosquitto_broker, "dev1")
    dev1.publish(t.update("dev1", 1), sent["dev1"][0])  # replay of the same message
    nan = {s.name: np.zeros(s.shape, np.float32) for s in SPECS}
    wrong = encode_update({"layer.0.lora_A": np.zeros((4, 64), np.float32), "layer.0.lora_B": nan["layer.0.lora_B"]},
                          bundle_hash=BUNDLE, device_id="dev3", round=1, samples=5)
    mqtt_client(mosquitto_broker, "dev3").publish(
        t.update("dev3", 1), Envelope.build("update", sender="dev3", fleet=FLEET, round=1, body=wrong))

    outcomes = _ingest(store, rules, q, 4)
    assert sorted(outcomes) == ["duplicate_key", "stored", "stored", "stored"]
    assert store.count_updates(1) == 2
    assert [u.reason for u in store.updates(1, accepted=False)] == [RejectReason.WRONG_SHAPE.value]

    # aggregate exactly what was counted: dev1 once, dev2 once
    ups = []
    for u in store.updates(1):
        checked, _ = validate_payload(rules, u.payload, sender=u.device)
        ups.append(ClientUpdate(u.device, checked.tensors, checked.samples, is_delta=checked.is_delta))
    new, _ = get_strategy("fedavg").aggregate(g0, ups)
    expect = (sent["dev1"][1]["layer.0.lora_A"] + sent["dev2"][1]["layer.0.lora_A"]) / 2
    np.testing.assert_allclose(new["layer.0.lora_A"], expect, atol=1e-6)
    store.close()

"""Federated rounds under failure, with real processes on a real (private, restartable) Mosquitto:
a device killed or frozen mid-round, the coordinator killed mid-round and restarted, the broker
restarted mid-round, and bad updates injected into a running round.

Rounds are made long where something must happen "mid-round" by giving one device a large shard and
several local epochs; the tests wait on what they can observe (the store, the devices' work
directories), never on fixed sleeps. Wrong passwords and ACL refusals are covered against the same
broker setup in tests/test_broker_mosquitto.py (test_wrong_password_is_refused,
test_device_cannot_publish_on_another_devices_topic, test_device_cannot_read_what_is_addressed_to_another).
"""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from deftkit import __version__
from tests._fleet import Fleet, fedavg_from_store, running_fleet, store_globals, store_updates, write_shard

pytestmark = pytest.mark.mosquitto

#: local epochs for the asymmetric rounds: the small shard trains in a blink, the big one for seconds
EPOCHS = 6
SMALL, BIG = 32, 2000


@pytest.fixture
def fleet(fresh_mosquitto, tiny_bert_bundle, tmp_path) -> Iterator[Fleet]:
    """Coordinator and device processes on a private Mosquitto; all killed at teardown."""
    with running_fleet(fresh_mosquitto(), tiny_bert_bundle, tmp_path / "fleet") as f:
        yield f


def _check_fedavg(f: Fleet, r: int) -> None:
    """The stored global of round ``r`` is the FedAvg of exactly the updates stored for it."""
    expect, _ = fedavg_from_store(f.db_path, r)
    got = store_globals(f.db_path)[r]
    for k, v in got.items():
        np.testing.assert_allclose(v, expect[k], rtol=1e-5, atol=1e-7, err_msg=f"round {r} tensor {k}")


def test_device_killed_mid_round_round_closes_with_the_rest(fleet, tmp_path):
    data = {"dev1": write_shard(tmp_path / "a.tsv", 0, SMALL), "dev2": write_shard(tmp_path / "b.tsv", 100, BIG),
            "dev3": write_shard(tmp_path / "c.tsv", 50, SMALL)}
    edge = fleet.coordinator(devices=["dev1", "dev2", "dev3"], rounds=2, min_devices=3, deadline=90, epochs=EPOCHS)
    devs = {d: fleet.device(d, p, max_rounds=2) for d, p in data.items()}
    fleet.wait_until(lambda: fleet.training("dev2", 1), 60, "dev2 training round 1", watch=[edge, *devs.values()])
    devs["dev2"].kill()  # SIGKILL: no goodbye, only the broker's last will
    t_kill = time.monotonic()
    assert edge.wait(60) == 0, edge.tail()
    closed_after = time.monotonic() - t_kill
    rep = fleet.report()
    r1, r2 = rep["rounds"]
    assert r1["missing"] == ["dev2"] and sorted(r1["devices"]) == ["dev1", "dev3"] and r1["accepted"] == 2
    assert not r1["deadline_hit"] and closed_after < 60  # closed when dev2 was marked lost, not at the 90 s deadline
    assert "dev2" not in fleet.counted(1) and fleet.counted(1) == {"dev1": 1, "dev3": 1}
    _check_fedavg(fleet, 1)
    # the next round goes on without the dead device
    assert sorted(r2["selected"]) == ["dev1", "dev3"] and r2["missing"] == [] and r2["accepted"] == 2
    _check_fedavg(fleet, 2)
    assert "device dev2 went offline" in edge.log()
    for d in ("dev1", "dev3"):
        assert devs[d].wait(30) == 0, devs[d].tail()


def test_frozen_device_round_closes_at_the_deadline(fleet, tmp_path):
    """A device that stops answering but keeps its connection (SIGSTOP) is waited for until the deadline."""
    deadline = 7.0
    data = {"dev1": write_shard(tmp_path / "a.tsv", 0, SMALL), "dev2": write_shard(tmp_path / "b.tsv", 100, BIG)}
    edge = fleet.coordinator(devices=["dev1", "dev2"], rounds=1, min_devices=2, deadline=deadline, epochs=EPOCHS)
    devs = {d: fleet.device(d, p, max_rounds=1) for d, p in data.items()}
    fleet.wait_until(lambda: fleet.training("dev2", 1), 60, "dev2 training round 1", watch=[edge, *devs.values()])
    devs["dev2"].signal(signal.SIGSTOP)
    try:
        assert edge.wait(60) == 0, edge.tail()
    finally:
        devs["dev2"].kill()
    r1 = fleet.report()["rounds"][0]
    assert r1["deadline_hit"] and r1["missing"] == ["dev2"] and r1["devices"] == ["dev1"]
    assert deadline - 0.5 <= r1["wall_s"] < deadline + 10
    assert "deadline reached; closing without dev2" in edge.log()
    _check_fedavg(fleet, 1)


def test_coordinator_killed_mid_round_and_restarted_counts_each_update_once(fleet, tmp_path):
    data = {"dev1": write_shard(tmp_path / "a.tsv", 0, SMALL), "dev2": write_shard(tmp_path / "b.tsv", 100, BIG)}
    edge = fleet.coordinator(devices=["dev1", "dev2"], rounds=2, min_devices=2, deadline=120, epochs=EPOCHS)
    devs = {d: fleet.device(d, p, max_rounds=2) for d, p in data.items()}
    # kill -9 once dev1's update is stored and dev2 is still training
    fleet.wait_until(lambda: fleet.counted(1) == {"dev1": 1} and fleet.training("dev2", 1), 60,
                     "dev1's update counted while dev2 trains", watch=[edge, *devs.values()])
    edge.kill()
    assert fleet.round_status(1) == "open" and fleet.counted(1) == {"dev1": 1}, "the kill came too late to test"
    # dev2 finishes and uploads while there is no coordinator: the broker queues it in the edge's session
    fleet.wait_until(lambda: (fleet.device_dir("dev2") / "sent" / "round-1.deft").exists(), 60,
                     "dev2's round-1 update", watch=list(devs.values()))
    edge2 = fleet.coordinator(devices=["dev1", "dev2"], rounds=2, min_devices=2, deadline=120, epochs=EPOCHS)
    assert edge2.wait(90) == 0, fleet.logs()
    for p in devs.values():
        assert p.wait(30) == 0, p.tail()
    assert "round 1 resumed after a restart (1 update(s) already counted)" in edge2.log()
    rep = fleet.report()
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    for r in (1, 2):
        res = rep["rounds"][r - 1]
        assert sorted(res["devices"]) == ["dev1", "dev2"] and res["accepted"] == 2 and res["missing"] == []
        assert fleet.counted(r) == {"dev1": 1, "dev2": 1}  # stored once each, whatever was redelivered
        _check_fedavg(fleet, r)
    # round 2 started from round 1's stored global, and the devices ended with round 2's
    from safetensors.numpy import load_file

    final = store_globals(fleet.db_path)[2]
    for d in ("dev1", "dev2"):
        got = load_file(str(fleet.device_dir(d) / "global.safetensors"))
        assert all(np.array_equal(got[k], final[k]) for k in final)
    # each device trained each round once (a resent task gets the stored update, not a retrain)
    for d in ("dev1", "dev2"):
        rounds = [r["round"] for r in devs[d].result()["rounds"]]
        assert sorted(rounds) == [1, 2]
        assert devs[d].log().count("round 1: trained") == 1


def test_broker_restarted_mid_round_devices_reconnect(fleet, tmp_path):
    """Mosquitto goes down (and publishes every device's last will) with one update in and one device
    still training: everyone reconnects, the live device is not written off, the round completes."""
    data = {"dev1": write_shard(tmp_path / "a.tsv", 0, SMALL), "dev2": write_shard(tmp_path / "b.tsv", 100, BIG)}
    edge = fleet.coordinator(devices=["dev1", "dev2"], rounds=1, min_devices=2, deadline=120, epochs=EPOCHS)
    devs = {d: fleet.device(d, p, max_rounds=1) for d, p in data.items()}
    fleet.wait_until(lambda: fleet.counted(1) == {"dev1": 1} and fleet.training("dev2", 1), 60,
                     "dev1's update counted while dev2 trains", watch=[edge, *devs.values()])
    old_pid = fleet.but.broker.pid
    fleet.but.broker.restart()  # SIGTERM (Mosquitto saves its sessions) and start again on the same port
    assert fleet.but.broker.pid != old_pid
    assert edge.wait(90) == 0, fleet.logs()
    for p in devs.values():
        assert p.wait(60) == 0, p.tail()
    assert "reconnected to the broker" in edge.log()
    r1 = fleet.report()["rounds"][0]
    assert sorted(r1["devices"]) == ["dev1", "dev2"] and r1["missing"] == [] and not r1["deadline_hit"], fleet.logs()
    assert fleet.counted(1) == {"dev1": 1, "dev2": 1}
    _check_fedavg(fleet, 1)
    for d, p in devs.items():
        summary = p.result()
        assert summary["connects"] >= 2, f"{d} never reconnected: {summary}"
    assert devs["dev2"].result()["rounds"][0]["accepted"] is True


# ---- bad updates injected into a running round ---------------------------------------------------
def _payload(bundle_hash: str, dev: str, r: int, tensors: dict[str, np.ndarray], samples: int = 10) -> bytes:
    from device_runtime.payload import encode_update

    return encode_update(tensors, bundle_hash=bundle_hash, device_id=dev, round=r, samples=samples, encoding="fp32",
                         base={k: np.zeros_like(v) for k, v in tensors.items()})


def _forged_payload(bundle_hash: str, dev: str, r: int, tensors: dict[str, np.ndarray]) -> bytes:
    """What a faulty device could send: a well-formed payload (consistent content hash) carrying NaN,
    which the kit's own encoder refuses to write."""
    from safetensors.numpy import save

    from device_runtime.payload import _META_KEY, PayloadMeta, _content_hash

    meta = PayloadMeta(bundle_hash=bundle_hash, device_id=dev, round=r, samples=10, encoding="fp32", kind="delta")
    digest = _content_hash(meta.model_dump_json(), tensors)
    return save(tensors, metadata={_META_KEY: meta.model_copy(update={"content_sha256": digest}).model_dump_json()})


def test_bad_updates_are_refused_with_reasons_and_the_round_completes(fleet, tmp_path, mqtt_client):
    from device_runtime.bundle.load import load_bundle
    from device_runtime.protocol import Ack, Envelope, PayloadTooLarge, PublishRefused, parse_body
    from tests._broker import TEST_MAX_PACKET

    bundle = load_bundle(fleet.bundle)
    specs = {s.name: tuple(s.shape) for s in bundle.manifest.trainable}
    t = fleet.but.topics
    data = {"dev1": write_shard(tmp_path / "a.tsv", 0, 300), "dev2": write_shard(tmp_path / "b.tsv", 300, 300)}
    # dev3 is in the fleet but played by this test; dev4 has a broker account and is not in the fleet;
    # dev5 is in the fleet list but says hello only after the round was opened without it
    from device_runtime.protocol import Hello, to_envelope

    clients, acks = {}, {}
    for d in ("dev3", "dev4", "dev5"):
        c = clients[d] = mqtt_client(fleet.but, d)
        acks[d] = c.subscribe(t.ack_to(d))
        if d != "dev5":  # retained, like the agent's: the coordinator sees it whenever it starts
            c.publish(t.hello(d), to_envelope(Hello(kit_version=__version__), sender=d, fleet=fleet.but.fleet),
                      retain=True)
    edge = fleet.coordinator(devices=["dev1", "dev2", "dev3", "dev5"], rounds=1, min_devices=3, deadline=120, steps=200,
                             extra=["--max-update-bytes", "200000"])
    devs = {d: fleet.device(d, p, max_rounds=1) for d, p in data.items()}
    fleet.wait_until(lambda: fleet.training("dev2", 1), 60, "dev2 training", watch=[edge, *devs.values()])
    # hold the round open while the bad updates go in, however loaded the machine is: freeze dev2
    # (its connection stays up; the keepalive would notice only after 15 s) and thaw it afterwards
    devs["dev2"].signal(signal.SIGSTOP)

    def send(dev: str, body: bytes, key: str | None = None) -> Envelope:
        env = Envelope.build("update", sender=dev, fleet=fleet.but.fleet, round=1, body=body, content="safetensors",
                             key=key)
        clients[dev].publish(t.update(dev, 1), env)
        return env

    def ack_for(dev: str, env: Envelope, timeout: float = 15.0) -> Ack:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                a = parse_body(acks[dev].get(timeout=0.2).envelope, Ack)
            except queue.Empty:
                continue
            if a.ack == env.header.key:
                return a
        raise AssertionError(f"no ack for {env.header.key} from the coordinator\n{fleet.logs()}")

    small = {n: np.full(s, 1e-3, np.float32) for n, s in specs.items()}
    fleet.wait_until(lambda: fleet.query("SELECT 1 FROM devices WHERE id='dev3'"), 15, "dev3's hello registered")

    # a valid update, then the very same message replayed: accepted once, acknowledged both times
    good = send("dev3", _payload(bundle.hash, "dev3", 1, small))
    a = ack_for("dev3", good)
    assert a.accepted and a.reason is None
    clients["dev3"].publish(t.update("dev3", 1), good)
    a = ack_for("dev3", good)
    assert a.accepted and a.reason == "duplicate"

    # wrong shapes
    name = min(specs)
    wrong = dict(small, **{name: np.zeros(tuple(d + 1 for d in specs[name]), np.float32)})
    a = ack_for("dev3", send("dev3", _payload(bundle.hash, "dev3", 1, wrong)))
    assert not a.accepted and a.reason.startswith("wrong_shape:") and name in a.reason

    # NaN values
    nan = {n: v.copy() for n, v in small.items()}
    nan[name].flat[0] = np.nan
    a = ack_for("dev3", send("dev3", _forged_payload(bundle.hash, "dev3", 1, nan)))
    assert not a.accepted and a.reason.startswith("non_finite:") and name in a.reason

    # tampered payload: a tensor byte changed after the payload's content hash was computed
    blob = bytearray(_payload(bundle.hash, "dev3", 1, small))
    blob[-1] ^= 0x01
    a = ack_for("dev3", send("dev3", bytes(blob)))
    assert not a.accepted and a.reason.startswith("malformed:") and "sha256" in a.reason

    # tampered envelope: the body no longer matches the envelope's sha256; dropped and logged, never acked
    env = Envelope.build("update", sender="dev3", fleet=fleet.but.fleet, round=1, content="safetensors",
                         body=_payload(bundle.hash, "dev3", 1, small))
    raw = bytearray(env.encode())
    raw[-1] ^= 0x01
    clients["dev3"].publish(t.update("dev3", 1), bytes(raw))

    # oversize: chunked through the broker (64 KiB packets), reassembled, refused by the size rule
    big = dict(small, extra=np.ones(80_000, np.float32))
    env_big = Envelope.build("update", sender="dev3", fleet=fleet.but.fleet, round=1, content="safetensors",
                             body=_payload(bundle.hash, "dev3", 1, big))
    assert clients["dev3"].publish(t.update("dev3", 1), env_big) > 1  # really sent in several packets
    a = ack_for("dev3", env_big)
    assert not a.accepted and a.reason.startswith("too_large:") and "limit 200000" in a.reason
    # ... and one packet over the broker's limit never leaves the client (the broker would drop the link)
    with pytest.raises(PayloadTooLarge, match=f"max packet size {TEST_MAX_PACKET}"):
        clients["dev3"].publish(t.update("dev3", 1), b"\0" * (TEST_MAX_PACKET + 1))

    # impersonation: dev3 writing an update on dev1's topic is refused by the broker's ACL
    forged = Envelope.build("update", sender="dev3", fleet=fleet.but.fleet, round=1, content="safetensors",
                            body=_payload(bundle.hash, "dev1", 1, small))
    with pytest.raises(PublishRefused, match="ACL"):
        clients["dev3"].publish(t.update("dev1", 1), forged)

    # a second, different update from dev3 in the same round: one vote per device
    other = {n: np.full(s, 2e-3, np.float32) for n, s in specs.items()}
    a = ack_for("dev3", send("dev3", _payload(bundle.hash, "dev3", 1, other)))
    assert not a.accepted and "already has an update counted in round 1" in a.reason

    # unknown device: has a broker account, is not in the coordinator's device list
    a = ack_for("dev4", send("dev4", _payload(bundle.hash, "dev4", 1, small)))
    assert not a.accepted and a.reason.startswith("unknown_device:") and "dev4" in a.reason
    # ... and one on the list that never said hello
    a = ack_for("dev5", send("dev5", _payload(bundle.hash, "dev5", 1, small)))
    assert not a.accepted and a.reason.startswith("unknown_device:") and "dev5" in a.reason
    # ... which says hello now, after the round was opened without it: registered, but not selected
    clients["dev5"].publish(t.hello("dev5"), to_envelope(Hello(kit_version=__version__), sender="dev5",
                                                         fleet=fleet.but.fleet))
    fleet.wait_until(lambda: fleet.query("SELECT 1 FROM devices WHERE id='dev5'"), 15, "dev5's hello registered")
    a = ack_for("dev5", send("dev5", _payload(bundle.hash, "dev5", 1, small)))
    assert not a.accepted and a.reason.startswith("not_selected:") and "round 1" in a.reason

    # the round was open through all of this, and completes with the honest devices
    assert fleet.round_status(1) == "open"
    devs["dev2"].signal(signal.SIGCONT)
    assert edge.wait(90) == 0, fleet.logs()
    for p in devs.values():
        assert p.wait(30) == 0, p.tail()
        assert p.result()["rounds"][0]["accepted"] is True
    r1 = fleet.report()["rounds"][0]
    assert sorted(r1["devices"]) == ["dev1", "dev2", "dev3"] and r1["missing"] == []
    assert fleet.counted(1) == {"dev1": 1, "dev2": 1, "dev3": 1}
    refused = sorted(why for _, _, _, _, why in store_updates(fleet.db_path, 1, accepted=False))
    assert refused == ["malformed", "non_finite", "not_selected", "too_large", "unknown_device", "unknown_device",
                       "wrong_shape"]
    assert r1["rejected"] == {"malformed": 2, "non_finite": 1, "too_large": 1, "unknown_device": 2,
                              "wrong_shape": 1, "device_mismatch": 1, "not_selected": 1}
    assert sorted(r1["selected"]) == ["dev1", "dev2", "dev3"]
    assert r1["duplicates"] == 1
    log = edge.log()
    assert "refused a update from dev3" in log and "fails its sha256 check" in log
    assert "ignoring hello from unknown device 'dev4'" in log
    _check_fedavg(fleet, 1)
    # dev3's one counted update is the first one it sent, not the later different one; dev1's is its own
    keys = {u[1]: u[0] for u in store_updates(fleet.db_path, 1)}
    assert keys["dev3"] == good.header.key
    sent = Envelope.decode((fleet.device_dir("dev1") / "sent" / "round-1.deft").read_bytes())
    assert keys["dev1"] == sent.header.key


def test_device_with_a_wrong_password_exits_with_a_one_line_error(fleet, tmp_path):
    dev = fleet.device("dev1", write_shard(tmp_path / "a.tsv", 0, SMALL), password="not-the-password")
    assert dev.wait(30) == 2, dev.tail()
    err = dev.log()
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "refused user 'dev1'" in line and "password" in line

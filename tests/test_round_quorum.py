"""Straggler handling: with a quorum the round closes once enough updates are in; the straggler's late
update is refused for the closed round and never counted. Real Mosquitto, real ORT, tiny BERT."""

from __future__ import annotations

import threading
import time

import pytest

from device_runtime.agent import AgentConfig, DeviceAgent
from device_runtime.bundle.archive import BundleCache
from edge_broker.coordinator.config import CoordinatorConfig
from edge_broker.coordinator.coordinator import Coordinator
from tests._broker import FLEET
from tests._models import SST2_TRAIN

pytestmark = pytest.mark.mosquitto


def _shard(path, start, n):
    lines = SST2_TRAIN.read_text().splitlines()
    path.write_text("\n".join([lines[0], *lines[1 + start:1 + start + n]]) + "\n")
    return path


def test_quorum_closes_the_round_without_the_straggler(fresh_mosquitto, tiny_bert_bundle, tmp_path):
    but = fresh_mosquitto()
    url = f"mqtt://127.0.0.1:{but.broker.port}"
    rows = {"dev1": 32, "dev2": 32, "dev3": 1600}  # dev3 trains 50x longer
    cfg = CoordinatorConfig(broker=url, password=but.passwords["edge"], fleet=FLEET, bundle=tiny_bert_bundle,
                            workdir=tmp_path / "edge", rounds=1, devices=list(rows), min_devices=3, quorum=2,
                            deadline_s=300, hyperparams={"epochs": 1, "batch_size": 8, "lr": 1e-2}, eval_initial=False)
    agents, start = [], 0
    for d, n in rows.items():
        # the bundle is already on each device (as after a first round): the straggler is the device
        # that trains 50x longer, not whichever the edge happens to send the bundle to last
        BundleCache(tmp_path / d / "bundles").add_dir(tiny_bert_bundle)
        agents.append(DeviceAgent(AgentConfig(broker=url, device_id=d, password=but.passwords[d], fleet=FLEET,
                                              data=_shard(tmp_path / f"{d}.tsv", start, n), workdir=tmp_path / d,
                                              threads=1, max_rounds=1)))
        start += n
    for a in agents:
        threading.Thread(target=a.run, daemon=True).start()
    coord = Coordinator(cfg)
    try:
        report = coord.run()
        r1 = report["rounds"][0]
        assert r1["accepted"] == 2 and sorted(r1["devices"]) == ["dev1", "dev2"] and r1["missing"] == ["dev3"]
        assert coord.store.count_updates(1) == 2
        # the straggler finishes later: its update is refused (the round is closed) and not counted
        assert coord.inbox.open is None  # the round is closed
        deadline = time.monotonic() + 120
        while not coord.store.updates(1, accepted=False) and time.monotonic() < deadline:
            coord.pump(0.5)
        late = coord.store.updates(1, accepted=False, with_payload=False)
        assert [(u.device, u.reason) for u in late] == [("dev3", "wrong_round")]
        assert coord.store.count_updates(1) == 2
    finally:
        for a in agents:
            a.stop_event.set()
        coord.close()

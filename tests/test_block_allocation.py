"""LoLa DEFT wired into the rounds: the coordinator matches devices to blocks (CRUNCH) from their
hello profiles, each device trains a variant bundle with only its blocks trainable, and the global
state combines the blocks. Real Mosquitto, real ONNX Runtime, tiny random BERT."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from device_runtime.agent import AgentConfig, DeviceAgent
from device_runtime.bundle.load import load_bundle
from device_runtime.payload import decode_update
from edge_broker.coordinator.block_plan import make_block_bundle
from edge_broker.coordinator.config import CoordinatorConfig
from edge_broker.coordinator.coordinator import Coordinator
from tests._broker import FLEET
from tests._models import SST2_TRAIN

pytestmark = pytest.mark.mosquitto

BOARDS = {"dev1": "rpi4-4gb", "dev2": "jetson-agx-orin-64gb"}


@pytest.fixture
def shard(tmp_path):
    lines = SST2_TRAIN.read_text().splitlines()
    p = tmp_path / "shard.tsv"
    p.write_text("\n".join(lines[:161]) + "\n")
    return p


def test_each_device_trains_only_its_blocks_and_the_global_state_combines_them(
        fresh_mosquitto, tiny_bert_bundle, shard, tmp_path):
    but = fresh_mosquitto()
    url = f"mqtt://127.0.0.1:{but.broker.port}"
    cfg = CoordinatorConfig(broker=url, password=but.passwords["edge"], fleet=FLEET, bundle=tiny_bert_bundle,
                            workdir=tmp_path / "edge", rounds=1, devices=list(BOARDS), min_devices=2,
                            deadline_s=120, allocation="crunch", hyperparams={"steps": 6, "batch_size": 8, "lr": 1e-2},
                            encoding="fp32", eval_initial=False)
    agents = [DeviceAgent(AgentConfig(broker=url, device_id=d, password=but.passwords[d], fleet=FLEET, data=shard,
                                      workdir=tmp_path / d, threads=1, profile={"board": b}, max_rounds=1))
              for d, b in BOARDS.items()]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    coord = Coordinator(cfg)
    try:
        g0 = None
        report = coord.run()
        g0 = coord.store.load_global(0)[1]
        g1 = coord.store.load_global(1)[1]
        ups = {u.device: decode_update(u.payload) for u in coord.store.updates(1)}
        rec = coord.store.round(1)
    finally:
        for a in agents:
            a.stop_event.set()
        coord.close()
    full = load_bundle(tiny_bert_bundle).manifest
    plan = report["rounds"][0]["allocation"]
    blocks = {d: set(p["blocks"]) for d, p in plan["devices"].items()}
    # every block to exactly one device; the faster board takes the deeper blocks (further from the output)
    trained = sorted({t.block for t in full.trainable if t.block is not None})
    assert sorted(b for bs in blocks.values() for b in bs) == trained
    assert max(blocks["dev2"]) < min(blocks["dev1"])
    assert plan["round_latency_s"] > 0 and plan["measured_latency_s"] > 0
    # each device trained (and uploaded) only its own blocks' tensors, on its own variant bundle
    names = {d: set(u.tensors) for d, u in ups.items()}
    assert not names["dev1"] & names["dev2"]
    assert names["dev1"] | names["dev2"] == set(full.trainable_names)
    for d, u in ups.items():
        variant = load_bundle(rec.config["variants"][d])
        assert u.meta.bundle_hash == variant.hash != load_bundle(tiny_bert_bundle).hash
        assert set(variant.manifest.trainable_names) == names[d]
        assert {full.tensor(n).block for n in names[d]} - {None} == blocks[d]
        # FedAvg of one owner per tensor: the global value is exactly that device's trained tensor
        trained = u.full_tensors(g0)
        for n in names[d]:
            np.testing.assert_allclose(g1[n], trained[n], atol=1e-7)
            assert not np.array_equal(g1[n], g0[n]) or "lora_A" in n


def test_frozen_tensors_of_a_block_variant_follow_the_global_state(tiny_bert_bundle, tmp_path):
    from device_runtime.backends import make_backend
    from device_runtime.errors import StateError

    full = load_bundle(tiny_bert_bundle)
    variant = make_block_bundle(full, [3], head=True, root=tmp_path)
    assert load_bundle(variant.root).hash == variant.hash  # a verified bundle in its own right
    be = make_backend(variant, "ort")
    other = next(t for t in full.manifest.trainable if t.block == 0 and t.kind == "lora_B")
    assert other.name not in variant.manifest.trainable_names
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    before = be.logits(batch)
    be.set_frozen({other.name: np.full(other.shape, 0.5, np.float32)})
    assert not np.allclose(be.logits(batch), before)  # the frozen block-0 LoRA now takes part in the forward
    with pytest.raises(StateError, match="shape"):
        be.set_frozen({other.name: np.zeros((1, 1), np.float32)})
    with pytest.raises(StateError, match="NaN"):
        be.set_frozen({other.name: np.full(other.shape, np.nan, np.float32)})

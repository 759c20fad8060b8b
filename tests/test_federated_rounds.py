"""Federated rounds end to end: a real coordinator and real device processes over a real Mosquitto.

Devices start without the bundle (they fetch it over MQTT), train on their own SST-2 shard, and the
coordinator aggregates, evaluates the plugged-in full model, writes the PEFT adapter and the report.
Every number the report claims is recomputed here from the coordinator's store.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from device_runtime.bundle.load import load_bundle
from tests._fleet import Fleet, fedavg_from_store, running_fleet, store_globals, store_updates, write_shard
from tests._models import SST2_VALIDATION

pytestmark = pytest.mark.mosquitto

DEVICES = ["dev1", "dev2", "dev3"]
#: unequal shards, so a sample-weighted mean differs from a plain one
SHARDS = {"dev1": (0, 96), "dev2": (96, 240), "dev3": (336, 48)}


@pytest.fixture
def fleet(fresh_mosquitto, tiny_bert_bundle, tmp_path) -> Iterator[Fleet]:
    """Coordinator and device processes on a private Mosquitto; all killed at teardown."""
    with running_fleet(fresh_mosquitto(), tiny_bert_bundle, tmp_path / "fleet") as f:
        yield f


def test_two_rounds_three_devices_fedavg_plugin_and_report(fleet, tmp_path):
    data = {d: write_shard(tmp_path / f"{d}.tsv", *SHARDS[d]) for d in DEVICES}
    edge = fleet.coordinator(devices=DEVICES, rounds=2, min_devices=3, eval_data=SST2_VALIDATION)
    devs = [fleet.device(d, data[d], max_rounds=2) for d in DEVICES]
    rc = edge.wait(120)
    assert rc == 0, edge.tail()
    for p in devs:
        assert p.wait(30) == 0, p.tail()
    out = edge.result()
    rep = fleet.report()
    bundle = load_bundle(fleet.bundle)

    # one accuracy per round, in the JSON line and in report.json alike
    assert len(out["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in out["accuracy"])
    assert rep["accuracy"] == out["accuracy"] and out["final_accuracy"] == out["accuracy"][-1]
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    assert (fleet.edge_dir / "report" / "report.png").stat().st_size > 1000

    globals_ = store_globals(fleet.db_path)
    assert sorted(globals_) == [0, 1, 2]
    for r in (1, 2):
        res = rep["rounds"][r - 1]
        # every selected device counted exactly once, nothing missing or rejected
        assert sorted(res["selected"]) == DEVICES and res["missing"] == [] and res["rejected"] == {}
        assert sorted(res["devices"]) == DEVICES and res["accepted"] == 3
        assert fleet.counted(r) == {d: 1 for d in DEVICES}
        ups = store_updates(fleet.db_path, r)
        assert {d: s for _, d, s, _, _ in ups} == {d: SHARDS[d][1] for d in DEVICES}
        assert res["samples"] == sum(n for _, n in SHARDS.values())
        # the new global state is the sample-weighted mean of the stored deltas applied to the previous one
        expect, devices = fedavg_from_store(fleet.db_path, r)
        assert sorted(devices) == DEVICES
        for k, v in globals_[r].items():
            np.testing.assert_allclose(v, expect[k], rtol=1e-5, atol=1e-7, err_msg=f"round {r} tensor {k}")
        # and training moved it (a FedAvg of zero deltas would also "match")
        assert max(float(np.abs(globals_[r][k] - globals_[r - 1][k]).max()) for k in globals_[r]) > 1e-4
    # the weights really are by samples (240 of 384 for dev2), not uniform
    w = dict(zip(rep["rounds"][0]["devices"], rep["rounds"][0]["weights"], strict=True))
    assert w["dev2"] == pytest.approx(240 / 384, abs=1e-4)

    # round 1 sent the bundle down to each device over MQTT; round 2 did not send it again
    size = sum((fleet.bundle / f).stat().st_size for f in bundle.manifest.files)
    assert rep["rounds"][0]["bytes_down"] > 3 * size > rep["rounds"][1]["bytes_down"]
    for d in DEVICES:
        cached = fleet.device_dir(d) / "bundles" / bundle.hash
        assert load_bundle(cached).hash == bundle.hash  # verifies every file's sha256 again
        # each device ended with the final global state the coordinator stored
        from safetensors.numpy import load_file

        got = load_file(str(fleet.device_dir(d) / "global.safetensors"))
        assert sorted(got) == sorted(globals_[2])
        for k in got:
            np.testing.assert_array_equal(got[k], globals_[2][k])

    # the adapter directory loads with stock PEFT and gives the kit's plug-in logits
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from export.plugin import load_full_model, plug_in

    assert out["adapter_dir"] and (fleet.edge_dir / "report" / "adapter" / "adapter_config.json").is_file()
    src = bundle.manifest.source_model
    stock = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(src),
                                      out["adapter_dir"]).eval()
    kit = plug_in(load_full_model(bundle.manifest), bundle.manifest, globals_[2])
    ids = torch.randint(1000, 5000, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask).logits
        b = kit(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        assert (base(input_ids=ids, attention_mask=mask).logits - a).abs().max() > 1e-4  # the adapter does something

"""Cost tables, the scaling rule between profiles, and the analytic encoder costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_broker.allocation import Instance
from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import latency_matrix
from hardware.cost_table import CostEntry, CostTable, CostTableError
from hardware.profiles import builtin_profiles
from hardware.scaling import deepest_fitting_depth, scale_cost_table, time_factor
from hardware.transformer_costs import BERT_BASE, MINILM_L6, analytic_cost_table, block_costs

DEFT = Path(sys.executable).with_name("deft")
P = builtin_profiles()


def _table(profile: str = "laptop-x86", lat=(0.10, 0.15, 0.21), mem=(4e8, 5e8, 6e8), upd=(4e4, 8e4, 2e4)):
    return CostTable(
        profile=profile,
        model="tiny",
        batch=8,
        seq=32,
        entries=[
            CostEntry(depth=i + 1, step_latency_s=lat[i], peak_memory_bytes=mem[i], update_bytes=upd[i])
            for i in range(len(lat))
        ],
    )


def test_table_validation_and_monotone_repair() -> None:
    with pytest.raises(ValueError, match="unique depths in increasing order"):
        CostTable(
            profile="x",
            entries=[
                CostEntry(depth=2, step_latency_s=1, peak_memory_bytes=1, update_bytes=0),
                CostEntry(depth=1, step_latency_s=1, peak_memory_bytes=1, update_bytes=0),
            ],
        )
    noisy = _table(lat=(0.10, 0.099, 0.2), mem=(4e8, 3.9e8, 6e8))
    assert not noisy.is_monotone()
    fixed = noisy.monotone()
    assert fixed.is_monotone()
    assert [e.step_latency_s for e in fixed.entries] == [0.10, 0.10, 0.2]
    assert [e.peak_memory_bytes for e in fixed.entries] == [4e8, 4e8, 6e8]


def test_save_load_roundtrip_and_errors(tmp_path: Path) -> None:
    t = _table()
    t.save(tmp_path / "t.json")
    assert CostTable.load(tmp_path / "t.json") == t
    (tmp_path / "bad.json").write_text(json.dumps({"profile": "x", "entries": [{"depth": 0}]}))
    with pytest.raises(CostTableError, match="field 'entries.0.depth'"):
        CostTable.load(tmp_path / "bad.json")
    with pytest.raises(CostTableError, match="not found"):
        CostTable.load(tmp_path / "nope.json")


def test_to_blocks_gives_the_measured_latency_back() -> None:
    """A table turned into blocks, on a device with the same profile, reproduces its step times."""
    t = _table()
    laptop = P["laptop-x86"]
    inst = Instance.parse(
        {
            "devices": [
                {
                    "id": "lap",
                    "flops": laptop.flops("cpu"),
                    "memory": laptop.memory_bytes,
                    "gain": 1e-9,
                    "power": 0.1,
                    "bandwidth": 1e6,
                }
            ],
            "blocks": t.to_blocks(laptop)[:1],
            "noise": 4e-21,
        }
    )
    t_kd = latency_matrix(inst, np.array([1e6]))[0, 0]
    upload = 8 * 4e4 / (1e6 * np.log2(1 + 0.1 * 1e-9 / (4e-21 * 1e6)))
    assert t_kd - upload == pytest.approx(0.10)
    with pytest.raises(CostTableError, match="scale it first"):
        t.to_blocks(P["rpi4-4gb"])


def test_scaling_rule() -> None:
    t = _table()
    same = scale_cost_table(t, P["laptop-x86"], P["laptop-x86"])
    assert [e.step_latency_s for e in same.entries] == pytest.approx([e.step_latency_s for e in t.entries])
    pi4 = scale_cost_table(t, P["laptop-x86"], P["rpi4-4gb"], compute_fraction=1.0)
    ratio = P["laptop-x86"].flops("cpu") / P["rpi4-4gb"].flops("cpu")
    assert pi4.entries[0].step_latency_s == pytest.approx(0.10 * ratio)
    assert pi4.profile == "rpi4-4gb" and pi4.source == "predicted" and pi4.predicted_from == "laptop-x86"
    assert [e.peak_memory_bytes for e in pi4.entries] == [e.peak_memory_bytes for e in t.entries]
    # memory-bound share scales with memory bandwidth
    k = time_factor(P["laptop-x86"], P["rpi4-4gb"], compute_fraction=0.0)
    assert k == pytest.approx(68.3 / 12.8)
    # a GPU board uses its GPU figure by default
    nano = scale_cost_table(t, P["laptop-x86"], P["jetson-nano-4gb"], compute_fraction=1.0)
    assert nano.backend == "gpu"
    assert nano.entries[0].step_latency_s == pytest.approx(0.10 * 179.2 / 141.6)
    with pytest.raises(CostTableError, match="measured on 'laptop-x86'"):
        scale_cost_table(t, P["rpi5-8gb"], P["rpi4-4gb"])
    with pytest.raises(CostTableError, match="compute_fraction"):
        scale_cost_table(t, P["laptop-x86"], P["rpi4-4gb"], compute_fraction=1.5)


def test_deepest_fitting_depth() -> None:
    t = _table(mem=(1e9, 3e9, 5e9))
    assert deepest_fitting_depth(t, P["rpi4-4gb"]) == 2
    assert deepest_fitting_depth(t, P["rpi4-4gb"], reserve_bytes=3.5e9) == 0
    assert deepest_fitting_depth(t, P["rpi5-8gb"]) == 3


@pytest.mark.parametrize("spec", [MINILM_L6, BERT_BASE])
def test_analytic_costs_are_monotone_and_feed_the_allocator(spec) -> None:
    blocks = block_costs(spec)
    assert len(blocks) == spec.layers
    c = [b["flops"] for b in blocks]
    m = [b["memory"] for b in blocks]
    assert all(np.diff(c) > 0) and all(np.diff(m) > 0)
    # per-depth ranks make the update sizes non-monotone; the instance still validates
    ranks = [16, 4, 8, 2, 8, 4] + [8] * (spec.layers - 6)
    uneven = block_costs(spec.model_copy(update={"lora_rank": ranks}))
    assert uneven[0]["update_bytes"] == 4 * uneven[1]["update_bytes"]
    devices = [
        {
            "id": f"{p.id}-{i}",
            "flops": p.flops(),
            "memory": p.memory_bytes,
            "gain": 1e-9,
            "power": p.uplink.tx_power_w,
            "bandwidth": 1e6,
        }
        for i, p in enumerate(P.values())
    ]
    inst = Instance.parse({"devices": devices, "blocks": uneven[: len(devices)], "noise": 4e-21})
    assert crunch(inst).latency > 0
    table = analytic_cost_table(spec, P["rpi5-8gb"])
    assert table.is_monotone() and table.source == "analytic"
    # BERT-base step on a Pi 5 takes seconds, MiniLM well under that: orders of magnitude are right
    assert 0.05 < analytic_cost_table(MINILM_L6, P["rpi5-8gb"]).entries[0].step_latency_s < 2
    if spec is BERT_BASE:
        assert 1 < table.entries[0].step_latency_s < 30


def test_cli_scale(tmp_path: Path) -> None:
    _table().save(tmp_path / "t.json")
    res = subprocess.run(
        [
            str(DEFT),
            "hw",
            "scale",
            str(tmp_path / "t.json"),
            "--to",
            "rpi5-8gb",
            "--out",
            str(tmp_path / "p.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    printed = CostTable.model_validate_json(res.stdout.splitlines()[-1])
    assert printed == CostTable.load(tmp_path / "p.json") and printed.profile == "rpi5-8gb"
    assert printed.entries[0].step_latency_s > 0.10  # a Pi 5 is slower than the laptop
    res = subprocess.run(
        [str(DEFT), "hw", "scale", str(tmp_path / "t.json"), "--to", "pi9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "unknown profile 'pi9'" in res.stderr

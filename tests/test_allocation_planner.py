"""plan_round: device hellos + a bundle's manifest + a cost table -> who trains which block this round."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deftkit import __version__
from device_runtime.bundle.manifest import Manifest
from device_runtime.protocol.messages import Hello
from edge_broker.allocation.instance import Infeasible, check_allocation
from edge_broker.allocation.planner import DEFAULT_GAIN, NOISE_W_PER_HZ, DeviceInfo, PlanError, plan_round
from hardware.cost_table import CostEntry, CostTable
from hardware.profiles import get_profile
from hardware.scaling import scale_cost_table

DEFT = Path(sys.executable).with_name("deft")
STEPS = 10
TOTAL_BW = 40e6


def _table(depths=(1, 2, 3, 4)) -> CostTable:
    """A MiniLM-like depth curve on the laptop: each block deeper costs ~30% of the first step more."""
    return CostTable(
        profile="laptop-x86",
        backend="cpu",
        model="tiny",
        batch=16,
        seq=32,
        entries=[
            CostEntry(
                depth=d, step_latency_s=0.08 + 0.03 * d, peak_memory_bytes=3e8 + 2e7 * d, update_bytes=1.0
            )
            for d in depths
        ],
    )


def _hello(board: str, backend: str) -> Hello:
    return Hello(kit_version=__version__, profile={"board": board}, capabilities={"backend": backend})


FLEET = [
    DeviceInfo.from_hello("agx-1", _hello("jetson-agx-orin-64gb", "torch")),
    DeviceInfo.from_hello("pi4-1", _hello("rpi4-4gb", "ort")),
    DeviceInfo.from_hello("orin-nano-1", _hello("jetson-orin-nano-8gb", "torch")),
    DeviceInfo.from_hello("pi5-1", _hello("rpi5-8gb", "ort")),
    DeviceInfo.from_hello("pi4-2", _hello("rpi4-8gb", "ort")),
]


@pytest.fixture(scope="module")
def manifest(tiny_bert_bundle: Path) -> Manifest:
    return Manifest.load(tiny_bert_bundle)


def _update_bytes(m: Manifest) -> dict[int, int]:
    """Independent of the planner: LoRA bytes per block, the head's bytes on the block next to the output."""
    out = {b: 4 * sum(t.numel for t in m.trainable if t.block == b) for b in range(4)}
    out[3] += 4 * sum(t.numel for t in m.trainable if t.kind == "head")
    return out


@pytest.mark.parametrize("method", ["crunch", "joint"])
def test_mixed_fleet_plan_is_feasible_and_assigns_every_block_once(manifest: Manifest, method: str) -> None:
    plan = plan_round(FLEET, manifest, _table(), TOTAL_BW, method, steps=STEPS)
    check_allocation(plan.instance, plan.allocation, total_bandwidth=TOTAL_BW if method == "joint" else None)
    assigned = sorted(b for d in plan.devices for b in d.blocks)
    assert assigned == [0, 1, 2, 3]
    assert plan.assignment == {b: plan.allocation.assignment[4 - b] for b in range(4)}
    # 5 devices, 4 blocks: exactly one idles, without a block or bandwidth, and the plan says so
    assert len(plan.idle) == 1
    idle = plan.device(plan.idle[0])
    assert idle.idle and idle.blocks == [] and idle.bandwidth_hz == 0 and idle.predicted_latency_s == 0
    assert any("idle this round" in n and plan.idle[0] in n for n in plan.notes)
    # per-device latencies: the round is as slow as the slowest device
    assert max(d.predicted_latency_s for d in plan.devices) == pytest.approx(plan.round_latency_s, rel=1e-12)
    # tensors: a partition of the bundle's trainable names along the blocks, head with block 3
    names = [n for d in plan.devices for n in plan.tensor_names_for(d.id)]
    assert sorted(names) == sorted(manifest.trainable_names)
    head_owner = plan.assignment[3]
    assert {manifest.tensor(n).kind for n in plan.tensor_names_for(head_owner)} >= {
        "head",
        "lora_A",
        "lora_B",
    }
    for d in plan.devices:
        assert {manifest.tensor(n).block for n in plan.tensor_names_for(d.id)} - {None} == set(d.blocks)
        assert d.layers == [manifest.emulator.layer_map[b] for b in d.blocks]
    if method == "joint":
        assert sum(d.bandwidth_hz for d in plan.devices) <= TOTAL_BW * (1 + 1e-9)


@pytest.mark.parametrize("method", ["crunch", "joint"])
def test_faster_devices_get_deeper_blocks(manifest: Manifest, method: str) -> None:
    plan = plan_round(FLEET, manifest, _table(), TOTAL_BW, method, steps=STEPS)
    busy = sorted((d for d in plan.devices if not d.idle), key=lambda d: d.flops)
    depths = [max(d.depths) for d in busy]
    assert depths == sorted(depths), [(d.id, d.flops, d.depths) for d in busy]
    assert plan.device("agx-1").depths == [4]  # the AGX Orin's GPU takes block 0, farthest from the output
    assert plan.device("agx-1").backend == "gpu" and plan.device("pi5-1").backend == "cpu"
    # the slowest board (a Pi 4) is never given more than the block next to the output
    assert all(plan.device(k).depths in ([], [1]) for k in ("pi4-1", "pi4-2"))


def _equivalent_instance(m: Manifest) -> tuple[dict, dict[str, list[float]]]:
    """The instance built by hand from the profiles and the scaled tables, and each device's t_kd."""
    src = get_profile("laptop-x86")
    upd = _update_bytes(m)
    devices, t_expected = [], {}
    for info in FLEET:
        board = get_profile(info.profile["board"])
        backend = "cpu" if info.capabilities["backend"] == "ort" else board.backend()
        scaled = scale_cost_table(_table(), src, board, target_backend=backend)
        b, p = board.uplink.bandwidth_hz, board.uplink.tx_power_w
        rate = b * math.log2(1 + p * DEFAULT_GAIN / (NOISE_W_PER_HZ * b))
        t_expected[info.id] = [
            scaled.entries[d - 1].step_latency_s * STEPS + 8 * upd[4 - d] / rate for d in range(1, 5)
        ]
        # c_d / f_k = scaled latency: blocks carry source seconds x steps, devices 1 / time factor
        devices.append(
            {
                "id": info.id,
                "flops": src.flops("cpu")
                / (scaled.entries[0].step_latency_s / _table().entries[0].step_latency_s),
                "memory": board.memory_bytes - 2**30,
                "gain": DEFAULT_GAIN,
                "power": p,
                "bandwidth": b,
            }
        )
    blocks = [
        {
            "depth": e.depth,
            "flops": e.step_latency_s * src.flops("cpu") * STEPS,
            "memory": e.peak_memory_bytes,
            "update_bytes": upd[4 - e.depth],
        }
        for e in _table().entries
    ]
    return (
        {"devices": devices, "blocks": blocks, "total_bandwidth": TOTAL_BW, "noise": NOISE_W_PER_HZ},
        t_expected,
    )


def _allocate(path: Path, method: str) -> dict:
    r = subprocess.run(
        [str(DEFT), "edge", "allocate", str(path), "--method", method, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_predicted_latency_equals_deft_edge_allocate(manifest: Manifest, tmp_path: Path) -> None:
    inst, t_expected = _equivalent_instance(manifest)
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    for method in ("crunch", "joint"):
        plan = plan_round(FLEET, manifest, _table(), TOTAL_BW, method, steps=STEPS)
        cli = _allocate(tmp_path / "inst.json", method)
        if method == "crunch":  # both optimal: equal
            assert plan.round_latency_s == pytest.approx(cli["latency"], rel=1e-9)
            for d in plan.devices:  # each device's prediction is its scaled step time x steps + upload
                if not d.idle:
                    assert d.predicted_latency_s == pytest.approx(t_expected[d.id][d.depths[0] - 1], rel=1e-9)
        else:  # the tie-break may only help
            assert cli["latency"] * (1 - 1e-3) <= plan.round_latency_s <= cli["latency"] * (1 + 1e-9)
    # the plan's own instance, fed to the CLI, gives the same latency too
    own = plan_round(FLEET, manifest, _table(), TOTAL_BW, "crunch", steps=STEPS)
    (tmp_path / "own.json").write_text(own.instance.model_dump_json())
    assert _allocate(tmp_path / "own.json", "crunch")["latency"] == pytest.approx(
        own.round_latency_s, rel=1e-9
    )


def test_plan_beats_the_random_baseline(manifest: Manifest) -> None:
    best = plan_round(FLEET, manifest, _table(), TOTAL_BW, "crunch", steps=STEPS).round_latency_s
    rand = [
        plan_round(FLEET, manifest, _table(), TOTAL_BW, "random", steps=STEPS, seed=s).round_latency_s
        for s in range(8)
    ]
    assert all(best <= r * (1 + 1e-12) for r in rand) and best < max(rand)


def test_fewer_devices_than_blocks_share_them(manifest: Manifest) -> None:
    two = FLEET[:2]
    plan = plan_round(two, manifest, _table(), TOTAL_BW, "crunch", steps=STEPS)
    check_allocation(plan.instance, plan.allocation)
    assert sorted(b for d in plan.devices for b in d.blocks) == [0, 1, 2, 3]
    assert all(len(d.blocks) == 2 for d in plan.devices) and not plan.idle
    assert any("up to 2 blocks" in n for n in plan.notes)
    # the AGX (deepest blocks) holds block 0; its tensors are its two blocks'
    assert 0 in plan.device("agx-1").blocks
    with pytest.raises(Infeasible, match="4 blocks but only 2 device slots"):
        plan_round(two, manifest, _table(), TOTAL_BW, "crunch", capacity=1)


def test_explicit_figures_and_no_board(manifest: Manifest) -> None:
    dev = DeviceInfo(
        id="lab-1", profile={"flops": 5e10, "memory": 2e9, "power": 0.1, "bandwidth": 1e6, "gain": 1e-8}
    )
    plan = plan_round([dev, *FLEET[:3]], manifest, _table(), TOTAL_BW, "crunch")
    d = plan.instance.devices[0]
    assert (d.flops, d.memory, d.power, d.bandwidth, d.gain) == (5e10, 2e9, 0.1, 1e6, 1e-8)
    assert plan.device("lab-1").board is None
    assert any("cost table is for model 'tiny'" in n for n in plan.notes)  # not this bundle's table


def test_measured_table_end_to_end(tiny_bert_bundle: Path, manifest: Manifest) -> None:
    """Profile the real bundle, then plan with it: memory and costs come from the measurement."""
    from hardware.profiler import profile_bundle

    res = profile_bundle(tiny_bert_bundle, batch=4, seq=16, steps=2, warmup=1)
    plan = plan_round(FLEET, tiny_bert_bundle, res.table, TOTAL_BW, "joint", steps=STEPS)
    check_allocation(plan.instance, plan.allocation, total_bandwidth=TOTAL_BW)
    assert [b.memory for b in plan.instance.blocks] == [e.peak_memory_bytes for e in res.table.entries]
    assert plan.cost_source == "measured on laptop-x86"
    assert not any("cost table is for model" in n for n in plan.notes)  # this bundle's own table


def test_no_cost_table_falls_back_to_an_analytic_estimate(manifest: Manifest) -> None:
    plan = plan_round(FLEET, manifest, None, TOTAL_BW, "crunch", steps=STEPS)
    assert plan.cost_source.startswith("analytic estimate")
    assert any("deft hw profile" in n for n in plan.notes)
    flops = [b.flops for b in plan.instance.blocks]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    check_allocation(plan.instance, plan.allocation)


def test_bad_input_is_named(manifest: Manifest) -> None:
    with pytest.raises(PlanError, match=r"device x: profile.board: unknown profile 'pi9'"):
        plan_round([DeviceInfo(id="x", profile={"board": "pi9"})], manifest, _table(), TOTAL_BW)
    with pytest.raises(PlanError, match="device y: .*neither 'board'.*nor 'flops'"):
        plan_round([DeviceInfo(id="y", profile={"cores": 4})], manifest, _table(), TOTAL_BW)
    with pytest.raises(PlanError, match="device z: memory .*greater than 0"):
        plan_round(
            [DeviceInfo(id="z", profile={"board": "rpi5-8gb", "memory": -1})], manifest, _table(), TOTAL_BW
        )
    with pytest.raises(PlanError, match="profile.backend is gpu but board rpi5-8gb has no usable GPU"):
        plan_round(
            [DeviceInfo(id="g", profile={"board": "rpi5-8gb", "backend": "gpu"})],
            manifest,
            _table(),
            TOTAL_BW,
        )
    with pytest.raises(PlanError, match=r"no entry for depth 4 \(block 0\)"):
        plan_round(FLEET, manifest, _table(depths=(1, 2, 3)), TOTAL_BW)
    with pytest.raises(PlanError, match="no devices"):
        plan_round([], manifest, _table(), TOTAL_BW)
    tiny = [
        DeviceInfo(id=f"t{i}", profile={"flops": 1e10, "memory": 1e6, "power": 0.1, "bandwidth": 1e6})
        for i in range(4)
    ]
    with pytest.raises(Infeasible, match="block at depth 1 needs .* memory"):
        plan_round(tiny, manifest, _table(), TOTAL_BW)


def test_ties_are_broken_toward_fast_devices_on_deep_blocks() -> None:
    """With equal block costs many matchings are optimal; the planner's tie-break puts faster devices deeper
    without raising the round latency (the allocator alone returns an inverted one here)."""
    from edge_broker.allocation import Instance, solve
    from edge_broker.allocation.planner import _prefer_fast_deep

    flops = [4e10, 1e10, 3e10, 2e10, 1e11]
    inst = Instance.parse(
        {
            "devices": [
                {"id": f"d{i}", "flops": f, "memory": 4e9, "gain": 1e-9, "power": 0.1, "bandwidth": 1e7}
                for i, f in enumerate(flops)
            ],
            "blocks": [{"depth": d, "flops": 1e11, "memory": 3e8, "update_bytes": 4096} for d in range(1, 5)],
            "noise": NOISE_W_PER_HZ,
        }
    )
    raw = solve(inst, "crunch")
    fixed = _prefer_fast_deep(inst, raw)
    speed = {f"d{i}": f for i, f in enumerate(flops)}

    def order(a):
        return [a.assignment[d] for d in sorted(a.assignment)]  # device per depth 1..4

    assert [speed[k] for k in order(raw)] != sorted(speed[k] for k in order(raw))  # the case worth fixing
    assert [speed[k] for k in order(fixed)] == sorted(speed[k] for k in order(fixed))
    assert set(order(fixed)) == set(order(raw)) and fixed.latency == pytest.approx(raw.latency, rel=1e-12)
    check_allocation(inst, fixed)

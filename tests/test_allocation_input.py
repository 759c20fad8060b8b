"""Bad instances get one clear error naming the field; infeasible ones say which constraint binds."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edge_broker.allocation import Infeasible, Instance, InstanceError, solve
from edge_broker.allocation.brute import brute_force
from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import check_allocation, latency_matrix
from edge_broker.allocation.matching import prefix_lengths

BASE = {
    "devices": [
        {"id": "pi5-1", "flops": 2.0e10, "memory": 4.0e9, "gain": 1e-7, "power": 0.2, "bandwidth": 1.0e6},
        {"id": "orin-1", "flops": 2.0e11, "memory": 8.0e9, "gain": 1e-9, "power": 0.2, "bandwidth": 1.0e6},
    ],
    "blocks": [
        {"depth": 1, "flops": 1.0e11, "memory": 5.0e8, "update_bytes": 3.0e4},
        {"depth": 2, "flops": 2.0e11, "memory": 6.0e8, "update_bytes": 3.0e4},
    ],
    "total_bandwidth": 1.0e7,
    "noise": 4e-21,
}


def _with(path: tuple, value) -> dict:
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("devices", 0, "flops"), -1.0, "devices.0.flops"),
        (("devices", 1, "memory"), 0.0, "devices.1.memory"),
        (("devices", 0, "gain"), 0.0, "devices.0.gain"),
        (("devices", 0, "power"), -0.2, "devices.0.power"),
        (("devices", 0, "bandwidth"), 0.0, "devices.0.bandwidth"),
        (("devices", 0, "capacity"), 0, "devices.0.capacity"),
        (("blocks", 0, "flops"), 0.0, "blocks.0.flops"),
        (("blocks", 1, "update_bytes"), -5.0, "blocks.1.update_bytes"),
        (("total_bandwidth",), -1.0, "total_bandwidth"),
        (("noise",), 0.0, "noise"),
        (("noise",), None, "noise"),
        (("devices", 0, "flops"), None, "devices.0.flops"),
        (("devices", 0, "colour"), "red", "devices.0.colour"),
    ],
)
def test_bad_numbers_name_the_field(path: tuple, value, needle: str) -> None:
    with pytest.raises(InstanceError) as err:
        Instance.parse(_with(path, value))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("field", ["flops", "memory"])
def test_non_monotone_costs_name_the_field(field: str) -> None:
    data = _with(("blocks", 1, field), BASE["blocks"][0][field] / 2)
    with pytest.raises(InstanceError, match=rf"blocks\[depth=2\]\.{field} .* non-decreasing in depth"):
        Instance.parse(data)


def test_non_monotone_update_bytes_are_allowed() -> None:
    data = _with(("blocks", 1, "update_bytes"), 1.0e3)
    assert Instance.parse(data).blocks[1].update_bytes == 1.0e3


def test_duplicate_ids_and_unsorted_depths() -> None:
    with pytest.raises(InstanceError, match="unique"):
        Instance.parse(_with(("devices", 1, "id"), "pi5-1"))
    data = copy.deepcopy(BASE)
    data["blocks"].reverse()
    with pytest.raises(InstanceError, match="increasing depth"):
        Instance.parse(data)


def test_method_needs_its_inputs() -> None:
    inst = Instance.parse(_with(("devices", 1, "bandwidth"), None))
    with pytest.raises(InstanceError, match=r"devices\[1\] \(orin-1\) has no 'bandwidth'"):
        solve(inst, "crunch")
    assert solve(inst, "joint").latency > 0  # joint chooses bandwidths itself
    inst = Instance.parse(_with(("total_bandwidth",), None))
    with pytest.raises(InstanceError, match="total_bandwidth"):
        solve(inst, "joint")
    with pytest.raises(InstanceError, match="unknown method"):
        solve(inst, "fastest")


def test_block_nobody_can_hold_is_named() -> None:
    data = _with(("blocks", 1, "memory"), 9.0e9)
    inst = Instance.parse(data)
    for method in ("crunch", "joint", "exact", "greedy", "random", "equal", "brute"):
        with pytest.raises(Infeasible, match="depth 2 needs 9e\\+09 B .* largest device has 8e\\+09"):
            solve(inst, method)


def test_too_few_devices() -> None:
    data = copy.deepcopy(BASE)
    data["blocks"].append({"depth": 3, "flops": 3e11, "memory": 7e8, "update_bytes": 1e4})
    inst = Instance.parse(data)
    with pytest.raises(Infeasible, match="3 blocks but only 2 device slots"):
        crunch(inst)
    data["devices"][0]["capacity"] = 2  # a device that may take two blocks makes it feasible
    inst = Instance.parse(data)
    alloc = crunch(inst)
    check_allocation(inst, alloc)
    assert list(alloc.assignment.values()).count("pi5-1") == 2
    assert alloc.latency == pytest.approx(brute_force(inst).latency)


def test_hall_counts_deep_blocks_not_just_blocks() -> None:
    """Two devices, two blocks, but only one device holds deep blocks: infeasible by memory (Hall)."""
    data = copy.deepcopy(BASE)
    data["blocks"].append({"depth": 3, "flops": 3e11, "memory": 5e9, "update_bytes": 1e4})
    data["blocks"][1]["memory"] = 5e9
    data["devices"].append(
        {"id": "pi4", "flops": 1e10, "memory": 2e9, "gain": 1e-7, "power": 0.1, "bandwidth": 1e6}
    )
    inst = Instance.parse(data)
    with pytest.raises(Infeasible, match="2 blocks at depth >= 2 .* only 1 slots"):
        crunch(inst)


def test_non_prefix_feasible_sets_take_the_exact_matching() -> None:
    """A big update at depth 1 and small ones deeper: a slow-uplink device can only do depths 2..3."""
    data = {
        "devices": [
            {"id": "radio-poor", "flops": 1e11, "memory": 8e9, "gain": 1e-13, "power": 0.1, "bandwidth": 1e6},
            {"id": "radio-good", "flops": 1e10, "memory": 8e9, "gain": 1e-8, "power": 0.2, "bandwidth": 1e6},
            {"id": "slow", "flops": 2e9, "memory": 8e9, "gain": 1e-8, "power": 0.2, "bandwidth": 1e6},
        ],
        "blocks": [
            {"depth": 1, "flops": 1e10, "memory": 1e8, "update_bytes": 2e6},
            {"depth": 2, "flops": 2e10, "memory": 1e8, "update_bytes": 1e3},
            {"depth": 3, "flops": 3e10, "memory": 1e8, "update_bytes": 1e3},
        ],
        "noise": 4e-21,
    }
    inst = Instance.parse(data)
    t = latency_matrix(inst, inst.own_bandwidth())
    alloc = crunch(inst)
    _, prefix = prefix_lengths(t <= alloc.latency)
    assert not prefix  # the case the Hall shortcut alone would get wrong
    assert alloc.latency == pytest.approx(brute_force(inst).latency, rel=1e-12)
    # radio-poor must take a deep block, so depth 1 goes to "slow" (5.8 s) rather than 10 s+ elsewhere
    assert alloc.assignment == {1: "slow", 2: "radio-poor", 3: "radio-good"}
    assert alloc.latency == pytest.approx(t[2, 0])


def test_greedy_puts_the_fastest_device_on_the_deepest_block() -> None:
    alloc = solve(Instance.parse(BASE), "greedy")
    assert alloc.assignment == {2: "orin-1", 1: "pi5-1"}
    assert np.isclose(
        alloc.latency,
        max(1e11 / 2e10, 2e11 / 2e11) + 8 * 3e4 / (1e6 * np.log2(1 + 0.2e-7 / (4e-21 * 1e6))),
        rtol=1e-3,
    )

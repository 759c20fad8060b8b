"""Property-based checks of the allocators against brute force and the exact joint reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_broker.allocation import Infeasible, Instance
from edge_broker.allocation.baselines import equal_split, greedy, random_matching
from edge_broker.allocation.brute import brute_force
from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import check_allocation, min_bandwidth, rate
from edge_broker.allocation.joint import joint, joint_exact

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def instances(
    draw,
    max_n: int = 7,
    max_d: int = 7,
    monotone_updates: bool | None = None,
    max_capacity: int = 1,
    memory_tight: bool = True,
) -> dict:
    """Random instances on a coarse grid of values, so ties (the hard case for bisection) are common."""
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(1 if max_capacity > 1 else d, max_n))
    inc = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0]), min_size=d, max_size=d))
    flops = (1e9 * (1.0 + np.cumsum(inc))).tolist()
    mem_inc = draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=d, max_size=d))
    memory = (1e8 * (1.0 + np.cumsum(mem_inc))).tolist()
    mono = draw(st.booleans()) if monotone_updates is None else monotone_updates
    sizes = draw(st.lists(st.sampled_from([0.0, 1e4, 3e4, 1e5, 3e5]), min_size=d, max_size=d))
    if mono:
        sizes = sorted(sizes)
    blocks = [
        {"depth": j + 1, "flops": flops[j], "memory": memory[j], "update_bytes": sizes[j]} for j in range(d)
    ]
    mem_choices = [memory[0], memory[-1], 1e8 * 20] if memory_tight else [1e8 * 20]
    devices = []
    for k in range(n):
        devices.append(
            {
                "id": f"dev{k}",
                "flops": draw(st.sampled_from([1e9, 2e9, 5e9, 2e10])),
                "memory": draw(st.sampled_from(mem_choices)),
                "gain": draw(st.sampled_from([1e-12, 1e-11, 1e-10, 1e-9])),
                "power": draw(st.sampled_from([0.1, 0.2])),
                "bandwidth": draw(st.sampled_from([1e5, 5e5, 1e6, 2e6])),
                "capacity": draw(st.integers(1, max_capacity)),
            }
        )
    total = draw(st.sampled_from([1e6, 3e6, 1e7]))
    return {"devices": devices, "blocks": blocks, "total_bandwidth": total, "noise": 4e-21}


def _both(reference, solver, inst: Instance):
    """(reference's allocation, solver's), or None when the reference finds ``inst`` infeasible (and
    then the solver must say so too)."""
    try:
        want = reference(inst)
    except Infeasible:
        with pytest.raises(Infeasible):
            solver(inst)
        return None
    return want, solver(inst)


def _crunch_equals_brute_force(inst: Instance) -> None:
    pair = _both(brute_force, crunch, inst)
    if pair is not None:
        want, got = pair
        check_allocation(inst, got)
        assert got.latency == pytest.approx(want.latency, rel=1e-12)


def _joint_feasible_against(reference, inst: Instance):
    """(reference's allocation, joint's), joint's checked to be feasible within the bandwidth budget."""
    pair = _both(reference, joint, inst)
    if pair is not None:
        check_allocation(inst, pair[1], total_bandwidth=inst.total_bandwidth)
    return pair


@settings(max_examples=1500, **SETTINGS)
@given(instances())
def test_crunch_equals_brute_force(data: dict) -> None:
    _crunch_equals_brute_force(Instance.parse(data))


@settings(max_examples=250, **SETTINGS)
@given(instances(max_n=5, max_d=5, max_capacity=3))
def test_crunch_equals_brute_force_with_capacity(data: dict) -> None:
    _crunch_equals_brute_force(Instance.parse(data))


@settings(max_examples=600, **SETTINGS)
@given(instances())
def test_joint_within_one_percent_of_exact_and_feasible(data: dict) -> None:
    inst = Instance.parse(data)
    pair = _joint_feasible_against(joint_exact, inst)
    if pair is None:
        return
    ref, got = pair
    check_allocation(inst, ref, total_bandwidth=inst.total_bandwidth)
    assert got.latency <= ref.latency * 1.01
    # The joint optimum can never be worse than any allocation that also respects the budget.
    assert got.latency <= equal_split(inst).latency * (1 + 1e-9)


@settings(max_examples=60, **SETTINGS)
@given(instances(max_n=5, max_d=5, max_capacity=3))
def test_joint_feasible_with_capacity(data: dict) -> None:
    pair = _joint_feasible_against(equal_split, Instance.parse(data))
    if pair is not None:
        eq, got = pair
        assert got.latency <= eq.latency * (1 + 1e-9)


@settings(max_examples=80, **SETTINGS)
@given(instances(memory_tight=True), st.integers(0, 3))
def test_baselines_are_feasible_and_never_beat_crunch(data: dict, seed: int) -> None:
    inst = Instance.parse(data)
    try:
        best = crunch(inst)
    except Infeasible:
        for solver in (lambda: random_matching(inst, seed), lambda: greedy(inst)):
            with pytest.raises(Infeasible):
                solver()
        return
    for alloc in (random_matching(inst, seed), greedy(inst)):
        check_allocation(inst, alloc)
        assert alloc.latency >= best.latency * (1 - 1e-12)


@settings(max_examples=200, **SETTINGS)
@given(st.floats(1e6, 1e13), st.floats(1e2, 1e8), st.floats(1e-4, 1e3))
def test_min_bandwidth_closed_form_meets_the_budget(a: float, bits: float, budget: float) -> None:
    b = float(min_bandwidth(np.array(a), np.array(bits), np.array(budget)))
    cap = a / math.log(2)  # the rate's supremum
    if bits / budget >= cap:
        assert b == math.inf
        return
    assume(bits / budget < 0.999 * cap)  # right at the supremum the root is ill-conditioned
    assert math.isfinite(b) and b > 0
    assert bits / float(rate(b, a)) == pytest.approx(budget, rel=1e-6)
    assert bits / float(rate(b * 0.999, a)) > budget  # and it is the least such bandwidth


@settings(max_examples=60, **SETTINGS)
@given(instances(max_n=5, max_d=4))
def test_exact_joint_reference_equals_enumeration(data: dict) -> None:
    """The reference itself is checked: bisection + Hungarian equals water-filling every matching."""
    from edge_broker.allocation.brute import brute_force_joint

    pair = _both(brute_force_joint, joint_exact, Instance.parse(data))
    if pair is None:
        return
    want, got = pair
    assert got.latency == pytest.approx(want.latency, rel=1e-6)

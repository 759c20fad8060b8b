"""CRUNCH against an independent solver on instances too big for brute force: a MILP (scipy HiGHS)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from edge_broker.allocation import Infeasible, Instance
from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import check_allocation, latency_matrix


def milp_bottleneck(t: np.ndarray, cap: np.ndarray) -> float | None:
    """min T s.t. each block on one device, capacities, t_kd x_kd <= T; None if infeasible."""
    n, d = t.shape
    finite = np.isfinite(t)
    nx = n * d
    c = np.zeros(nx + 1)
    c[-1] = 1.0
    rows, lo, hi = [], [], []
    for j in range(d):  # every block exactly once
        r = np.zeros(nx + 1)
        r[[k * d + j for k in range(n)]] = 1
        rows.append(r), lo.append(1), hi.append(1)
    for k in range(n):  # capacity
        r = np.zeros(nx + 1)
        r[k * d : (k + 1) * d] = 1
        rows.append(r), lo.append(0), hi.append(cap[k])
    for k in range(n):
        for j in range(d):
            if finite[k, j]:
                r = np.zeros(nx + 1)
                r[k * d + j] = t[k, j]
                r[-1] = -1
                rows.append(r), lo.append(-np.inf), hi.append(0)
    ub = np.append(np.where(finite.ravel(), 1.0, 0.0), np.inf)
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.append(np.ones(nx), 0),
        bounds=Bounds(np.zeros(nx + 1), ub),
    )
    return float(res.fun) if res.status == 0 else None


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(6, 12), st.integers(12, 25), st.integers(0, 2**31 - 1), st.booleans())
def test_crunch_matches_milp_on_medium_instances(d: int, n: int, seed: int, uneven: bool) -> None:
    rng = np.random.default_rng(seed)
    flops = np.cumsum(rng.uniform(1e9, 5e9, d))
    memory = np.cumsum(rng.uniform(1e8, 5e8, d))
    sizes = rng.choice([1e4, 1e5, 1e6], d) if uneven else np.sort(rng.choice([1e4, 1e5, 1e6], d))
    data = {
        "devices": [
            {
                "id": f"k{k}",
                "flops": float(rng.choice([5e8, 1e9, 3e9, 1e10])),
                "memory": float(rng.uniform(memory[0], memory[-1] * 1.2)),
                "gain": float(10 ** rng.uniform(-12, -9)),
                "power": 0.1,
                "bandwidth": float(rng.choice([2e5, 1e6])),
                "capacity": int(rng.integers(1, 3)),
            }
            for k in range(n)
        ],
        "blocks": [
            {"depth": j + 1, "flops": flops[j], "memory": memory[j], "update_bytes": sizes[j]}
            for j in range(d)
        ],
        "noise": 4e-21,
    }
    inst = Instance.parse(data)
    t = latency_matrix(inst, inst.own_bandwidth())
    want = milp_bottleneck(t, inst.arrays()["cap"])
    if want is None:
        with pytest.raises(Infeasible):
            crunch(inst)
        return
    got = crunch(inst)
    check_allocation(inst, got)
    assert got.latency == pytest.approx(want, rel=1e-6)

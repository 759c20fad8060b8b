"""Simple rules the optimisers are compared with: random matching, greedy, equal bandwidth split."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import (
    Allocation,
    Infeasible,
    Instance,
    diagnose_infeasible,
    latency_matrix,
    make_allocation,
)


def _slots(cap: np.ndarray, n_blocks: int) -> np.ndarray:
    """Device index of each slot (a device with capacity c appears min(c, D) times)."""
    return np.repeat(np.arange(len(cap)), np.minimum(cap, n_blocks))


def random_matching(inst: Instance, seed: int = 0, bandwidth: np.ndarray | None = None) -> Allocation:
    """A uniformly random feasible matching (random costs, Hungarian), at the default bandwidths."""
    bw = inst.default_bandwidth() if bandwidth is None else np.asarray(bandwidth, dtype=float)
    t = latency_matrix(inst, bw)
    A = inst.arrays()
    slot_dev = _slots(A["cap"], inst.d)
    rng = np.random.default_rng(seed)
    cost = np.where(np.isfinite(t[slot_dev].T), rng.random((inst.d, len(slot_dev))), np.inf)
    try:
        rows, cols = linear_sum_assignment(cost)
    except ValueError:
        raise diagnose_infeasible(inst, np.isfinite(t), "within its memory") from None
    if len(rows) < inst.d:
        raise diagnose_infeasible(inst, np.isfinite(t), "within its memory")
    match = np.empty(inst.d, dtype=np.int64)
    match[rows] = slot_dev[cols]
    return make_allocation(inst, "random", match, bw, idle_to_zero=bandwidth is None and _shared(inst))


def greedy(inst: Instance, bandwidth: np.ndarray | None = None) -> Allocation:
    """Fastest device (FLOP/s) to the deepest block, then the next; skipping devices that lack memory."""
    bw = inst.default_bandwidth() if bandwidth is None else np.asarray(bandwidth, dtype=float)
    A = inst.arrays()
    order = sorted(range(inst.n), key=lambda k: (-A["f"][k], -A["M"][k]))
    left = A["cap"].copy()
    match = np.empty(inst.d, dtype=np.int64)
    for j in range(inst.d - 1, -1, -1):
        pick = next((k for k in order if left[k] > 0 and A["M"][k] >= A["m"][j]), None)
        if pick is None:
            t = latency_matrix(inst, bw)
            err = diagnose_infeasible(inst, np.isfinite(t), "within its memory")
            raise Infeasible(f"greedy: {err}")
        match[j] = pick
        left[pick] -= 1
    return make_allocation(inst, "greedy", match, bw, idle_to_zero=bandwidth is None and _shared(inst))


def _shared(inst: Instance) -> bool:
    """True when the baselines split ``total_bandwidth`` (some device has no own bandwidth)."""
    return any(d.bandwidth is None for d in inst.devices)


def equal_split(inst: Instance) -> Allocation:
    """Equal share of ``total_bandwidth`` for every busy device, with CRUNCH's optimal matching."""
    bw = np.full(inst.n, inst.equal_share())
    return crunch(inst, bw, method="equal", idle_to_zero=True)

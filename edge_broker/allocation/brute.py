"""Brute force over every block-device assignment at fixed bandwidths: the ground truth for tests."""

from __future__ import annotations

import itertools

import numpy as np

from edge_broker.allocation.instance import (
    Allocation,
    Instance,
    InstanceError,
    diagnose_infeasible,
    latency_matrix,
    make_allocation,
)

MAX_ASSIGNMENTS = 2_000_000


def brute_force(inst: Instance, bandwidth: np.ndarray | None = None) -> Allocation:
    """Optimal matching by enumeration (small instances only; ``N**D`` bounded by ``MAX_ASSIGNMENTS``)."""
    bw = inst.own_bandwidth() if bandwidth is None else np.asarray(bandwidth, dtype=float)
    t = latency_matrix(inst, bw)
    cap = inst.arrays()["cap"]
    n, d = t.shape
    cols = np.arange(d)
    if np.all(cap == 1):
        if n < d:
            raise diagnose_infeasible(inst, np.isfinite(t), "within its memory")
        combos = np.array(list(itertools.permutations(range(n), d)), dtype=np.int64).reshape(-1, d)
    else:
        if n**d > MAX_ASSIGNMENTS:
            raise InstanceError(f"brute force needs {n}**{d} assignments; limit {MAX_ASSIGNMENTS}")
        combos = np.indices((n,) * d, dtype=np.int8).reshape(d, -1).T.astype(np.int64)
        ok = np.ones(len(combos), dtype=bool)
        for k in range(n):
            ok &= (combos == k).sum(axis=1) <= cap[k]
        combos = combos[ok]
    if len(combos) == 0:
        raise diagnose_infeasible(inst, np.isfinite(t), "within its memory")
    lat = t[combos, cols[None, :]].max(axis=1)
    best = int(np.argmin(lat))
    if not np.isfinite(lat[best]):
        raise diagnose_infeasible(inst, np.isfinite(t), "within its memory")
    return make_allocation(inst, "brute", combos[best], bw)


def brute_force_joint(inst: Instance) -> Allocation:
    """Joint optimum by enumeration: every capacity-1 matching, each with its optimal bandwidth split."""
    from edge_broker.allocation.joint import _allocation, _level, _Pairs

    total = inst.require_total_bandwidth()
    if np.any(inst.arrays()["cap"] != 1):
        raise InstanceError("brute-force joint supports capacity 1 only")
    if inst.n < inst.d:
        raise diagnose_infeasible(inst, np.ones((inst.n, inst.d), bool), "")
    fits = inst.arrays()["m"][None, :] <= inst.arrays()["M"][:, None]
    best: tuple[float, np.ndarray] | None = None
    for perm in itertools.permutations(range(inst.n), inst.d):
        match = np.array(perm, dtype=np.int64)
        if not fits[match, np.arange(inst.d)].all():
            continue
        level = _level(_Pairs(inst, match), total)
        if best is None or level < best[0]:
            best = (level, match)
    if best is None:
        raise diagnose_infeasible(inst, fits, "within its memory")
    _, alloc = _allocation(inst, "brute-joint", best[1], total)
    return alloc

"""CRUNCH: the optimal block-device matching at fixed bandwidths (min-max latency).

*Cut*: the optimal round latency is one of the ``t_kd``, so sort the distinct candidate values and
bisect over them. *Recount*: at a threshold ``tau`` each device can train the blocks with
``t_kd <= tau`` (memory already folded into ``t_kd = inf``); with monotone costs that set is a prefix
``1..L_k``. *Check*: a threshold is feasible iff some matching covers every block; for nested prefixes
that is the suffix Hall condition (O(N + D)), otherwise an exact Hopcroft-Karp matching. Bisection
finds the smallest feasible candidate, which is the optimum because feasibility is monotone in
``tau``. Cost: O(N D log(N D)) for the sort, then O(N D) per probe for log2(N D) probes.
"""

from __future__ import annotations

import numpy as np

from edge_broker.allocation.instance import (
    Allocation,
    Instance,
    diagnose_infeasible,
    latency_matrix,
    make_allocation,
)
from edge_broker.allocation.matching import covering_matching, hall_prefix, match_prefix, prefix_lengths


def bottleneck_matching(t: np.ndarray, cap: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Smallest threshold with a covering matching of blocks (columns) to devices (rows) and that matching.

    Returns ``None`` when no matching exists even allowing every finite ``t_kd``.
    """
    n_blocks = t.shape[1]
    if int(np.minimum(cap, n_blocks).sum()) < n_blocks:
        return None
    finite = t[np.isfinite(t)]
    if finite.size == 0:
        return None
    cands = np.unique(finite)  # sorted
    # Every block needs some device, so the answer is at least the largest per-block minimum.
    floor = float(np.max(np.min(t, axis=0)))
    if not np.isfinite(floor):
        return None
    rows_sorted = bool(np.all(t[:, 1:] >= t[:, :-1]))  # prefix structure at every threshold

    def feasible(tau: float) -> bool:
        allowed = t <= tau
        if rows_sorted:
            return hall_prefix(allowed.sum(axis=1), cap, n_blocks)
        return covering_matching(allowed, cap) is not None

    lo = int(np.searchsorted(cands, floor))
    hi = cands.size - 1
    if not feasible(float(cands[hi])):
        return None
    while lo < hi:  # invariant: cands[hi] feasible; everything below cands[lo] infeasible
        mid = (lo + hi) // 2
        if feasible(float(cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[hi])
    allowed = t <= tau
    if rows_sorted:
        lengths, _ = prefix_lengths(allowed)
        match = match_prefix(lengths, cap, n_blocks)
    else:
        match = covering_matching(allowed, cap)
        assert match is not None
    return tau, match


def crunch(
    inst: Instance, bandwidth: np.ndarray | None = None, method: str = "crunch", *, idle_to_zero: bool = False
) -> Allocation:
    """Optimal matching at ``bandwidth`` (default: each device's own ``bandwidth``)."""
    bw = inst.own_bandwidth() if bandwidth is None else np.asarray(bandwidth, dtype=float)
    t = latency_matrix(inst, bw)
    cap = inst.arrays()["cap"]
    found = bottleneck_matching(t, cap)
    if found is None:
        raise diagnose_infeasible(inst, np.isfinite(t), "within its memory")
    _, match = found
    return make_allocation(inst, method, match, bw, idle_to_zero=idle_to_zero)

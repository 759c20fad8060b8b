"""Joint bandwidth-and-block allocation: dual ascent on the bandwidth constraint, and an exact reference.

For a fixed matching the problem ``min T  s.t.  t_k(B_k) <= T,  sum B_k <= B`` has the Lagrangian
``T + sum_k mu_k (t_k(B_k) - T) + lam (sum_k B_k - B)``; its KKT conditions put every busy device on
the same level ``T`` with the least bandwidth reaching it, ``B_k = b_k(T)`` (closed form via Lambert W,
see :func:`~edge_broker.allocation.instance.min_bandwidth`), and the multiplier ``lam`` is raised or
lowered -- equivalently the level moved -- until the constraint is tight: a one-dimensional solve
(``brentq``) of ``sum_k b_k(T) = B``. For a fixed level, the matching that needs the least total
bandwidth is a Hungarian assignment (``linear_sum_assignment``) of the pair costs ``b_kd(T)``.

:func:`joint` starts from CRUNCH's matching at the equal split and alternates the two steps; the
level can only fall (the new matching needs no more bandwidth at the old level). At a fixed point
``W(T) = B`` for the least-bandwidth curve ``W``, which is the optimum when ``W`` is strictly
decreasing there; a final probe at ``(1 - tol) T`` certifies the answer is within ``tol`` of optimal
in every case (and continues from the probe's matching when it is not).

:func:`joint_exact` is the reference: bisection on ``T`` with the Hungarian feasibility test
``W(T) <= B`` (capacity-1 devices).

A device of capacity > 1 needs the largest of its blocks' bandwidths, not their sum; the Hungarian
step prices each extra block as if it needed its own (an upper bound), so for such devices
:func:`joint` is a feasible heuristic, not certified.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, linear_sum_assignment

from edge_broker.allocation.crunch import crunch
from edge_broker.allocation.instance import (
    LN2,
    Allocation,
    Infeasible,
    Instance,
    InstanceError,
    make_allocation,
    min_bandwidth,
    min_bandwidth_matrix,
)

_BIG = 1e300


def _slots(cap: np.ndarray, n_blocks: int) -> np.ndarray:
    return np.repeat(np.arange(len(cap)), np.minimum(cap, n_blocks))


def _hungarian(bmat: np.ndarray, cap: np.ndarray) -> np.ndarray | None:
    """Blocks -> devices minimising the summed bandwidth ``bmat`` (devices x blocks); None if impossible."""
    slot_dev = _slots(cap, bmat.shape[1])
    cost = bmat[slot_dev].T  # blocks x slots
    try:
        rows, cols = linear_sum_assignment(cost)
    except ValueError:  # scipy: "cost matrix is infeasible"
        return None
    if len(rows) < bmat.shape[1] or not np.all(np.isfinite(cost[rows, cols])):
        return None
    match = np.empty(bmat.shape[1], dtype=np.int64)
    match[rows] = slot_dev[cols]
    return match


class _Pairs:
    """The (device, block) pairs of one matching, with the vectors the level solve needs."""

    def __init__(self, inst: Instance, match: np.ndarray):
        A = inst.arrays()
        cols = np.arange(inst.d)
        self.n = inst.n
        self.dev = match
        self.a = A["a"][match]
        self.bits = A["bits"][cols]
        self.compute = A["c"][cols] / A["f"][match]
        # Below this level a pair cannot finish at any bandwidth (rate is capped at a / ln 2).
        floor = self.compute + np.where(self.bits > 0, self.bits * LN2 / self.a, 0.0)
        self.floor = float(floor.max())

    def bandwidths(self, level: float) -> np.ndarray:
        """Per-device bandwidth reaching ``level``: the largest over its blocks (0 for idle devices)."""
        b = min_bandwidth(self.a, self.bits, level - self.compute)
        out = np.zeros(self.n)
        np.maximum.at(out, self.dev, b)
        return out

    def need(self, level: float) -> float:
        return float(self.bandwidths(level).sum())


def _level(pairs: _Pairs, total: float) -> float:
    """Least level whose bandwidths fit in ``total``: the one-dimensional solve of the dual step."""
    lo = pairs.floor
    if pairs.need(lo) <= total:  # compute-bound: only zero-byte blocks sit at the floor
        return lo
    hi = 2.0 * lo
    while pairs.need(hi) > total:
        hi *= 2.0

    # log-space residual: finite and well scaled even where the bandwidth need explodes near the floor
    def resid(level: float) -> float:
        return float(np.log(min(max(pairs.need(level), 1e-300), _BIG)) - np.log(total))

    lo_probe = lo + (hi - lo) * 1e-12
    if resid(lo_probe) <= 0:
        return lo_probe
    level = brentq(resid, lo_probe, hi, xtol=1e-15 * hi, rtol=1e-13)
    for _ in range(60):  # step onto the feasible side of the root
        if pairs.need(level) <= total:
            return level
        level = min(hi, level * (1 + 1e-13) + 1e-300)
    return hi


def _allocation(inst: Instance, method: str, match: np.ndarray, total: float) -> tuple[float, Allocation]:
    pairs = _Pairs(inst, match)
    level = _level(pairs, total)
    bw = pairs.bandwidths(level)
    s = bw.sum()
    if s > total:  # rounding only
        bw *= total / s
    return level, make_allocation(inst, method, match, bw)


def _start(inst: Instance, total: float) -> np.ndarray:
    """CRUNCH's matching at the equal split: feasible whenever any allocation is."""
    eq = crunch(inst, np.full(inst.n, inst.equal_share()), method="joint")
    idx = {d.id: i for i, d in enumerate(inst.devices)}
    return np.array([idx[eq.assignment[b.depth]] for b in inst.blocks], dtype=np.int64)


def joint(inst: Instance, tol: float = 1e-3, max_iter: int = 200) -> Allocation:
    """Bandwidths and blocks together (see module docstring); within ``tol`` of optimal for capacity 1."""
    total = inst.require_total_bandwidth()
    cap = inst.arrays()["cap"]
    match = _start(inst, total)
    level, best = _allocation(inst, "joint", match, total)
    for _ in range(max_iter):
        cand = _hungarian(min_bandwidth_matrix(inst, level), cap)
        if cand is not None and not np.array_equal(cand, match):
            new_level, alloc = _allocation(inst, "joint", cand, total)
            if new_level < level * (1 - 1e-12):
                match, level, best = cand, new_level, alloc
                continue
        # fixed point: certify by probing a slightly lower level
        probe = level * (1 - tol)
        cand = _hungarian(min_bandwidth_matrix(inst, probe), cap)
        if cand is None or _Pairs(inst, cand).need(probe) > total:
            break
        new_level, alloc = _allocation(inst, "joint", cand, total)
        if new_level >= level:
            break
        match, level, best = cand, new_level, alloc
    return best


def joint_exact(inst: Instance, rtol: float = 1e-9) -> Allocation:
    """Reference optimum: bisection on the latency, Hungarian min-bandwidth feasibility (capacity 1)."""
    total = inst.require_total_bandwidth()
    cap = inst.arrays()["cap"]
    if np.any(cap != 1):
        raise InstanceError("the exact joint reference supports capacity 1 only")
    # Bounds: every device holding the whole band (a relaxation) and the equal split (feasible).
    lo = crunch(inst, np.full(inst.n, total)).latency
    hi_alloc = crunch(inst, np.full(inst.n, inst.equal_share()), idle_to_zero=True)
    hi = hi_alloc.latency

    def feasible(level: float) -> np.ndarray | None:
        m = _hungarian(min_bandwidth_matrix(inst, level), cap)
        if m is None or _Pairs(inst, m).need(level) > total * (1 + 1e-12):
            return None
        return m

    best = feasible(hi)
    if best is None:  # the equal split is feasible by construction; guard against rounding
        idx = {d.id: i for i, d in enumerate(inst.devices)}
        best = np.array([idx[hi_alloc.assignment[b.depth]] for b in inst.blocks], dtype=np.int64)
    lo = min(lo, hi)
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        m = feasible(mid)
        if m is None:
            lo = mid
        else:
            hi, best = mid, m
    _, alloc = _allocation(inst, "exact", best, total)
    return alloc


__all__ = ["Infeasible", "joint", "joint_exact"]

"""Depth-aware block allocation (LoLa DEFT): which device trains which block, and with how much uplink.

The model
---------
Devices ``k = 1..N`` have compute ``f_k`` (FLOP/s), memory ``M_k`` (bytes), channel gain ``h_k``,
transmit power ``p_k`` (W) and, optionally, a fixed uplink bandwidth ``B_k`` (Hz) and a capacity
(how many blocks it may take, default 1). Blocks ``d = 1..D`` are ordered by distance from the output
(depth 1 is the block next to the output); block ``d`` has compute cost ``c_d`` (FLOPs of one training
step when ``d`` is the deepest trainable block: backpropagation has to reach it), peak memory ``m_d``
(bytes) and update size ``S_d`` (bytes). ``c_d`` and ``m_d`` are non-decreasing in ``d``; ``S_d`` need
not be (per-block LoRA ranks differ).

Device ``k`` training block ``d`` takes

    t_kd = c_d / f_k + 8 S_d / R_k(B_k),     R_k(B) = B log2(1 + p_k h_k / (N0 B))

(Shannon rate of the uplink; ``N0`` the noise power spectral density, W/Hz). Every block goes to
exactly one device; a device takes at most ``capacity`` blocks (1 by default, so ``N >= D``) and its
latency is the largest ``t_kd`` over its blocks (with monotone costs, that of its deepest block);
``m_d <= M_k`` for each block it takes; ``sum_k B_k <= B``. Objective: minimise the round latency
``max_k t_k``.

Solvers
-------
- :func:`~edge_broker.allocation.crunch.crunch` -- optimal matching at fixed bandwidths:
  bisection over the sorted candidate thresholds ``t_kd`` (cut), each device's feasible depths
  within the threshold (recount) and a covering-matching check; a
  threshold is feasible iff the bipartite graph of pairs within it has a matching covering all
  blocks, decided by the nested-prefix Hall condition when every device's feasible depths form a
  prefix, else by an exact maximum bipartite matching (Hopcroft-Karp, scipy).
- :func:`~edge_broker.allocation.joint.joint` -- bandwidth and blocks together: for a latency level
  each pair's minimal bandwidth is a closed form (Lambert W); a Hungarian assignment
  (``scipy.optimize.linear_sum_assignment``) of those bandwidths picks the matching, and the level
  (equivalently the multiplier of the bandwidth constraint) is updated by a one-dimensional solve
  (``brentq``) until the bandwidth constraint holds with equality. Started from CRUNCH's matching;
  certified within 0.1% of optimal for capacity-1 devices.
- :func:`~edge_broker.allocation.joint.joint_exact` -- reference: bisection on the latency with a
  min-cost assignment of the minimal bandwidths.
- :mod:`~edge_broker.allocation.baselines` -- random, greedy (fastest device to the deepest block)
  and equal bandwidth split (``B / min(N, D)`` to each busy device);
  :mod:`~edge_broker.allocation.brute` -- brute force for small instances.
"""

from edge_broker.allocation.instance import (
    Allocation,
    AllocationError,
    Block,
    Device,
    Infeasible,
    Instance,
    InstanceError,
)

__all__ = [
    "Allocation",
    "AllocationError",
    "Block",
    "Device",
    "Infeasible",
    "Instance",
    "InstanceError",
    "solve",
]


def solve(instance: Instance, method: str, seed: int = 0) -> Allocation:
    """Run the allocator named ``method`` (crunch, joint, exact, greedy, random, equal, brute)."""
    from edge_broker.allocation import baselines, brute, crunch, joint

    methods = {
        "crunch": lambda: crunch.crunch(instance),
        "joint": lambda: joint.joint(instance),
        "exact": lambda: joint.joint_exact(instance),
        "greedy": lambda: baselines.greedy(instance),
        "random": lambda: baselines.random_matching(instance, seed=seed),
        "equal": lambda: baselines.equal_split(instance),
        "brute": lambda: brute.brute_force(instance),
    }
    if method not in methods:
        raise InstanceError(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    return methods[method]()

"""Predict a cost table on another board from one measured table and the two profiles.

A training step is part compute-bound (the GEMMs) and part memory-bound (element-wise ops, layer
norms, optimizer updates). The rule scales each part by the matching figure of the two profiles:

    t' = t * (phi * F / F' + (1 - phi) * W / W')

with ``F`` the sustained FLOP/s of the backend used, ``W`` the memory bandwidth and ``phi`` the compute
fraction (default 0.8, a rule of thumb for transformer blocks at batch x sequence >= 512 tokens).
Peak memory and update size belong to the graph, not the board, so they carry over unchanged;
:func:`deepest_fitting_depth` says which depths the target's memory can hold.
"""

from __future__ import annotations

from typing import Literal

from hardware.cost_table import CostTable, CostTableError
from hardware.profiles import Profile

DEFAULT_COMPUTE_FRACTION = 0.8


def time_factor(
    source: Profile,
    target: Profile,
    *,
    source_backend: Literal["cpu", "gpu"] = "cpu",
    target_backend: Literal["cpu", "gpu", "auto"] = "auto",
    compute_fraction: float = DEFAULT_COMPUTE_FRACTION,
) -> float:
    """Multiplier from a step time on ``source`` to one on ``target``."""
    if not 0.0 <= compute_fraction <= 1.0:
        raise CostTableError(f"compute_fraction must be in [0, 1], got {compute_fraction}")
    compute = source.flops(source_backend) / target.flops(target_backend)
    memory = source.memory_bandwidth / target.memory_bandwidth
    return compute_fraction * compute + (1.0 - compute_fraction) * memory


def scale_cost_table(
    table: CostTable,
    source: Profile,
    target: Profile,
    *,
    target_backend: Literal["cpu", "gpu", "auto"] = "auto",
    compute_fraction: float = DEFAULT_COMPUTE_FRACTION,
) -> CostTable:
    """The table ``table`` (measured on ``source``) predicted for ``target``."""
    if table.profile != source.id:
        raise CostTableError(
            f"cost table was measured on {table.profile!r} but the source profile is {source.id!r}"
        )
    k = time_factor(
        source,
        target,
        source_backend=table.backend,
        target_backend=target_backend,
        compute_fraction=compute_fraction,
    )
    entries = [e.model_copy(update={"step_latency_s": e.step_latency_s * k}) for e in table.entries]
    backend = target.backend() if target_backend == "auto" else target_backend
    return table.model_copy(
        update={
            "profile": target.id,
            "backend": backend,
            "source": "predicted",
            "predicted_from": source.id,
            "entries": entries,
        }
    )


def deepest_fitting_depth(table: CostTable, profile: Profile, reserve_bytes: float = 0.0) -> int:
    """Deepest depth whose peak memory fits in the profile's memory minus ``reserve_bytes`` (0 if none)."""
    budget = profile.memory_bytes - reserve_bytes
    fitting = [e.depth for e in table.monotone().entries if e.peak_memory_bytes <= budget]
    return max(fitting, default=0)

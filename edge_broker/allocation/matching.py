"""Does a matching cover every block? Hall's condition on nested prefixes, else Hopcroft-Karp.

``allowed`` is a boolean devices x blocks matrix (blocks by increasing depth); ``cap`` the number of
blocks each device may take. When every device's allowed blocks are a prefix ``1..L_k`` of the depths,
the blocks' neighbourhoods are nested, so Hall's condition only has to be checked on the suffixes:
for every depth ``j``, the slots of devices with ``L_k >= j`` must number at least ``D - j + 1``.
Otherwise an exact maximum bipartite matching decides (scipy's Hopcroft-Karp).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching


def prefix_lengths(allowed: np.ndarray) -> tuple[np.ndarray, bool]:
    """Number of allowed blocks per device, and whether each device's allowed set is a prefix."""
    lengths = allowed.sum(axis=1)
    prefix = bool(np.array_equal(allowed, np.arange(allowed.shape[1])[None, :] < lengths[:, None]))
    return lengths, prefix


def hall_prefix(lengths: np.ndarray, cap: np.ndarray, n_blocks: int) -> bool:
    """Nested-prefix Hall check in O(N + D): slots reaching depth >= j versus blocks at depth >= j."""
    slots_at = np.bincount(lengths, weights=cap, minlength=n_blocks + 1)  # slots whose prefix has length L
    reach = np.cumsum(slots_at[::-1])[::-1]  # reach[L] = slots with prefix length >= L
    need = n_blocks - np.arange(n_blocks)  # blocks at 0-based index >= j
    return bool(np.all(reach[1 : n_blocks + 1] >= need))


def match_prefix(lengths: np.ndarray, cap: np.ndarray, n_blocks: int) -> np.ndarray:
    """A covering matching for nested prefixes (Hall must hold): deepest block first, tightest device.

    Any device reaching the deepest open block may take it (neighbourhoods are nested, so the rest stay
    Hall-feasible); taking the one with the shortest prefix keeps the strong devices free.
    """
    order = np.argsort(lengths, kind="stable")[::-1]  # longest prefixes first
    out = np.empty(n_blocks, dtype=np.int64)
    stack: list[int] = []
    pos = 0
    for j in range(n_blocks - 1, -1, -1):
        while pos < len(order) and lengths[order[pos]] > j:
            k = int(order[pos])
            stack.extend([k] * int(min(cap[k], n_blocks)))
            pos += 1
        if not stack:
            raise AssertionError("match_prefix called on a Hall-infeasible instance")
        out[j] = stack.pop()  # the most recently added slot has the shortest prefix
    return out


def match_general(allowed: np.ndarray, cap: np.ndarray) -> np.ndarray | None:
    """Maximum bipartite matching (Hopcroft-Karp) of blocks to device slots; ``None`` if it misses a block."""
    n_blocks = allowed.shape[1]
    reps = np.minimum(cap, n_blocks)
    slot_device = np.repeat(np.arange(allowed.shape[0]), reps)
    graph = csr_matrix(allowed.T[:, slot_device].astype(np.int8))  # blocks x slots
    match = maximum_bipartite_matching(graph, perm_type="column")
    if np.any(match < 0):
        return None
    return slot_device[match]


def covering_matching(allowed: np.ndarray, cap: np.ndarray) -> np.ndarray | None:
    """Blocks -> device indices using only ``allowed`` pairs, or ``None`` when none exists."""
    lengths, prefix = prefix_lengths(allowed)
    if prefix:
        n_blocks = allowed.shape[1]
        return match_prefix(lengths, cap, n_blocks) if hall_prefix(lengths, cap, n_blocks) else None
    return match_general(allowed, cap)

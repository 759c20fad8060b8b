"""The shared, pure maths of aggregation (as in Flower's ``strategy/aggregate.py``).

Every function takes and returns plain tensors (``{name: float64 array}``), touches no state and
does no I/O, so each rule is testable alone and the strategies are thin: a strategy is a choice of
:func:`weighted_mean`, :func:`median` or :func:`trimmed_mean`, plus (FedAdam) a server optimiser.
Why deltas: full-tensor and delta updates are treated the same, see :func:`to_deltas`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import trim_mean

from edge_broker.aggregation.types import AggregationError, ClientUpdate

Deltas = list[dict[str, np.ndarray]]


def to_deltas(global_tensors: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Deltas:
    """float64 deltas with the global's names and shapes; raise naming the first inconsistency."""
    if not updates:
        raise AggregationError("no updates to aggregate: wait for at least one accepted update")
    names = set(global_tensors)
    out = []
    for u in updates:
        if set(u.tensors) != names:
            missing, extra = sorted(names - set(u.tensors)), sorted(set(u.tensors) - names)
            raise AggregationError(
                f"update from {u.device} does not match the global tensors (missing {missing[:3]}, unexpected "
                f"{extra[:3]}): validate updates before aggregating"
            )
        d: dict[str, np.ndarray] = {}
        for k, g in global_tensors.items():
            a = np.asarray(u.tensors[k], dtype=np.float64)
            if a.shape != g.shape:
                raise AggregationError(f"update from {u.device}: {k} has shape {a.shape}, the global has {g.shape}")
            d[k] = a if u.is_delta else a - np.asarray(g, dtype=np.float64)
        out.append(d)
    return out


def sample_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """Each update's share of the round's samples (sums to 1); refuses an update with no samples."""
    samples = np.array([u.samples for u in updates], dtype=np.float64)
    if (samples <= 0).any():
        bad = [u.device for u in updates if u.samples <= 0]
        raise AggregationError(f"updates with no samples from {bad}: every update must report samples > 0")
    return samples / samples.sum()


def global_norm(t: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over all tensors of one update, as if they were one vector."""
    return float(np.sqrt(sum(float(np.vdot(a, a)) for a in t.values())))


def clip_deltas(deltas: Deltas, max_norm: float) -> tuple[Deltas, list[int]]:
    """Scale every delta whose L2 norm (over all its tensors) exceeds ``max_norm`` down to it; also
    return the indices of the clipped ones. Why: it bounds what one device can move the global state
    by in a round, whatever rule combines them; a scaled-up update is cut to an honest one's norm."""
    if not max_norm > 0:
        raise AggregationError(f"clip norm must be > 0, got {max_norm}")
    clipped, out = [], []
    for i, d in enumerate(deltas):
        n = global_norm(d)
        if n > max_norm:
            clipped.append(i)
            s = max_norm / n
            d = {k: v * s for k, v in d.items()}
        out.append(d)
    return out, clipped


def weighted_mean(deltas: Deltas, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per tensor, ``sum(w_i * delta_i)`` (FedAvg, McMahan et al. 2017); ``weights`` sum to 1."""
    return {k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}


def median(deltas: Deltas) -> dict[str, np.ndarray]:
    """Coordinate-wise median (Yin et al. 2018), unweighted."""
    return {k: np.median(np.stack([d[k] for d in deltas]), axis=0) for k in deltas[0]}


def trimmed_mean(deltas: Deltas, trim: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``trim`` fraction at EACH end (Yin et al. 2018), unweighted."""
    return {k: np.asarray(trim_mean(np.stack([d[k] for d in deltas]), trim, axis=0)) for k in deltas[0]}


def add_step(global_tensors: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``global + step`` in float64."""
    return {k: np.asarray(g, dtype=np.float64) + step[k] for k, g in global_tensors.items()}

"""Aggregation strategies: the common shape, clipping, and the registry they are chosen from by name.

Every strategy works on *deltas* (update minus the round's global tensors) so full-tensor and delta
updates are treated the same: a full update is turned into its delta first, the strategy combines
the deltas into one step, and the new global state is ``global + step`` (or, for server-side
optimisers such as FedAdam, the optimiser's move along that pseudo-gradient). Maths runs in float64;
results come back in the global tensors' dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

Tensors = dict[str, np.ndarray]


class AggregationError(Exception):
    """Bad strategy name/parameters or inconsistent updates. The CLI prints ``error: <message>``, exit 2."""


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round."""

    device: str
    tensors: Mapping[str, np.ndarray]
    samples: int
    #: True: ``tensors`` are deltas from the round's global state; False: full trained tensors
    is_delta: bool = True


@dataclass
class AggregationReport:
    devices: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    delta_norms: list[float] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)


def to_deltas(global_tensors: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> list[dict[str, np.ndarray]]:
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


def global_norm(t: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.vdot(a, a)) for a in t.values())))


def clip_deltas(deltas: list[dict[str, np.ndarray]], max_norm: float) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Scale every delta whose L2 norm (over all its tensors) exceeds ``max_norm`` down to it."""
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


class Strategy(ABC):
    """Combine deltas into a step. Subclasses implement :meth:`combine`; stateful ones override
    :meth:`apply`, :meth:`state_dict` and :meth:`load_state_dict` (saved by the store between rounds)."""

    name: ClassVar[str]

    def __init__(self, clip_norm: float | None = None) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise AggregationError(f"clip_norm must be > 0 (or None to disable), got {clip_norm}")
        self.clip_norm = clip_norm
        self.report = AggregationReport()

    @abstractmethod
    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        """The aggregated delta (float64). ``weights`` are sample counts normalised to sum 1."""

    def apply(self, global_tensors: Mapping[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(g, dtype=np.float64) + step[k] for k, g in global_tensors.items()}

    def aggregate(self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Tensors:
        """New global tensors from this round's accepted updates."""
        deltas = to_deltas(global_tensors, updates)
        samples = np.array([u.samples for u in updates], dtype=np.float64)
        if (samples <= 0).any():
            bad = [u.device for u in updates if u.samples <= 0]
            raise AggregationError(f"updates with no samples from {bad}: every update must report samples > 0")
        self.report = AggregationReport(devices=[u.device for u in updates], weights=list(samples / samples.sum()),
                                        delta_norms=[global_norm(d) for d in deltas])
        if self.clip_norm is not None:
            deltas, idx = clip_deltas(deltas, self.clip_norm)
            self.report.clipped = [updates[i].device for i in idx]
        new = self.apply(global_tensors, self.combine(deltas, samples / samples.sum()))
        return {k: new[k].astype(np.asarray(global_tensors[k]).dtype, copy=False) for k in global_tensors}

    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise AggregationError(f"strategy {self.name!r} keeps no state but was given {len(state)} tensors")


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy(name: str, **params: Any) -> Strategy:
    """The strategy called ``name`` built with ``params`` (e.g. ``get_strategy("trimmed_mean", trim=0.2)``)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise AggregationError(f"unknown aggregation strategy {name!r}; choose one of: {', '.join(available())}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise AggregationError(f"bad parameters for {name!r}: {exc}") from None

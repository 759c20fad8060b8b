"""The common shape of a strategy, and the registry strategies are chosen from by name.

Every strategy works on *deltas* (update minus the round's global tensors): the shared maths in
:mod:`edge_broker.aggregation.aggregate` turns the updates into deltas, clips them, and a strategy
combines them into one step; the new global state is ``global + step`` (or, for server-side
optimisers such as FedAdam, the optimiser's move along that pseudo-gradient). Maths runs in
float64; results come back in the global tensors' dtype. :meth:`Strategy.aggregate` returns the
tensors and a report of what it did; only a server optimiser keeps state between rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from edge_broker.aggregation.aggregate import add_step, clip_deltas, global_norm, sample_weights, to_deltas
from edge_broker.aggregation.types import AggregationError, AggregationReport, ClientUpdate, Tensors


class Strategy(ABC):
    """Combine deltas into a step. Subclasses implement :meth:`combine`; stateful ones override
    :meth:`apply`, :meth:`state_dict` and :meth:`load_state_dict` (saved by the store between rounds)."""

    name: ClassVar[str]

    def __init__(self, clip_norm: float | None = None) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise AggregationError(f"clip_norm must be > 0 (or None to disable), got {clip_norm}")
        self.clip_norm = clip_norm

    @abstractmethod
    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        """The aggregated delta (float64). ``weights`` are sample counts normalised to sum 1."""

    def apply(self, global_tensors: Mapping[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return add_step(global_tensors, step)

    def aggregate(self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]
                  ) -> tuple[Tensors, AggregationReport]:
        """New global tensors from this round's accepted updates, and what was done to get them."""
        deltas = to_deltas(global_tensors, updates)
        weights = sample_weights(updates)
        report = AggregationReport(devices=[u.device for u in updates], weights=list(weights),
                                   delta_norms=[global_norm(d) for d in deltas])
        if self.clip_norm is not None:
            deltas, idx = clip_deltas(deltas, self.clip_norm)
            report.clipped = [updates[i].device for i in idx]
        new = self.apply(global_tensors, self.combine(deltas, weights))
        return {k: new[k].astype(np.asarray(global_tensors[k]).dtype, copy=False) for k in global_tensors}, report

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
        raise AggregationError(
            f"unknown aggregation strategy {name!r}; choose one of: {', '.join(available())}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise AggregationError(f"bad parameters for {name!r}: {exc}") from None

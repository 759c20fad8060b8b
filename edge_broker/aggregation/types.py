"""What aggregation takes and gives: one device's update in, the new tensors plus a report out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from device_runtime.errors import DeftError

Tensors = dict[str, np.ndarray]


class AggregationError(DeftError):
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
    """What one aggregation did: whose updates, their weights and norms, and whose were clipped."""

    devices: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    delta_norms: list[float] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)

"""Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``trim`` fraction at each end, average the rest.

With 5 devices and ``trim=0.2`` one extreme value per side and coordinate is dropped, so one
scaled or sign-flipped update cannot pull the result. Unweighted, like the median.
"""

from __future__ import annotations

import numpy as np

from edge_broker.aggregation.aggregate import trimmed_mean
from edge_broker.aggregation.base import Strategy, register
from edge_broker.aggregation.types import AggregationError


@register
class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def __init__(self, trim: float = 0.2, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm)
        if not 0.0 <= trim < 0.5:
            raise AggregationError(f"trim must be in [0, 0.5) (fraction cut at EACH end), got {trim}")
        self.trim = trim

    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return trimmed_mean(deltas, self.trim)

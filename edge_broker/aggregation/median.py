"""Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates.

Unweighted on purpose: weighting by the samples a device *claims* would let one liar buy the median.
"""

from __future__ import annotations

import numpy as np

from edge_broker.aggregation.aggregate import median
from edge_broker.aggregation.base import Strategy, register


@register
class Median(Strategy):
    name = "median"

    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return median(deltas)

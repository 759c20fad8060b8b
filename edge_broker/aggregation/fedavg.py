"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the updates."""

from __future__ import annotations

import numpy as np

from edge_broker.aggregation.aggregate import weighted_mean
from edge_broker.aggregation.base import Strategy, register


@register
class FedAvg(Strategy):
    name = "fedavg"

    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return weighted_mean(deltas, weights)

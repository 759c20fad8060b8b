"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server.

The sample-weighted mean delta is the pseudo-gradient's negative; the server keeps Adam moments
across rounds and moves the global state by ``lr * m / (sqrt(v) + tau)``. ``tau`` (not Adam's tiny
eps) controls adaptivity, as in the paper. The moments are saved by the store between rounds
(:meth:`state_dict`) so a restarted coordinator continues the same optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_broker.aggregation.aggregate import weighted_mean
from edge_broker.aggregation.base import Strategy, register
from edge_broker.aggregation.types import AggregationError


@register
class FedAdam(Strategy):
    name = "fedadam"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 clip_norm: float | None = None) -> None:
        super().__init__(clip_norm)
        if not lr > 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or not tau > 0:
            raise AggregationError(
                f"FedAdam needs lr > 0, 0 <= beta1, beta2 < 1, tau > 0 (got {lr}, {beta1}, {beta2}, {tau})")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.step_count = 0

    def combine(self, deltas: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return weighted_mean(deltas, weights)

    def apply(self, global_tensors: Mapping[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.step_count += 1
        out = {}
        for k, g in global_tensors.items():
            m = self.m.get(k, np.zeros_like(step[k]))
            v = self.v.get(k, np.zeros_like(step[k]))
            m = self.beta1 * m + (1 - self.beta1) * step[k]
            v = self.beta2 * v + (1 - self.beta2) * step[k] ** 2
            self.m[k], self.v[k] = m, v
            out[k] = np.asarray(g, dtype=np.float64) + self.lr * m / (np.sqrt(v) + self.tau)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"m/{k}": v for k, v in self.m.items()} | {f"v/{k}": v for k, v in self.v.items()}
        state["step"] = np.array([self.step_count], dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("v/")}
        self.step_count = int(np.asarray(state.get("step", [0]))[0])

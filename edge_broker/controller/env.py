"""The controller's environment (gymnasium): one step is one federated round of a simulated fleet.

Observation (float32, ``7 * N + 4`` for ``N`` devices with 3 layouts; per device then global):

- per device: online (0/1); for each layout whether its measured peak RSS fits the device's memory budget
  (0/1); log10 of its step time on the largest layout (s); its upload time (s, x100); its last round time
  (s / 600); whether it took part last round;
- global: round / rounds, the global accuracy, the last round's gain (x 10), the time used (s / 3600).

Action (``MultiDiscrete([2, V, S] * N)``): per device, take part or not, which emulator layout (index into
the measured layouts, smallest first) and which local-step choice (``fleet.steps``). Reward and
dynamics: :mod:`edge_broker.controller.rounds_model`. Devices go offline and come back as a two-state
Markov chain per device (``stay_online`` / ``come_back``), drawn from the environment's seeded generator
only (so every policy meets the same availability on the same seed).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from edge_broker.controller.curves import LayoutCosts, load_curves
from edge_broker.controller.fleet import FleetProfile
from edge_broker.controller.rounds_model import Choice, DeviceModel, RoundOutcome, device_model, simulate_round

PER_DEVICE_BASE = 5


def observation(devices: list[DeviceModel], layouts: list[LayoutCosts], fleet: FleetProfile, *, online: np.ndarray,
                last_s: np.ndarray, last_took: np.ndarray, round_: int, accuracy: float, last_gain: float,
                time_used: float) -> np.ndarray:
    """The observation vector (see the module doc); the coordinator builds it the same way from a real run."""
    rows = []
    for i, d in enumerate(devices):
        rows += [float(online[i]), *(float(d.fits(v, layouts)) for v in range(len(layouts))),
                 math.log10(d.step_s[-1]), 100.0 * d.upload_s[-1], last_s[i] / 600.0, float(last_took[i])]
    rows += [round_ / fleet.rounds, accuracy, 10.0 * last_gain, time_used / 3600.0]
    return np.asarray(rows, dtype=np.float32)


def decode_action(action: Any, n_devices: int, fleet: FleetProfile) -> list[Choice]:
    """``MultiDiscrete`` action -> one :class:`Choice` per device."""
    a = np.asarray(action, dtype=np.int64).reshape(n_devices, 3)
    return [Choice(bool(t), int(v), fleet.steps[int(s)]) for t, v, s in a]


def encode_choices(choices: list[Choice], fleet: FleetProfile) -> np.ndarray:
    return np.asarray([[int(c.take_part), c.layout, fleet.steps.index(c.steps)] for c in choices],
                      dtype=np.int64).reshape(-1)


class FleetEnv(gym.Env):
    """A fleet's federated tuning, one round per step; ``rounds`` rounds per episode."""

    metadata = {"render_modes": []}

    def __init__(self, fleet: FleetProfile, curves: str | None = None) -> None:
        super().__init__()
        self.fleet = fleet
        self.layouts, self.reference = load_curves(curves) if curves else load_curves()
        self.devices = [device_model(d, self.layouts, self.reference) for d in fleet.devices]
        n, v = len(self.devices), len(self.layouts)
        self.action_space = gym.spaces.MultiDiscrete([2, v, len(fleet.steps)] * n)
        size = n * (PER_DEVICE_BASE + v) + 4
        self.observation_space = gym.spaces.Box(-10.0, 10.0, shape=(size,), dtype=np.float32)
        self.initial_accuracy = float(np.mean([x.initial_accuracy for x in self.layouts]))
        self._reset_state()

    def _reset_state(self) -> None:
        n = len(self.devices)
        self.round = 0
        self.accuracy = self.initial_accuracy
        self.last_gain = 0.0
        self.time_used = 0.0
        self.time_to_target: float | None = None
        self.online = np.ones(n, dtype=bool)
        self.last_s = np.zeros(n)
        self.last_took = np.zeros(n, dtype=bool)

    def _obs(self) -> np.ndarray:
        return observation(self.devices, self.layouts, self.fleet, online=self.online, last_s=self.last_s,
                           last_took=self.last_took, round_=self.round, accuracy=self.accuracy,
                           last_gain=self.last_gain, time_used=self.time_used)

    def _stationary_online(self) -> np.ndarray:
        p = np.array([d.come_back / max(1e-9, d.come_back + 1.0 - d.stay_online) for d in self.devices])
        return self.np_random.random(len(self.devices)) < p

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._reset_state()
        self.online = self._stationary_online()
        return self._obs(), {}

    def step(self, action):
        choices = decode_action(action, len(self.devices), self.fleet)
        out = simulate_round(self.devices, self.layouts, self.fleet, self.accuracy, self.online, choices)
        self._advance(out, choices)
        terminated = self.round >= self.fleet.rounds
        return self._obs(), out.reward, terminated, False, {"outcome": out, "time_to_target": self.time_to_target}

    def _advance(self, out: RoundOutcome, choices: list[Choice]) -> None:
        self.round += 1
        self.last_gain = out.gain
        self.accuracy = out.accuracy
        self.time_used += out.latency_s
        if self.time_to_target is None and self.accuracy >= self.fleet.target_accuracy:
            self.time_to_target = self.time_used
        self.last_s = np.array([out.device_s.get(d.id, 0.0) for d in self.devices])
        self.last_took = np.array([d.id in out.participants for d in self.devices])
        u = self.np_random.random(len(self.devices))
        stay = np.array([d.stay_online for d in self.devices])
        back = np.array([d.come_back for d in self.devices])
        self.online = np.where(self.online, u < stay, u < back)

"""One simulated round of the controller's environment: who trains what, how long it takes, what it gains. Pure.

Per device and emulator layout, a step's time is the layout's measured median step on the reference
machine (``learning_curves.json``) scaled to the device's board by :func:`hardware.scaling.time_factor`
(CPU backend: the device runtime trains with ONNX Runtime on the CPU); the upload is the layout's int8
update (one byte per trainable value) at the board's Shannon uplink rate (the allocator's channel:
:func:`edge_broker.allocation.instance.rate` with its default gain and noise). A device whose layout's
measured peak RSS exceeds its memory budget fails (it contributes nothing and costs the failure penalty).
The round takes as long as its slowest participant plus a fixed overhead.

Accuracy: each participant moves the global accuracy along its layout's fitted curve
(:func:`edge_broker.controller.curves.advance`); FedAvg averages the moves. Averaging ``n`` updates of
``k`` steps is counted as ``k * n**e`` steps of one device (``participation_exponent`` e, default 0.5:
an assumption, not a measurement -- n averaged minibatch gradients reduce the gradient noise like an
n-times larger batch, which is worth between 1x and n x the steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_broker.controller.curves import LayoutCosts, advance
from edge_broker.controller.fleet import FleetDevice, FleetProfile


@dataclass(frozen=True)
class DeviceModel:
    """What the environment knows of one device: its budget, per-layout step time and upload time."""

    id: str
    board: str
    #: the most peak RSS a layout may need on this device (more: the device fails its round)
    memory_budget_mb: float
    #: seconds per local step and per upload, one entry per layout (measured costs scaled to the board)
    step_s: tuple[float, ...]
    upload_s: tuple[float, ...]
    #: per-round probabilities: an online device stays online; an offline one comes back
    stay_online: float
    come_back: float

    def fits(self, layout: int, layouts: list[LayoutCosts]) -> bool:
        return layouts[layout].peak_rss_mb <= self.memory_budget_mb

    def round_time(self, layout: int, steps: int) -> float:
        return steps * self.step_s[layout] + self.upload_s[layout]


def device_model(dev: FleetDevice, layouts: list[LayoutCosts], reference: str) -> DeviceModel:
    """Scale the measured per-layout costs to ``dev``'s board."""
    from edge_broker.allocation.instance import rate
    from edge_broker.allocation.planner import DEFAULT_GAIN, NOISE_W_PER_HZ
    from hardware.profiles import get_profile
    from hardware.scaling import time_factor

    board, ref = get_profile(dev.board), get_profile(reference)
    k = time_factor(ref, board, source_backend="cpu", target_backend="cpu")
    up = board.uplink
    bits_per_s = float(rate(up.bandwidth_hz, up.tx_power_w * DEFAULT_GAIN / NOISE_W_PER_HZ))
    return DeviceModel(id=dev.id, board=board.id, memory_budget_mb=dev.memory_budget_mb,
                       step_s=tuple(x.median_step_s * k for x in layouts),
                       upload_s=tuple(8.0 * x.trainable_values / bits_per_s for x in layouts),
                       stay_online=dev.stay_online, come_back=dev.come_back)


@dataclass(frozen=True)
class Choice:
    take_part: bool
    layout: int
    steps: int


@dataclass(frozen=True)
class RoundOutcome:
    #: the global model's accuracy after the round and what the round added
    accuracy: float
    gain: float
    #: the round's wall time: the slowest participant's compute + upload, plus the round overhead
    latency_s: float
    participants: tuple[str, ...]
    #: participants whose layout did not fit their memory budget
    failed: tuple[str, ...]
    device_s: dict[str, float]
    reward: float


def simulate_round(devices: list[DeviceModel], layouts: list[LayoutCosts], fleet: FleetProfile, accuracy: float,
                   online: np.ndarray, choices: list[Choice]) -> RoundOutcome:
    """The round that ``choices`` make from global ``accuracy`` with the devices ``online`` (bool per device)."""
    took, failed, times = [], [], {}
    for dev, on, ch in zip(devices, online, choices, strict=True):
        if not (ch.take_part and on):
            continue
        if not dev.fits(ch.layout, layouts):
            failed.append(dev.id)
            continue
        took.append((dev, ch))
        times[dev.id] = dev.round_time(ch.layout, ch.steps)
    n = len(took)
    if n:
        boost = n ** fleet.participation_exponent
        new = float(np.mean([advance(layouts[ch.layout].curve, accuracy, ch.steps * boost) for _, ch in took]))
    else:
        new = accuracy
    latency = fleet.round_overhead_s + max(times.values(), default=0.0)
    r = fleet.reward
    reward = r.gain_weight * (new - accuracy) - r.latency_price * latency - r.failure_penalty * len(failed)
    return RoundOutcome(accuracy=new, gain=new - accuracy, latency_s=latency,
                        participants=tuple(d.id for d, _ in took), failed=tuple(failed), device_s=times,
                        reward=float(reward))

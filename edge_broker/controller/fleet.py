"""A fleet profile: the devices the controller plans for and the reward's prices (``--fleet-profile FILE``).

Each device names a board profile (``hardware/boards``, or a ``.toml`` path) and the memory it lends to
training (``memory_budget_mb``: the share of the board left next to its main workload; an emulator whose
measured peak RSS exceeds it fails on that device), and how likely it is to stay online from one round to
the next. The file is JSON; the built-in mixed fleet is :data:`MIXED_FLEET`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_runtime.errors import DeftError, first_error


class FleetError(DeftError, ValueError):
    """A fleet profile is missing or malformed; the message names the file, the field and the fix."""


class FleetDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    board: str = Field(min_length=1, description="built-in profile id or a .toml path")
    memory_budget_mb: float = Field(gt=0, description="memory this device lends to training")
    #: chance an online device is still online next round, and an offline one comes back
    stay_online: float = Field(0.9, ge=0, le=1)
    come_back: float = Field(0.5, ge=0, le=1)


class RewardParams(BaseModel):
    """reward = ``gain_weight`` x accuracy gain - ``latency_price`` x round seconds - ``failure_penalty`` x failures.

    The gain is in accuracy points (0-100), so with the defaults one point of accuracy is worth 200 s of
    round time, and a device that runs out of memory costs as much as 2 points.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gain_weight: float = Field(100.0, gt=0)
    latency_price: float = Field(0.005, ge=0, description="reward per second of round latency")
    failure_penalty: float = Field(2.0, ge=0, description="reward per device that exceeds its memory")


class FleetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[FleetDevice] = Field(min_length=1, max_length=16)
    rounds: int = Field(10, ge=1, le=100, description="rounds per episode")
    steps: list[int] = Field(default_factory=lambda: [25, 50, 100, 200], min_length=1,
                             description="the local-step choices")
    target_accuracy: float = Field(0.78, gt=0, lt=1, description="time-to-target is measured to this accuracy")
    #: averaging n updates of k steps counts as k * n**participation_exponent steps (see env docs)
    participation_exponent: float = Field(0.5, ge=0, le=1)
    #: a round's fixed cost (task, global state, aggregation), seconds
    round_overhead_s: float = Field(5.0, ge=0)
    reward: RewardParams = Field(default_factory=RewardParams)

    @model_validator(mode="after")
    def _check(self) -> FleetProfile:
        from edge_broker.allocation.instance import repeated

        if dup := repeated(d.id for d in self.devices):
            raise ValueError(f"device ids must be unique (repeated: {', '.join(dup)})")
        if any(s <= 0 for s in self.steps) or self.steps != sorted(set(self.steps)):
            raise ValueError("steps must be positive, unique and increasing")
        return self


def _dev(i: str, board: str, mb: float) -> FleetDevice:
    return FleetDevice(id=i, board=board, memory_budget_mb=mb)


#: 8 devices: two each of Raspberry Pi 4 / 5 and Jetson Nano / Orin Nano, with memory budgets around the
#: measured footprints of the emulator layouts (so some devices can only hold the smaller emulators)
MIXED_FLEET = FleetProfile(devices=[
    _dev("pi4-a", "rpi4-4gb", 450), _dev("pi4-b", "rpi4-4gb", 520),
    _dev("pi5-a", "rpi5-8gb", 640), _dev("pi5-b", "rpi5-8gb", 1024),
    _dev("nano-a", "jetson-nano-4gb", 450), _dev("nano-b", "jetson-nano-4gb", 560),
    _dev("orin-a", "jetson-orin-nano-8gb", 1024), _dev("orin-b", "jetson-orin-nano-8gb", 2048),
])


def load_fleet(path: str | Path | None) -> FleetProfile:
    """The fleet in ``path`` (JSON), or the built-in mixed fleet for None / ``mixed``."""
    if path is None or str(path) == "mixed":
        return MIXED_FLEET
    p = Path(path)
    if not p.is_file():
        raise FleetError(f"fleet profile {p} not found; pass a JSON file (see the README) or 'mixed'")
    try:
        fleet = FleetProfile.model_validate(json.loads(p.read_text()))
    except json.JSONDecodeError as exc:
        raise FleetError(f"fleet profile {p} is not valid JSON ({exc.msg}); fix the file") from None
    except ValidationError as exc:
        loc, msg = first_error(exc, "(top level)")
        raise FleetError(f"fleet profile {p}: field '{loc}': {msg}") from None
    from hardware.profiles import ProfileError, get_profile

    for d in fleet.devices:
        try:
            get_profile(d.board)
        except ProfileError as exc:
            raise FleetError(f"fleet profile {p}: device {d.id}: {exc}") from None
    return fleet

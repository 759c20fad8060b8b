"""What a federated run is: broker, bundle, fleet, rounds, deadlines, strategy and hyper-parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_runtime.errors import DeftError
from device_runtime.payload import Encoding
from device_runtime.protocol.topics import DEFAULT_FLEET
from edge_broker.channel.config import ChannelConfig

#: how ``--allocation`` matches devices to blocks (``edge_broker.allocation``)
AllocationMethod = Literal["crunch", "joint", "greedy", "random", "equal"]


class CoordinatorError(DeftError):
    """The run cannot start or go on (no devices, bad config, corrupt state). Printed as ``error: ...``."""


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    broker: str = Field(description="mqtt://host:port or mqtts://...")
    username: str = "edge"
    password: str | None = None
    fleet: str = DEFAULT_FLEET
    bundle: Path
    workdir: Path
    rounds: int = Field(3, ge=1)
    #: the fleet's device ids; an update from anyone else is rejected (None: any device that says hello)
    devices: list[str] | None = None
    #: start the first round once this many devices said hello
    min_devices: int = Field(1, ge=1)
    wait_devices_s: float = Field(300.0, gt=0)
    #: a round closes when every selected device answered, or at the deadline with >= min_updates
    deadline_s: float = Field(600.0, gt=0)
    min_updates: int = Field(1, ge=1)
    #: close the round as soon as this many updates are in, without waiting for stragglers (None: all)
    quorum: int | None = Field(None, ge=1)
    max_deadline_extensions: int = Field(3, ge=0)
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    clip_norm: float | None = Field(None, gt=0)
    hyperparams: dict[str, Any] = Field(default_factory=lambda: {"epochs": 1, "batch_size": 16, "lr": 1e-3})
    encoding: Encoding = "int8"
    delta: bool = True
    max_update_bytes: int = Field(64 * 1024 * 1024, gt=0)
    #: a shared soft prompt (prompt + head tensors) larger than this is refused from the prompt pool
    max_prompt_bytes: int = Field(1024 * 1024, gt=0)
    #: a device silent for this long is marked lost (heartbeats come every few seconds)
    lost_after_s: float = Field(20.0, gt=0)
    #: full-model evaluation after each round (labelled TSV/CSV/JSONL); None: skip
    eval_data: Path | None = None
    #: the full model to plug into (default: the bundle's source model)
    model: str | None = None
    #: also score the bundle itself (the emulator) with ONNX Runtime on eval_data
    eval_bundle: bool = False
    eval_initial: bool = True
    report_dir: Path | None = None
    #: the broker's packet limit when it cannot announce it (MQTT 3.1.1 brokers such as the embedded one)
    max_packet_size: int | None = Field(None, gt=1024)
    #: LoLa DEFT: match devices to blocks each round (crunch or joint); None: every device trains everything
    allocation: AllocationMethod | None = None
    #: per-block costs measured by `deft hw profile` (None: an analytic estimate)
    cost_table: Path | None = None
    #: uplink bandwidth shared by the fleet, Hz (joint allocation splits it)
    total_bandwidth: float = Field(20e6, gt=0)
    #: local steps per round the allocator assumes when the task gives epochs, not steps
    plan_steps: int = Field(100, ge=1)
    #: FedPEAT round controller: a PPO policy directory (`deft edge controller train`) picks each round's
    #: devices, emulator variants and local steps; the variant bundles by layout (the bundle is its own)
    controller: Path | None = None
    controller_variants: dict[str, Path] = Field(default_factory=dict)
    #: the simulated uplink the updates are aggregated through (ideal: none; aircomp: over the air)
    channel: ChannelConfig = Field(default_factory=ChannelConfig)

    @model_validator(mode="after")
    def _check(self) -> CoordinatorConfig:
        if self.devices is not None and self.min_devices > len(self.devices):
            raise ValueError(f"min_devices={self.min_devices} but only {len(self.devices)} devices are listed")
        if self.controller is not None and self.allocation is not None:
            raise ValueError("--controller and --allocation both plan the round; use one of them")
        if self.channel.kind == "aircomp" and (self.strategy in ("median", "trimmed_mean") or self.allocation):
            raise ValueError("over-the-air aggregation hears only the mean of all devices' whole updates: "
                             "use --strategy fedavg or fedadam and no --allocation with --channel aircomp")
        return self

    @property
    def out_dir(self) -> Path:
        return self.report_dir or (self.workdir / "report")

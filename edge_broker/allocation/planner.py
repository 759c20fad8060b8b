"""One round's plan: which device trains which blocks of a bundle, with how much uplink (LoLa DEFT).

The coordinator calls :func:`plan_round` each round. It turns what it knows into the allocator's
:class:`~edge_broker.allocation.instance.Instance` and solves it:

- **devices** from their hello (:class:`DeviceInfo`): a ``profile`` dict names a hardware profile
  (``{"board": "rpi5-8gb"}``, :func:`hardware.profiles.get_profile`) and/or gives figures directly
  (``flops`` FLOP/s, ``memory`` bytes available, ``power`` W, ``bandwidth`` Hz, ``gain``); explicit
  figures win over the board's. Memory of a board is its RAM minus ``memory_reserve_bytes`` (the OS).
  The backend is ``profile["backend"]`` (cpu/gpu/auto) if given, else ``cpu`` for a device whose
  ``capabilities["backend"]`` is ``ort`` (the ONNX Runtime training wheel is CPU-only), else ``auto``
  (the GPU where the board has one).
- **blocks** from the bundle's manifest: every emulator block with trainable tensors, at depth
  ``L - block`` from the output; its update size is the bytes of its tensors
  (:func:`hardware.profiler.block_tensors`: the head goes with the block next to the output, a soft
  prompt with the block next to the input).
- **costs** from a cost table (``deft hw profile``) measured on some profile. For a device with a
  board the table is scaled to that board (:func:`hardware.scaling.scale_cost_table`); the instance
  encodes it exactly by giving the block the source's FLOPs (``latency x F_source x steps``) and the
  device the effective FLOP/s ``F_source / time_factor``, so ``c_d / f_k`` is the scaled latency.
  Without a table, an analytic encoder estimate (:mod:`hardware.transformer_costs`) with dimensions
  read off the manifest stands in, and the plan says so.

With more devices than blocks the surplus devices idle this round (no block, no bandwidth). With
fewer, every device may take up to ``ceil(D / N)`` blocks (the allocator's capacity; its latency is
that of its slowest block). Among allocations with the same round latency, :func:`plan_round` prefers
the one where faster devices hold deeper blocks (it leaves slack on the slow ones): pairwise swaps
that never raise the round latency, for the optimising methods (crunch, joint, exact, brute) only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_runtime.bundle.manifest import Manifest
from device_runtime.errors import first_error
from edge_broker.allocation import solve
from edge_broker.allocation.instance import (
    Allocation,
    AllocationError,
    Device,
    Instance,
    evaluate,
    latency_matrix,
)
from hardware.cost_table import CostTable, CostTableError
from hardware.profiler import block_depth, block_tensors, block_update_bytes
from hardware.profiles import Profile, ProfileError, get_profile

#: thermal noise, -174 dBm/Hz, in W/Hz
NOISE_W_PER_HZ = 10 ** ((-174 - 30) / 10)
#: linear channel gain at 100 m under the 3GPP TR 36.814 macro path loss 128.1 + 37.6 log10(d / km) dB
DEFAULT_GAIN = 10 ** (-(128.1 + 37.6 * math.log10(0.1)) / 10)
#: bytes the OS and other processes keep on a board (not available for training)
DEFAULT_MEMORY_RESERVE = 1.0 * 2**30
#: the methods that optimise; only their answers are tie-broken toward "faster device, deeper block"
OPTIMISING = ("crunch", "joint", "exact", "brute")


class PlanError(AllocationError, ValueError):
    """The round cannot be planned from this input (a device profile, the cost table, the manifest)."""


class DeviceInfo(BaseModel):
    """What the edge knows about a device: its id and the ``profile``/``capabilities`` of its hello."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    profile: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_hello(cls, device_id: str, hello: Any) -> DeviceInfo:
        """From a :class:`device_runtime.protocol.messages.Hello` (or a stored device record)."""
        return cls(id=device_id, profile=dict(hello.profile), capabilities=dict(hello.capabilities))


class DevicePlan(BaseModel):
    """One device's share of the round."""

    model_config = ConfigDict(frozen=True)

    id: str
    board: str | None
    backend: str
    flops: float = Field(description="effective FLOP/s in the instance (c_d / flops = its step time)")
    blocks: list[int] = Field(description="manifest (emulator) block indices it trains; [] = idle")
    depths: list[int] = Field(description="the same blocks as depths from the output")
    layers: list[int] = Field(description="the same blocks as layer indices of the full model")
    bandwidth_hz: float
    predicted_latency_s: float = Field(description="its compute + upload time; 0 when idle")

    @property
    def idle(self) -> bool:
        return not self.blocks


class Plan(BaseModel):
    """The allocator's answer in the coordinator's terms, plus the instance it solved (for the log)."""

    model_config = ConfigDict(frozen=True)

    method: str
    round_latency_s: float
    cost_source: str
    devices: list[DevicePlan]
    idle: list[str] = Field(description="devices without a block this round")
    notes: list[str] = Field(default_factory=list)
    block_tensors: dict[int, list[str]] = Field(description="block -> its trainable tensor names")
    instance: Instance
    allocation: Allocation

    def device(self, device_id: str) -> DevicePlan:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(f"device {device_id!r} is not in this plan")

    def tensor_names_for(self, device_id: str) -> list[str]:
        """Trainable tensor names of the device's blocks (what its bundle trains and it uploads)."""
        return [n for b in self.device(device_id).blocks for n in self.block_tensors[b]]

    @property
    def assignment(self) -> dict[int, str]:
        """Block index -> device id."""
        return {b: d.id for d in self.devices for b in d.blocks}


# ---- devices ----------------------------------------------------------------------------------------
def _device_profile(info: DeviceInfo) -> Profile | None:
    board = info.profile.get("board")
    if board is None:
        return None
    try:
        return get_profile(str(board))
    except ProfileError as exc:
        raise PlanError(f"device {info.id}: profile.board: {exc}") from None


def _backend(info: DeviceInfo, board: Profile | None) -> Literal["cpu", "gpu", "auto"]:
    b = info.profile.get("backend")
    if b is None:
        b = "cpu" if info.capabilities.get("backend") == "ort" else "auto"
    if b not in ("cpu", "gpu", "auto"):
        raise PlanError(f"device {info.id}: profile.backend must be cpu, gpu or auto, got {b!r}")
    if b == "gpu" and board is not None and board.gpu_gflops_fp32 <= 0:
        raise PlanError(f"device {info.id}: profile.backend is gpu but board {board.id} has no usable GPU")
    if board is not None:
        return board.backend() if b == "auto" else b
    return b


def _instance_device(
    info: DeviceInfo,
    table: CostTable,
    source: Profile,
    *,
    capacity: int,
    default_gain: float,
    memory_reserve_bytes: float,
) -> tuple[dict, Profile | None, str]:
    board = _device_profile(info)
    backend = _backend(info, board)
    p = info.profile
    if "flops" in p:
        flops = p["flops"]
    elif board is not None:
        from hardware.scaling import scale_cost_table

        scaled = scale_cost_table(table, source, board, target_backend=backend)
        # c_d / f_k must give the scaled latency: f_k = F_source * t_source / t_scaled (same for every d)
        flops = (
            source.flops(table.backend) * table.entries[0].step_latency_s / scaled.entries[0].step_latency_s
        )
    else:
        raise PlanError(
            f"device {info.id}: its hello profile has neither 'board' (a hardware profile id, see "
            "`deft hw profiles`) nor 'flops' (FLOP/s); the allocator needs one"
        )

    def pick(field: str, from_board: float | None, what: str) -> Any:
        if field in p:
            return p[field]
        if from_board is None:
            raise PlanError(f"device {info.id}: its hello profile has no '{field}' ({what}) and no 'board'")
        return from_board

    data = {
        "id": info.id,
        "flops": flops,
        "memory": pick(
            "memory",
            None if board is None else board.memory_bytes - memory_reserve_bytes,
            "bytes available for training",
        ),
        "gain": p.get("gain", default_gain),
        "power": pick("power", None if board is None else board.uplink.tx_power_w, "transmit power, W"),
        "bandwidth": pick("bandwidth", None if board is None else board.uplink.bandwidth_hz, "uplink Hz"),
        "capacity": capacity,
    }
    try:
        Device.model_validate(data)
    except ValidationError as exc:
        loc, msg = first_error(exc)
        field = {"memory": "memory (after the OS reserve)"}.get(loc, loc)
        raise PlanError(f"device {info.id}: {field}: {msg} (got {data.get(loc)!r})") from None
    return data, board, backend


# ---- costs ------------------------------------------------------------------------------------------
def estimated_cost_table(manifest: Manifest, batch: int = 16, reference: str = "laptop-x86") -> CostTable:
    """Analytic costs for a bundle without a measured table: encoder dimensions read off the manifest.

    The hidden size comes from the LoRA/head tensor shapes, the FFN is taken as 4x hidden and the
    vocabulary from the parameter count; it is an estimate (``source="analytic"``), which
    ``deft hw profile`` replaces with measurements.
    """
    from collections import Counter

    from hardware.transformer_costs import EncoderSpec, analytic_cost_table

    widths = Counter(t.shape[1] for t in manifest.trainable if t.kind == "lora_A" and len(t.shape) == 2)
    widths = widths or Counter(t.shape[-1] for t in manifest.trainable if t.kind in ("head", "prompt"))
    if not widths:
        raise PlanError(
            "cannot estimate costs from this manifest (no LoRA, head or prompt tensor shapes); "
            "pass a measured cost table (deft hw profile BUNDLE)"
        )
    h = widths.most_common(1)[0][0]
    layers = len(manifest.emulator.layer_map)
    spec = EncoderSpec(
        name=manifest.source_model,
        layers=layers,
        hidden=h,
        intermediate=4 * h,
        heads=max(1, h // 64),
        vocab=1,
        batch=batch,
        seq=manifest.max_length,
    )
    vocab = max(1, (manifest.params_total - layers * spec.block_params()) // h)
    spec = spec.model_copy(update={"vocab": int(vocab)})
    table = analytic_cost_table(spec, get_profile(reference), backend="cpu")
    # keep only the bundle's trainable depths
    depths = {block_depth(manifest, b) for b in block_tensors(manifest)}
    return table.model_copy(update={"entries": [e for e in table.entries if e.depth in depths]})


def _blocks(
    manifest: Manifest, table: CostTable, source: Profile, steps: int, bytes_per_value: float
) -> list[dict]:
    try:
        rows = {r["depth"]: r for r in table.to_blocks(source, steps=steps)}
    except CostTableError as exc:
        raise PlanError(f"cost table: {exc}") from None
    update = block_update_bytes(manifest, bytes_per_value)
    out = []
    for b in sorted(update, key=lambda b: block_depth(manifest, b)):
        d = block_depth(manifest, b)
        if d not in rows:
            raise PlanError(
                f"cost table has no entry for depth {d} (block {b}); it covers depths {sorted(rows)}: "
                "profile this bundle (deft hw profile BUNDLE)"
            )
        out.append(
            {"depth": d, "flops": rows[d]["flops"], "memory": rows[d]["memory"], "update_bytes": update[b]}
        )
    return out


# ---- tie-break: faster devices to deeper blocks -------------------------------------------------------
def _prefer_fast_deep(inst: Instance, alloc: Allocation) -> Allocation:
    """Swap blocks between devices while a faster device holds a shallower block than a slower one and
    the swap does not raise the round latency (at the allocation's bandwidths). Terminates: each swap
    removes at least one speed/depth inversion."""
    ids = [d.id for d in inst.devices]
    idx = {k: i for i, k in enumerate(ids)}
    f = inst.arrays()["f"]
    bw = np.array([alloc.bandwidth.get(k, 0.0) for k in ids])
    t = latency_matrix(inst, bw)
    match = np.array([idx[alloc.assignment[b.depth]] for b in inst.blocks], dtype=np.int64)  # by depth
    level = alloc.latency * (1 + 1e-12)

    def dev_latency(k: int, m: np.ndarray) -> float:
        cols = np.flatnonzero(m == k)
        return float(t[k, cols].max()) if cols.size else 0.0

    changed = True
    for _ in range(inst.d * inst.d + 1):
        if not changed:
            break
        changed = False
        for j1 in range(inst.d):
            for j2 in range(j1 + 1, inst.d):
                k1, k2 = match[j1], match[j2]  # k1 holds the shallower block
                if k1 == k2 or f[k1] <= f[k2]:
                    continue
                trial = match.copy()
                trial[j1], trial[j2] = k2, k1
                if max(dev_latency(k1, trial), dev_latency(k2, trial)) <= level:
                    match, changed = trial, True
    assignment = {b.depth: ids[int(k)] for b, k in zip(inst.blocks, match, strict=True)}
    return alloc.model_copy(
        update={"assignment": assignment, "latency": evaluate(inst, assignment, alloc.bandwidth)}
    )


# ---- the plan ---------------------------------------------------------------------------------------
def plan_round(
    devices: Iterable[DeviceInfo],
    manifest: Manifest | str | Path,
    cost_table: CostTable | None,
    total_bandwidth: float | None,
    method: str = "crunch",
    *,
    steps: int = 1,
    bytes_per_value: float = 4.0,
    noise: float = NOISE_W_PER_HZ,
    default_gain: float = DEFAULT_GAIN,
    memory_reserve_bytes: float = DEFAULT_MEMORY_RESERVE,
    capacity: int | None = None,
    seed: int = 0,
) -> Plan:
    """Plan one round (see the module docstring).

    ``steps``: local training steps per round (multiplies compute); ``bytes_per_value``: the update
    encoding (4 fp32, 2 fp16, ~1 int8); ``capacity``: blocks a device may take (default 1, or
    ``ceil(D / N)`` when there are fewer devices than blocks). Raises :class:`PlanError` for bad input
    and :class:`~edge_broker.allocation.instance.Infeasible` when no allocation exists.
    """
    if not isinstance(manifest, Manifest):
        from device_runtime.bundle.verify import read_manifest

        manifest = read_manifest(manifest)
    devs = list(devices)
    if not devs:
        raise PlanError("no devices to plan for; wait for at least one hello")
    if steps < 1:
        raise PlanError(f"steps must be >= 1, got {steps}")
    try:
        groups = block_tensors(manifest)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    n, d = len(devs), len(groups)
    notes: list[str] = []
    if capacity is None:
        capacity = 1 if n >= d else math.ceil(d / n)
        if capacity > 1:
            notes.append(f"{n} devices for {d} blocks: each device may train up to {capacity} blocks")
    if cost_table is None:
        cost_table = estimated_cost_table(manifest)
        cost_source = f"analytic estimate from the manifest on {cost_table.profile} (no measured cost table)"
        notes.append("no measured cost table: costs are an analytic estimate; run `deft hw profile BUNDLE`")
    else:
        cost_source = f"{cost_table.source} on {cost_table.profile}"
        if cost_table.model and cost_table.model != manifest.source_model:
            notes.append(
                f"cost table is for model {cost_table.model!r}, the bundle is {manifest.source_model!r}: "
                "re-profile this bundle if they differ (deft hw profile BUNDLE)"
            )
    try:
        source = get_profile(cost_table.profile)
    except ProfileError as exc:
        raise PlanError(f"cost table profile: {exc}") from None

    rows, boards, backends = [], {}, {}
    for info in devs:
        row, board, backend = _instance_device(
            info,
            cost_table,
            source,
            capacity=capacity,
            default_gain=default_gain,
            memory_reserve_bytes=memory_reserve_bytes,
        )
        rows.append(row)
        boards[info.id], backends[info.id] = board, backend
    inst = Instance.parse(
        {
            "devices": rows,
            "blocks": _blocks(manifest, cost_table, source, steps, bytes_per_value),
            "total_bandwidth": total_bandwidth,
            "noise": noise,
        }
    )
    alloc = solve(inst, method, seed=seed)
    if method in OPTIMISING:
        alloc = _prefer_fast_deep(inst, alloc)

    by_depth = {block_depth(manifest, b): b for b in groups}
    bw = np.array([alloc.bandwidth.get(x.id, 0.0) for x in inst.devices])
    t = latency_matrix(inst, bw)
    col = {blk.depth: j for j, blk in enumerate(inst.blocks)}
    plans, idle = [], []
    for i, dev in enumerate(inst.devices):
        blocks = sorted(by_depth[dp] for dp, k in alloc.assignment.items() if k == dev.id)
        depths = [block_depth(manifest, b) for b in blocks]
        if not blocks:
            idle.append(dev.id)
        plans.append(
            DevicePlan(
                id=dev.id,
                board=boards[dev.id].id if boards[dev.id] else None,
                backend=backends[dev.id],
                flops=dev.flops,
                blocks=blocks,
                depths=depths,
                layers=[manifest.emulator.layer_map[b] for b in blocks],
                bandwidth_hz=alloc.bandwidth.get(dev.id, 0.0) if blocks else 0.0,
                predicted_latency_s=max((float(t[i, col[dp]]) for dp in depths), default=0.0),
            )
        )
    if idle:
        notes.append(
            f"{len(idle)} of {n} devices idle this round (more devices than blocks): {', '.join(idle)}"
        )
    return Plan(
        method=method,
        round_latency_s=alloc.latency,
        cost_source=cost_source,
        devices=plans,
        idle=idle,
        notes=notes,
        block_tensors={b: [x.name for x in ts] for b, ts in groups.items()},
        instance=inst,
        allocation=alloc,
    )

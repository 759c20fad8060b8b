"""The allocation instance (pydantic), the latency and rate functions, and the allocation result.

Units are SI throughout: device ``flops`` is FLOP/s, block ``flops`` is FLOPs of one training step,
``memory`` bytes, ``update_bytes`` bytes (8x gives bits on the air), ``bandwidth`` Hz, ``power`` W,
``gain`` linear, ``noise`` W/Hz. Validation happens here once so every solver can trust its input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_runtime.errors import DeftError, existing_file

LN2 = math.log(2.0)


class AllocationError(DeftError):
    """Base class of the allocator's errors; the CLI prints its message on one line."""


class InstanceError(AllocationError, ValueError):
    """The instance is malformed (bad numbers, non-monotone costs, missing fields)."""


class Infeasible(AllocationError):
    """No allocation satisfies the constraints; the message says which one binds."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Device(_Strict):
    """One device: compute, memory and uplink radio."""

    id: str = Field(min_length=1)
    flops: float = Field(gt=0, allow_inf_nan=False, description="sustained FLOP/s")
    memory: float = Field(gt=0, allow_inf_nan=False, description="bytes available for training")
    gain: float = Field(gt=0, allow_inf_nan=False, description="channel gain h_k (linear)")
    power: float = Field(gt=0, allow_inf_nan=False, description="transmit power p_k, W")
    bandwidth: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="fixed uplink bandwidth, Hz (used by crunch/greedy/random)",
    )
    capacity: int = Field(default=1, ge=1, description="how many blocks the device may take")


class Block(_Strict):
    """One trainable block, ``depth`` counted from the output (1 = next to the output)."""

    depth: int = Field(ge=1)
    flops: float = Field(gt=0, allow_inf_nan=False, description="FLOPs of one step reaching this depth")
    memory: float = Field(gt=0, allow_inf_nan=False, description="peak bytes when this block is trained")
    update_bytes: float = Field(ge=0, allow_inf_nan=False, description="bytes uploaded for this block")



def repeated(ids: Iterable[str]) -> list[str]:
    """The ids that occur more than once, sorted: for one-line "ids must be unique" errors."""
    seen = list(ids)
    return sorted({i for i in seen if seen.count(i) > 1})

class Instance(_Strict):
    """Devices, blocks and the shared uplink."""

    devices: list[Device] = Field(min_length=1)
    blocks: list[Block] = Field(min_length=1)
    total_bandwidth: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Hz")
    noise: float = Field(gt=0, allow_inf_nan=False, description="noise PSD N0, W/Hz")

    @model_validator(mode="after")
    def _consistent(self) -> Instance:
        if dup := repeated(d.id for d in self.devices):
            raise ValueError(f"device ids must be unique; repeated: {', '.join(dup)}")
        depths = [b.depth for b in self.blocks]
        if len(set(depths)) != len(depths):
            raise ValueError("block depths must be unique")
        if depths != sorted(depths):
            raise ValueError("blocks must be listed by increasing depth (1 = next to the output)")
        for field in ("flops", "memory"):
            for prev, cur in pairwise(self.blocks):
                if getattr(cur, field) < getattr(prev, field):
                    raise ValueError(
                        f"blocks[depth={cur.depth}].{field} = {getattr(cur, field):g} is below "
                        f"blocks[depth={prev.depth}].{field} = {getattr(prev, field):g}: "
                        f"block {field} must be non-decreasing in depth "
                        "(a deeper block needs a longer backward pass)"
                    )
        return self

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any) -> Instance:
        """Validate ``data``; raise :class:`InstanceError` with a one-line message naming the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InstanceError(_one_line(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> Instance:
        p = existing_file(path, InstanceError,
                          "instance file {path} not found; pass a JSON file with devices, blocks and noise")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InstanceError(
                f"instance file {p} is not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        return cls.parse(data)

    # ---- arrays the solvers use ---------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.devices)

    @property
    def d(self) -> int:
        return len(self.blocks)

    def arrays(self) -> dict[str, np.ndarray]:
        """Column vectors over devices (f, M, a = p h / N0, cap) and row vectors over blocks (c, m, bits)."""
        return {
            "f": np.array([d.flops for d in self.devices], dtype=float),
            "M": np.array([d.memory for d in self.devices], dtype=float),
            "a": np.array([d.power * d.gain / self.noise for d in self.devices], dtype=float),
            "cap": np.array([d.capacity for d in self.devices], dtype=np.int64),
            "c": np.array([b.flops for b in self.blocks], dtype=float),
            "m": np.array([b.memory for b in self.blocks], dtype=float),
            "bits": np.array([8.0 * b.update_bytes for b in self.blocks], dtype=float),
        }

    def own_bandwidth(self) -> np.ndarray:
        """Each device's fixed ``bandwidth``; an error naming the first device without one."""
        for i, dev in enumerate(self.devices):
            if dev.bandwidth is None:
                raise InstanceError(
                    f"devices[{i}] ({dev.id}) has no 'bandwidth'; fixed-bandwidth methods "
                    "need one per device (or use --method joint/equal with total_bandwidth)"
                )
        return np.array([d.bandwidth for d in self.devices], dtype=float)

    def require_total_bandwidth(self) -> float:
        if self.total_bandwidth is None:
            raise InstanceError("instance has no 'total_bandwidth'; joint and equal-split need it (Hz)")
        return float(self.total_bandwidth)

    def equal_share(self) -> float:
        """Equal split of ``total_bandwidth`` over the devices that can be busy: at most one per block.

        With capacity-1 devices exactly ``min(N, D)`` devices upload, so giving each ``B / min(N, D)``
        (and 0 to the idle ones, see :func:`idle_to_zero`) spends the whole band and never more.
        """
        return self.require_total_bandwidth() / min(self.n, self.d)

    def default_bandwidth(self) -> np.ndarray:
        """Own bandwidths when every device has one, else the equal share of ``total_bandwidth``."""
        if all(d.bandwidth is not None for d in self.devices):
            return self.own_bandwidth()
        return np.full(self.n, self.equal_share())


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid instance: " + "; ".join(parts)


# ---- rates and latencies -----------------------------------------------------------------------
def rate(bandwidth: np.ndarray | float, a: np.ndarray | float) -> np.ndarray:
    """Shannon rate ``B log2(1 + a / B)`` in bit/s, ``a = p h / N0``; 0 at ``B = 0``."""
    b = np.asarray(bandwidth, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = b * np.log1p(a / b) / LN2
    return np.where(b > 0, r, 0.0)


def latency_matrix(inst: Instance, bandwidth: np.ndarray) -> np.ndarray:
    """``t_kd`` for every device (rows) and block (columns); ``inf`` where the block does not fit."""
    A = inst.arrays()
    r = rate(bandwidth, A["a"])[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        upload = np.where(A["bits"][None, :] > 0, A["bits"][None, :] / r, 0.0)
    t = A["c"][None, :] / A["f"][:, None] + upload
    return np.where(A["m"][None, :] <= A["M"][:, None], t, np.inf)


def min_bandwidth(a: np.ndarray, bits: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Least ``B`` with ``bits / R(B) <= budget`` (closed form via Lambert W); ``inf`` if unreachable.

    ``B log2(1 + a/B) = r`` with ``u = a/B`` reads ``ln(1+u)/u = r ln2 / a =: q``; for ``0 < q < 1`` the
    root is ``u = y - 1``, ``y = -W_{-1}(-q e^{-q}) / q``. The rate never exceeds ``a / ln 2``, so a
    budget needing more is unreachable.
    """
    from scipy.special import lambertw

    a, bits, budget = np.broadcast_arrays(
        np.asarray(a, float), np.asarray(bits, float), np.asarray(budget, float)
    )
    out = np.full(a.shape, np.inf)
    zero = (bits <= 0) & (budget >= 0)
    out[zero] = 0.0
    pos = (bits > 0) & (budget > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.where(pos, bits / np.where(pos, budget, 1.0) * LN2 / a, np.inf)
    ok = pos & (q < 1.0)
    if ok.any():
        qq = q[ok]
        w = lambertw(-qq * np.exp(-qq), k=-1).real
        y = -w / qq
        with np.errstate(divide="ignore"):
            out[ok] = np.where(y > 1.0, a[ok] / (y - 1.0), np.inf)
    return out


def min_bandwidth_matrix(inst: Instance, level: float) -> np.ndarray:
    """Bandwidth each (device, block) pair needs to finish within ``level`` seconds; ``inf`` if never."""
    A = inst.arrays()
    compute = A["c"][None, :] / A["f"][:, None]
    b = min_bandwidth(A["a"][:, None], A["bits"][None, :], level - compute)
    return np.where(A["m"][None, :] <= A["M"][:, None], b, np.inf)


# ---- the result --------------------------------------------------------------------------------
class Allocation(BaseModel):
    """Blocks to devices, bandwidth per device, and the round latency it gives."""

    method: str
    assignment: dict[int, str]  # depth -> device id
    bandwidth: dict[str, float]  # device id -> Hz
    latency: float

    def to_json_line(self) -> str:
        """The CLI's last stdout line, in the issue's exact form."""
        return json.dumps(
            {
                "assignment": [{"depth": d, "device": k} for d, k in sorted(self.assignment.items())],
                "bandwidth": self.bandwidth,
                "latency": self.latency,
            }
        )


def make_allocation(
    inst: Instance,
    method: str,
    block_to_device: np.ndarray,
    bandwidth: np.ndarray,
    *,
    idle_to_zero: bool = False,
) -> Allocation:
    """Build an :class:`Allocation` from device indices per block and evaluate its latency.

    ``idle_to_zero``: devices with no block get no bandwidth (shared-band methods).
    """
    ids = [d.id for d in inst.devices]
    if idle_to_zero:
        busy = np.zeros(inst.n, dtype=bool)
        busy[np.asarray(block_to_device, dtype=np.int64)] = True
        bandwidth = np.where(busy, bandwidth, 0.0)
    assignment = {b.depth: ids[int(k)] for b, k in zip(inst.blocks, block_to_device, strict=True)}
    bw = {ids[i]: float(bandwidth[i]) for i in range(inst.n)}
    return Allocation(
        method=method, assignment=assignment, bandwidth=bw, latency=evaluate(inst, assignment, bw)
    )


def evaluate(inst: Instance, assignment: dict[int, str], bandwidth: dict[str, float]) -> float:
    """Round latency of an allocation: the max over assigned (device, block) pairs of ``t_kd``."""
    idx = {d.id: i for i, d in enumerate(inst.devices)}
    bw = np.array([bandwidth.get(d.id, 0.0) for d in inst.devices], dtype=float)
    t = latency_matrix(inst, bw)
    col = {b.depth: j for j, b in enumerate(inst.blocks)}
    return float(max(t[idx[k], col[d]] for d, k in assignment.items()))


def check_allocation(
    inst: Instance, alloc: Allocation, *, total_bandwidth: float | None = None, rtol: float = 1e-9
) -> None:
    """Raise :class:`AllocationError` unless ``alloc`` respects every constraint of the model."""
    depths = sorted(alloc.assignment)
    if depths != [b.depth for b in inst.blocks]:
        raise AllocationError(f"assignment covers depths {depths}, expected every block exactly once")
    by_id = {d.id: d for d in inst.devices}
    load: dict[str, int] = {}
    for depth, dev_id in alloc.assignment.items():
        if dev_id not in by_id:
            raise AllocationError(f"block {depth} assigned to unknown device {dev_id}")
        block = next(b for b in inst.blocks if b.depth == depth)
        if block.memory > by_id[dev_id].memory:
            raise AllocationError(
                f"block {depth} needs {block.memory:g} B but {dev_id} has {by_id[dev_id].memory:g}"
            )
        load[dev_id] = load.get(dev_id, 0) + 1
    for dev_id, count in load.items():
        if count > by_id[dev_id].capacity:
            raise AllocationError(f"{dev_id} takes {count} blocks, capacity {by_id[dev_id].capacity}")
    if any(v < 0 or not math.isfinite(v) for v in alloc.bandwidth.values()):
        raise AllocationError("negative or non-finite bandwidth")
    if total_bandwidth is not None and sum(alloc.bandwidth.values()) > total_bandwidth * (1 + rtol):
        raise AllocationError(f"bandwidth sum {sum(alloc.bandwidth.values()):g} exceeds {total_bandwidth:g}")
    if not math.isfinite(alloc.latency):
        raise AllocationError("latency is not finite")


def diagnose_infeasible(inst: Instance, allowed: np.ndarray, what: str) -> Infeasible:
    """Name the binding constraint when no matching exists in the pairs ``allowed`` (devices x blocks)."""
    A = inst.arrays()
    fits = A["m"][None, :] <= A["M"][:, None]
    slots = int(A["cap"].sum())
    if slots < inst.d:
        return Infeasible(
            f"{inst.d} blocks but only {slots} device slots (sum of capacities); add devices "
            "or raise a device's capacity"
        )
    for j, b in enumerate(inst.blocks):
        if not fits[:, j].any():
            return Infeasible(
                f"block at depth {b.depth} needs {b.memory:g} B of memory but the largest device "
                f"has {A['M'].max():g} B"
            )
        if not allowed[:, j].any():
            return Infeasible(f"no device can train the block at depth {b.depth} {what}")
    for j, b in enumerate(inst.blocks):
        cap = int(A["cap"][allowed[:, j:].any(axis=1)].sum())
        if cap < inst.d - j:
            return Infeasible(
                f"{inst.d - j} blocks at depth >= {b.depth} but the devices able to train them "
                f"{what} have only {cap} slots"
            )
    return Infeasible(f"no matching covers every block {what}")

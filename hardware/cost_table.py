"""A per-depth cost table: what training costs on one profile when block ``d`` is the deepest trainable.

Depth counts from the output (1 = the block next to the head), as in the allocator. The profiler
measures a table on the current machine; :mod:`hardware.scaling` predicts one for another profile;
:func:`CostTable.to_blocks` turns a table into the allocator's blocks.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_runtime.errors import DeftError, first_error
from hardware.profiles import Profile


class CostTableError(DeftError, ValueError):
    """A cost table is malformed or does not match the profile it is used with."""


class CostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(ge=1, description="distance of the deepest trainable block from the output")
    step_latency_s: float = Field(gt=0, description="one training step (forward + backward + optimizer)")
    peak_memory_bytes: float = Field(gt=0)
    update_bytes: float = Field(ge=0, description="bytes this block's trained tensors take on the uplink")


class CostTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    profile: str = Field(min_length=1, description="id of the profile the table was measured on / is for")
    backend: Literal["cpu", "gpu"] = "cpu"
    source: Literal["measured", "predicted", "analytic"] = "measured"
    predicted_from: str | None = Field(
        default=None, description="profile id a predicted table was scaled from"
    )
    model: str | None = None
    batch: int | None = Field(default=None, ge=1)
    seq: int | None = Field(default=None, ge=1)
    entries: list[CostEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> CostTable:
        depths = [e.depth for e in self.entries]
        if depths != sorted(set(depths)):
            raise ValueError("entries must have unique depths in increasing order")
        return self

    # ---- monotonicity ----------------------------------------------------------------------
    def is_monotone(self) -> bool:
        """Latency and peak memory non-decreasing in depth (what the allocator's model assumes)."""
        return all(
            b.step_latency_s >= a.step_latency_s and b.peak_memory_bytes >= a.peak_memory_bytes
            for a, b in pairwise(self.entries)
        )

    def monotone(self) -> CostTable:
        """Running maximum over depth: irons out measurement noise (a deeper block never costs less)."""
        out, lat, mem = [], 0.0, 0.0
        for e in self.entries:
            lat, mem = max(lat, e.step_latency_s), max(mem, e.peak_memory_bytes)
            out.append(e.model_copy(update={"step_latency_s": lat, "peak_memory_bytes": mem}))
        return self.model_copy(update={"entries": out})

    # ---- to the allocator ------------------------------------------------------------------
    def to_blocks(self, profile: Profile, steps: int = 1) -> list[dict]:
        """Allocator blocks: ``flops`` = latency x the profile's FLOP/s (so ``c_d / f_k`` gives it back).

        ``steps`` multiplies compute (a device runs several local steps per round).
        """
        if profile.id != self.profile:
            raise CostTableError(
                f"cost table is for profile {self.profile!r}, not {profile.id!r}; scale it "
                "first (hardware.scaling.scale_cost_table)"
            )
        f = profile.flops(self.backend)
        table = self.monotone()
        return [
            {
                "depth": e.depth,
                "flops": e.step_latency_s * f * steps,
                "memory": e.peak_memory_bytes,
                "update_bytes": e.update_bytes,
            }
            for e in table.entries
        ]

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        p = Path(path)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(p)  # never a half-written table

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        p = Path(path)
        if not p.is_file():
            raise CostTableError(f"cost table {p} not found")
        try:
            return cls.model_validate(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise CostTableError(f"cost table {p} is not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            loc, msg = first_error(exc, "(top level)")
            raise CostTableError(f"cost table {p}: field '{loc}': {msg}") from None

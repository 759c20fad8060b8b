"""Hardware profiles: the figures the allocator needs about a board, each with its source.

Profiles are TOML files (read with the standard library's ``tomllib``) in ``hardware/boards/``;
users can keep their own next to them or anywhere and load them by path. A figure without a source
is refused: the allocator's decisions are only as good as these numbers, so each must be checkable.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_runtime.errors import DeftError, first_error

BUILTIN_DIR = Path(__file__).with_name("boards")

# Every figure that must carry a citation in [sources].
CITED_FIELDS = (
    "cpu_cores",
    "memory_bytes",
    "cpu_gflops_fp32",
    "gpu_gflops_fp32",
    "memory_bandwidth_gbs",
    "uplink.bandwidth_hz",
    "uplink.tx_power_w",
)


class ProfileError(DeftError, ValueError):
    """A profile file is missing, unreadable or incomplete; the message names the file and the field."""


class Uplink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["wifi", "5g", "4g", "ethernet"]
    standard: str = ""
    bandwidth_hz: float = Field(gt=0, description="typical uplink channel bandwidth, Hz")
    tx_power_w: float = Field(gt=0, description="transmit power, W")


class Profile(BaseModel):
    """One board. FLOP/s figures are *sustained* FP32 estimates, not peaks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    name: str
    cpu_cores: int = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    cpu_gflops_fp32: float = Field(gt=0)
    gpu_gflops_fp32: float = Field(ge=0, description="0 when no GPU a training backend can use")
    memory_bandwidth_gbs: float = Field(gt=0)
    uplink: Uplink
    sources: dict[str, str]

    @model_validator(mode="after")
    def _every_figure_cited(self) -> Profile:
        missing = [f for f in CITED_FIELDS if not self.sources.get(f, "").strip()]
        if missing:
            raise ValueError(
                f"sources.{missing[0]}: every figure needs a citation in [sources] "
                f"(missing: {', '.join(missing)})"
            )
        return self

    def flops(self, backend: Literal["cpu", "gpu", "auto"] = "auto") -> float:
        """Sustained FLOP/s of a backend; ``auto`` is the GPU where there is one, else the CPU."""
        if backend == "gpu" or (backend == "auto" and self.gpu_gflops_fp32 > 0):
            if self.gpu_gflops_fp32 <= 0:
                raise ProfileError(f"profile {self.id} has no usable GPU (gpu_gflops_fp32 = 0)")
            return self.gpu_gflops_fp32 * 1e9
        return self.cpu_gflops_fp32 * 1e9

    def backend(self) -> Literal["cpu", "gpu"]:
        """The backend ``flops('auto')`` picks."""
        return "gpu" if self.gpu_gflops_fp32 > 0 else "cpu"

    @property
    def memory_bandwidth(self) -> float:
        """Bytes per second."""
        return self.memory_bandwidth_gbs * 1e9


def load_profile(path: str | Path) -> Profile:
    """Read one profile file; :class:`ProfileError` names the file and the first bad or missing field."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile file {p} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile file {p} is not valid TOML: {exc}") from None
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        loc, msg = first_error(exc, "(top level)")
        if exc.errors()[0]["type"] == "missing":
            raise ProfileError(
                f"profile file {p}: missing field '{loc}'; add it with a citation under [sources]"
            ) from None
        raise ProfileError(f"profile file {p}: field '{loc}': {msg}") from None


def builtin_profiles(directory: str | Path | None = None) -> dict[str, Profile]:
    """All profiles in ``directory`` (default: the built-in ones), by id."""
    d = Path(directory) if directory else BUILTIN_DIR
    out: dict[str, Profile] = {}
    for f in sorted(d.glob("*.toml")):
        prof = load_profile(f)
        if prof.id in out:
            raise ProfileError(f"profile id {prof.id} appears twice in {d}")
        out[prof.id] = prof
    return out


def get_profile(name: str) -> Profile:
    """A built-in profile by id, or a profile file by path."""
    if name.endswith(".toml") or Path(name).is_file():
        return load_profile(name)
    profiles = builtin_profiles()
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(profiles)} (or pass a .toml path)")
    return profiles[name]

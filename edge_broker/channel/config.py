"""Which channel a round's updates go through, and its parameters (one validated model, no defaults elsewhere)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_runtime.errors import DeftError

#: ``ideal``: the edge aggregates the bytes it received (no channel model); ``aircomp``: it hears the
#: devices' simultaneous analog transmission (Zhu, Wang, Huang, IEEE TWC 2020)
ChannelKind = Literal["ideal", "aircomp"]
CHANNEL_KINDS: tuple[str, ...] = ("ideal", "aircomp")


class ChannelError(DeftError):
    """Bad channel parameters. The CLI prints ``error: <message>`` and exits 2."""


class ChannelConfig(BaseModel):
    """The simulated uplink. SNR is the **cell-edge SNR**: the mean receive SNR of a device at the cell edge
    transmitting at its power limit, ``P0 * R**-alpha / sigma**2`` (noise power ``sigma**2 = 1`` per
    sub-channel), so ``P0 = snr * R**alpha``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ChannelKind = "ideal"
    snr_db: float = Field(20.0, ge=-50, le=200)
    #: truncation threshold g_th on the small-scale gain |h|^2: a device is silent on a sub-channel where
    #: |h|^2 < g_th (probability 1 - exp(-g_th)), so its power stays bounded (E1(g_th) finite)
    truncation: float = Field(0.1, gt=0, le=20)
    subchannels: int = Field(1000, ge=1)
    bandwidth_hz: float = Field(1e6, gt=0)
    cell_radius_m: float = Field(100.0, gt=0)
    #: devices are placed uniformly in the annulus between this distance and the cell radius
    min_distance_m: float = Field(10.0, gt=0)
    path_loss_exponent: float = Field(3.0, gt=0, le=8)
    #: bits per update value in the digital baseline (the kit's int8 encoding: 8)
    digital_bits: float = Field(8.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ChannelConfig:
        if self.min_distance_m >= self.cell_radius_m:
            raise ValueError(f"min_distance_m ({self.min_distance_m}) must be below cell_radius_m "
                             f"({self.cell_radius_m})")
        return self

    @property
    def snr(self) -> float:
        """The cell-edge SNR as a ratio."""
        return float(10.0 ** (self.snr_db / 10.0))

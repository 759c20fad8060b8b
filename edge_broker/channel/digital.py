"""Uplink latency of one round: analog over-the-air aggregation vs the digital OFDMA baseline.

Both use the same band: ``bandwidth`` Hz split into ``M`` sub-channels, one complex symbol per
sub-channel per OFDM symbol of duration ``M / bandwidth``.

* **air**: all devices send their ``S = ceil(N/2)`` symbols at once, so the round takes
  ``ceil(S / M)`` OFDM symbols whatever the number of devices K;
* **digital** (the paper's baseline): the band is shared equally by the K devices (OFDMA); device k
  sends its ``N * bits`` payload at its Shannon rate ``(bandwidth / K) * mean_m log2(1 + snr_k |g_m|**2)``
  at full power ``P0`` (mean over its sub-channels' fading draws), with ``snr_k = snr * (R / r_k)**alpha``;
  the round ends when the slowest device is done. Its latency grows about linearly with K, the air's
  does not: that is the paper's "almost linear in K" advantage.
"""

from __future__ import annotations

import numpy as np

from edge_broker.channel.aircomp import to_slots


def air_latency(values: int, subchannels: int, bandwidth: float) -> float:
    """Seconds to send ``values`` real values (two per complex symbol) over the air."""
    return to_slots(-(-values // 2), subchannels) * subchannels / bandwidth


def device_snrs(snr: float, distances: np.ndarray, cell_radius: float, alpha: float) -> np.ndarray:
    """Mean receive SNR of each device at full power (``snr`` is the cell-edge one)."""
    return snr * (cell_radius / distances) ** alpha


def shannon_rates(snrs: np.ndarray, gains: np.ndarray, bandwidth: float) -> np.ndarray:
    """Bits/s of each of the K devices on its 1/K share of the band; ``gains``: ``(K, m)`` draws of ``|g|**2``."""
    k = snrs.shape[0]
    return bandwidth / k * np.log2(1.0 + snrs[:, None] * gains).mean(axis=1)


def digital_latency(values: int, bits: float, rates: np.ndarray) -> float:
    """Seconds until the slowest device has sent its ``values * bits`` payload."""
    return float((values * bits / rates).max())

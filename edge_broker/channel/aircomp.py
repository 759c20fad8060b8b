"""Broadband analog aggregation (BAA), as in Zhu, Wang, Huang, "Broadband Analog Aggregation for Low-Latency
Federated Edge Learning", IEEE Trans. Wireless Commun. 19(1), 2020. Pure numpy/scipy, no I/O.

**The model.** K devices transmit at once on M OFDM sub-channels; each complex symbol carries two real
update values (I and Q), scaled to unit power. Device k at distance r_k sees on sub-channel m, in each
OFDM symbol (time slot), the channel ``h = r_k**(-alpha/2) * g`` with Rayleigh fading ``g ~ CN(0, 1)``
drawn anew per device, sub-channel and slot. **Truncated channel inversion**: the device transmits
``p = sqrt(rho0) * r_k**(alpha/2) / g`` when ``|g|**2 >= g_th`` and stays silent otherwise
(probability ``1 - exp(-g_th)``), so every transmitting device arrives with the same amplitude
``sqrt(rho0)``. Its mean power is ``rho0 * r_k**alpha * E1(g_th)`` (``E1`` = ``scipy.special.exp1``);
the limit ``P0`` binds at the cell edge R: ``rho0 = P0 / (R**alpha * E1(g_th))``. The edge receives
``y = sqrt(rho0) * sum_{k in K_m} x_k + z`` with ``z ~ CN(0, sigma**2)`` and estimates the mean over the
transmitting set ``K_m`` as ``x_hat = y / (sqrt(rho0) * |K_m|)`` (``x_hat = 0`` when nobody got through).

**SNR** is the cell-edge SNR ``snr = P0 * R**-alpha / sigma**2`` (see
:class:`~edge_broker.channel.config.ChannelConfig`), so the receive SNR per transmitting device is
``rho0 / sigma**2 = snr / E1(g_th)``.

**Normalisation** (as the AirComp FL papers do: zero mean, unit variance before the analog stage, the
statistics sent digitally): device k sends ``u_k = K * w_k * delta_k`` (its sample weight ``w_k``
folded in, so the plain mean over devices is FedAvg's weighted mean); each tensor is normalised with the
mean ``mu`` and standard deviation ``s`` of that tensor's values over all devices (two floats per tensor
per device up, two per tensor down: negligible), ``x_k = (u_k - mu) / s``, and the edge de-normalises
``s * x_hat + mu``. The affine map is common to all devices, so it commutes with the mean.

**The closed-form MSE** (per real value, in the normalised domain; ``n = |K_m| ~ Binomial(K, e**-g_th)``):
the noise in ``x_hat`` is ``z / (sqrt(rho0) * n)``, complex variance ``sigma**2 / (rho0 * n**2)``, and a
real value is ``sqrt(2)`` times the I or Q part, so its variance is again ``sigma**2 / (rho0 * n**2)``:

* :func:`noise_mse`: ``E[x_hat - mean_{K_m} x]**2 = (sigma**2 / rho0) * E[1 / n**2 | n >= 1]``, exact
  for any data;
* :func:`aggregation_mse`: the error against the mean over ALL K devices, for values i.i.d. across
  devices with unit variance: ``sum_n P(n) * (sigma**2 / (rho0 n**2) + 1/n - 1/K)`` over ``n >= 1``,
  plus ``P(0) / K`` (nothing received: the value is lost). Real updates are correlated across devices,
  so their truncation error is smaller than this i.i.d. figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import exp1
from scipy.stats import binom

#: receiver noise power per sub-channel (the SNR definition fixes P0 relative to it)
SIGMA2 = 1.0


def truncation_probability(g_th: float) -> float:
    """P(|g|**2 < g_th) for Rayleigh fading (|g|**2 ~ Exp(1))."""
    return float(-np.expm1(-g_th))


def power_limit(snr: float, cell_radius: float, alpha: float, sigma2: float = SIGMA2) -> float:
    """``P0`` such that a cell-edge device at full power arrives with mean SNR ``snr``."""
    return float(snr * sigma2 * cell_radius**alpha)


def power_scaling(p0: float, cell_radius: float, alpha: float, g_th: float) -> float:
    """``rho0``: the largest common receive power per symbol that meets ``rho0 r**alpha E1(g_th) <= P0``
    for every device in the cell (it binds at ``r = R``)."""
    return float(p0 / (cell_radius**alpha * exp1(g_th)))


def receive_snr(snr: float, g_th: float) -> float:
    """``rho0 / sigma**2`` for a cell-edge SNR ``snr`` (R and alpha cancel)."""
    return float(snr / exp1(g_th))


def draw_distances(rng: np.random.Generator, k: int, r_min: float, r_max: float) -> np.ndarray:
    """Distances of ``k`` devices placed uniformly (by area) in the annulus r_min <= r <= r_max."""
    return np.sqrt(rng.uniform(r_min**2, r_max**2, size=k))


def draw_fading(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rayleigh small-scale fading ``g ~ CN(0, 1)`` (complex128)."""
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)


@dataclass(frozen=True)
class Reception:
    """What one analog transmission gave the edge."""

    y: np.ndarray  # (S,) received complex symbols
    active: np.ndarray  # (K, S) bool: device k transmitted symbol s (not truncated)
    tx_power: np.ndarray  # (K,) mean transmit power per symbol slot of each device (<= P0 on average)


def transmit(symbols: np.ndarray, fading: np.ndarray, distances: np.ndarray, *, rho0: float, g_th: float,
             alpha: float, rng: np.random.Generator, sigma2: float = SIGMA2) -> Reception:
    """Every device sends its ``(K, S)`` symbols at once with truncated channel inversion; the edge gets
    the superposition through the channels plus ``CN(0, sigma2)`` noise. ``fading``: ``(K, S)`` small-scale
    gains ``g``, ``distances``: ``(K,)``."""
    active = np.abs(fading) ** 2 >= g_th
    r = distances[:, None]
    h = r ** (-alpha / 2) * fading
    p = np.where(active, np.sqrt(rho0) * r ** (alpha / 2) / np.where(active, fading, 1.0), 0.0)
    noise = np.sqrt(sigma2 / 2) * (rng.standard_normal(symbols.shape[1]) + 1j * rng.standard_normal(symbols.shape[1]))
    y = (h * p * symbols).sum(axis=0) + noise
    return Reception(y=y, active=active, tx_power=(np.abs(p) ** 2).mean(axis=1))


def estimate(y: np.ndarray, active: np.ndarray, rho0: float) -> np.ndarray:
    """``x_hat = y / (sqrt(rho0) |K_m|)``, 0 where no device transmitted."""
    n = active.sum(axis=0)
    return np.where(n > 0, y / (np.sqrt(rho0) * np.maximum(n, 1)), 0.0)


def survivor_mean(symbols: np.ndarray, active: np.ndarray) -> np.ndarray:
    """The noiseless target of :func:`estimate`: the mean over the transmitting devices (0 if none)."""
    n = active.sum(axis=0)
    return np.where(n > 0, (symbols * active).sum(axis=0) / np.maximum(n, 1), 0.0)


def _count_pmf(k: int, g_th: float) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(k + 1)
    return n, binom.pmf(n, k, np.exp(-g_th))


def noise_mse(k: int, rx_snr: float, g_th: float) -> float:
    """Closed form (module docstring): ``E[1/n**2 | n >= 1] / rx_snr`` per real value."""
    n, p = _count_pmf(k, g_th)
    return float((p[1:] / n[1:] ** 2).sum() / p[1:].sum() / rx_snr)


def aggregation_mse(k: int, rx_snr: float, g_th: float) -> float:
    """Closed form (module docstring) against the mean over all ``k`` devices, i.i.d. unit-variance values."""
    n, p = _count_pmf(k, g_th)
    got = p[1:] * (1.0 / (rx_snr * n[1:] ** 2) + 1.0 / n[1:] - 1.0 / k)
    return float(got.sum() + p[0] / k)


def pack(x: np.ndarray) -> np.ndarray:
    """Real ``(K, N)`` values -> ``(K, ceil(N/2))`` unit-power complex symbols (I, Q = consecutive values)."""
    if x.shape[1] % 2:
        x = np.concatenate([x, np.zeros((x.shape[0], 1))], axis=1)
    return (x[:, 0::2] + 1j * x[:, 1::2]) / np.sqrt(2.0)


def unpack(z: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack` for one ``(S,)`` row: the first ``n`` real values."""
    out = np.empty(2 * z.shape[0])
    out[0::2], out[1::2] = z.real, z.imag
    return out[:n] * np.sqrt(2.0)


def normalise(u: np.ndarray, segments: Sequence[slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, mu, s)``: per segment (tensor), values over all devices shifted to mean 0 and scaled to
    standard deviation 1; ``mu`` and ``s`` per value (``(N,)``). A constant segment keeps ``s = 1``."""
    mu = np.empty(u.shape[1])
    s = np.empty(u.shape[1])
    for seg in segments:
        block = u[:, seg]
        mu[seg] = block.mean()
        sd = block.std()
        s[seg] = sd if sd > 0 else 1.0
    return (u - mu) / s, mu, s


def to_slots(symbols: int, subchannels: int) -> int:
    """OFDM symbols (time slots) needed to send ``symbols`` complex values on ``subchannels`` at once."""
    return -(-symbols // subchannels)


@dataclass(frozen=True)
class AirAggregate:
    """One round over the air: the edge's estimate of ``sum_k w_k delta_k`` and what the channel did."""

    estimate: np.ndarray  # (N,) de-normalised
    scale: np.ndarray  # (N,) the normalisation's standard deviation per value
    active: np.ndarray  # (K, S) bool
    tx_power: np.ndarray  # (K,)
    p0: float
    rho0: float


def over_the_air(deltas: np.ndarray, weights: np.ndarray, segments: Sequence[slice], distances: np.ndarray, *,
                 snr: float, g_th: float, cell_radius: float, alpha: float, rng: np.random.Generator
                 ) -> AirAggregate:
    """Weighted mean of the ``(K, N)`` deltas as the edge hears it over the air (module docstring)."""
    k, n = deltas.shape
    x, mu, s = normalise(k * weights[:, None] * deltas, segments)
    symbols = pack(x)
    p0 = power_limit(snr, cell_radius, alpha)
    rho0 = power_scaling(p0, cell_radius, alpha, g_th)
    rec = transmit(symbols, draw_fading(rng, symbols.shape), distances, rho0=rho0, g_th=g_th, alpha=alpha, rng=rng)
    x_hat = unpack(estimate(rec.y, rec.active, rho0), n)
    return AirAggregate(estimate=s * x_hat + mu, scale=s, active=rec.active, tx_power=rec.tx_power, p0=p0, rho0=rho0)

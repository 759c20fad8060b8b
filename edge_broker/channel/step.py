"""The channel as a step of the round: the updates the devices sent in, what the edge hears and a report out.

:func:`edge_broker.coordinator.updates.aggregate_round` calls the coordinator's channel (if any) after
the update transforms, with the round's global tensors and round number: the channel forms each
device's delta, sends the weighted mean of the deltas over the simulated air
(:mod:`~edge_broker.channel.aircomp`) and gives every device's update back as the edge's one
estimate, so the strategy's weighted mean of them IS that estimate (FedAvg: ``global + x_hat``;
FedAdam: its server step along it). The digital protocol still carries the bytes; the channel
decides what the edge "hears". Draws are seeded by ``(seed, round)`` (a re-aggregation after a restart
gives the same tensors); each device's distance by ``(seed, device id)``, fixed for the run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import numpy as np

from edge_broker.aggregation.aggregate import sample_weights, to_deltas, weighted_mean
from edge_broker.aggregation.types import ClientUpdate
from edge_broker.channel.aircomp import (
    aggregation_mse,
    draw_distances,
    draw_fading,
    noise_mse,
    over_the_air,
    receive_snr,
    truncation_probability,
)
from edge_broker.channel.config import ChannelConfig
from edge_broker.channel.digital import air_latency, device_snrs, digital_latency, shannon_rates

#: ``(updates, global tensors, round) -> (what the edge aggregates, a JSON-able report)``
Channel = Callable[[list[ClientUpdate], Mapping[str, np.ndarray], int], tuple[list[ClientUpdate], dict]]


def device_distance(cfg: ChannelConfig, device: str) -> float:
    """Where a device sits in the cell: drawn once per (seed, device id), the same in every round."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(device.encode())])
    return float(draw_distances(rng, 1, cfg.min_distance_m, cfg.cell_radius_m)[0])


def _db(x: float) -> float:
    return round(10.0 * float(np.log10(x)), 3)


class AirCompChannel:
    """Over-the-air aggregation of a round's deltas (a :data:`Channel`)."""

    def __init__(self, cfg: ChannelConfig) -> None:
        self.cfg = cfg

    def __call__(self, ups: list[ClientUpdate], global_tensors: Mapping[str, np.ndarray], round_: int
                 ) -> tuple[list[ClientUpdate], dict]:
        cfg = self.cfg
        names = list(global_tensors)
        deltas = to_deltas(global_tensors, ups)
        weights = sample_weights(ups)
        ideal = weighted_mean(deltas, weights)
        flat = np.stack([np.concatenate([d[k].ravel() for k in names]) for d in deltas])
        sizes = [int(np.asarray(global_tensors[k]).size) for k in names]
        bounds = np.cumsum([0, *sizes])
        segments = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        distances = np.array([device_distance(cfg, u.device) for u in ups])
        rng = np.random.default_rng([cfg.seed, round_])
        air = over_the_air(flat, weights, segments, distances, snr=cfg.snr, g_th=cfg.truncation,
                           cell_radius=cfg.cell_radius_m, alpha=cfg.path_loss_exponent, rng=rng)
        est = {k: air.estimate[seg].reshape(np.shape(global_tensors[k])) for k, seg in zip(names, segments,
                                                                                          strict=True)}
        report = self._report(ups, flat.shape[1], np.concatenate([ideal[k].ravel() for k in names]), air,
                              distances, rng)
        return [ClientUpdate(u.device, est, u.samples, is_delta=True) for u in ups], report

    def _report(self, ups: list[ClientUpdate], n: int, ideal: np.ndarray, air, distances: np.ndarray,
                rng: np.random.Generator) -> dict:
        cfg, k = self.cfg, len(ups)
        err = air.estimate - ideal
        rx = receive_snr(cfg.snr, cfg.truncation)
        gains = np.abs(draw_fading(rng, (k, cfg.subchannels))) ** 2
        rates = shannon_rates(device_snrs(cfg.snr, distances, cfg.cell_radius_m, cfg.path_loss_exponent), gains,
                              cfg.bandwidth_hz)
        t_air = air_latency(n, cfg.subchannels, cfg.bandwidth_hz)
        t_dig = digital_latency(n, cfg.digital_bits, rates)
        return {
            "kind": "aircomp", "snr_db": cfg.snr_db, "receive_snr_db": _db(rx), "truncation": cfg.truncation,
            "subchannels": cfg.subchannels, "values": n,
            # the estimate against the ideal (sample-weighted) mean of the deltas
            "mse": float(np.mean(err**2)),
            "nmse": float(np.sum(err**2) / max(float(np.sum(ideal**2)), 1e-300)),
            "mse_normalised": float(np.mean((err / air.scale) ** 2)),
            "closed_form_mse_iid": aggregation_mse(k, rx, cfg.truncation),
            "closed_form_noise_mse": noise_mse(k, rx, cfg.truncation),
            "truncation_rate": float(1.0 - air.active.mean()),
            "expected_truncation_rate": truncation_probability(cfg.truncation),
            "truncated": {u.device: round(float(1.0 - a.mean()), 4) for u, a in zip(ups, air.active, strict=True)},
            "lost_values_rate": float((air.active.sum(axis=0) == 0).mean()),
            "distances_m": {u.device: round(float(r), 2) for u, r in zip(ups, distances, strict=True)},
            "max_power_ratio": round(float(air.tx_power.max() / air.p0), 4),
            "air_latency_s": t_air, "digital_latency_s": t_dig, "air_speedup": round(t_dig / t_air, 2),
        }


def make_channel(cfg: ChannelConfig) -> Channel | None:
    """The channel ``cfg`` describes; ``None`` for the ideal one (the edge aggregates what it received)."""
    return AirCompChannel(cfg) if cfg.kind == "aircomp" else None

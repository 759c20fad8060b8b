"""The channel's command-line options, shared by ``deft edge serve`` and ``deft demo`` (one definition)."""

from __future__ import annotations

import typer

from device_runtime.choices import choices
from edge_broker.channel.config import CHANNEL_KINDS, ChannelConfig, ChannelError

ChannelChoice = choices("ChannelChoice", CHANNEL_KINDS)

CHANNEL = typer.Option("ideal", help="ideal: aggregate the received bytes; aircomp: the edge hears the devices' "
                       "simultaneous analog transmission (broadband analog aggregation, simulated).")
SNR_DB = typer.Option(20.0, help="aircomp: cell-edge SNR in dB (a cell-edge device at full power).")
TRUNCATION = typer.Option(0.1, help="aircomp: truncation threshold g_th on |h|^2 (a device is silent on a "
                          "sub-channel with probability 1 - exp(-g_th)).")
SUBCHANNELS = typer.Option(1000, help="aircomp: OFDM sub-channels M.")
CELL_RADIUS = typer.Option(100.0, help="aircomp: cell radius in metres (devices placed uniformly in it).")
PATH_LOSS = typer.Option(3.0, help="aircomp: path-loss exponent alpha.")
CHANNEL_SEED = typer.Option(0, help="aircomp: seed of the channel draws (per round and device).")


def channel_config(channel, snr_db: float, truncation: float, subchannels: int, cell_radius: float,
                   path_loss_exponent: float, seed: int) -> ChannelConfig:
    """The validated config; a bad value raises a one-line :class:`ChannelError` naming the option."""
    from pydantic import ValidationError

    from device_runtime.errors import first_error

    flags = {"snr_db": "--snr-db", "truncation": "--truncation", "subchannels": "--subchannels",
             "cell_radius_m": "--cell-radius", "path_loss_exponent": "--path-loss-exponent"}
    try:
        return ChannelConfig(kind=getattr(channel, "value", channel), snr_db=snr_db, truncation=truncation,
                             subchannels=subchannels, cell_radius_m=cell_radius,
                             path_loss_exponent=path_loss_exponent, seed=seed)
    except ValidationError as exc:
        where, what = first_error(exc, "channel")
        raise ChannelError(f"{flags.get(where, where)}: {what}") from None


def describe_round(rep: dict) -> str:
    """One line for a round's channel report (the demo prints it after the round's accuracy)."""
    return (f"over the air at {rep['snr_db']:g} dB: NMSE {rep['nmse']:.3g} (MSE {rep['mse']:.3g}), "
            f"{100 * rep['truncation_rate']:.1f}% of device-slots truncated, "
            f"air {1e3 * rep['air_latency_s']:.1f} ms vs digital {1e3 * rep['digital_latency_s']:.0f} ms "
            f"({rep['air_speedup']:g}x)")

"""Brokers for the fleet: Mosquitto (production), embedded amqtt (zero-install fallback), external (URL).

``start_broker`` picks one; every choice offers the :class:`Broker` interface (url, stop, restart,
client_options) so the coordinator and tests do not care which runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from device_runtime.protocol.topics import DEFAULT_FLEET
from edge_broker.broker.base import (
    Account,
    Broker,
    BrokerError,
    free_port,
    load_accounts,
    make_accounts,
    save_accounts,
)

Kind = Literal["auto", "mosquitto", "embedded"]


def start_broker(
    workdir: str | Path,
    accounts: list[Account],
    *,
    kind: Kind = "auto",
    host: str = "127.0.0.1",
    port: int = 1883,
    fleets: list[str] | None = None,
    max_packet_size: int | None = None,
    tls: object | None = None,
    websockets: object | None = None,
    timeout: float = 20.0,
) -> Broker:
    """Write the config and start a broker; ``auto`` is Mosquitto if installed, else embedded (with a warning)."""
    from edge_broker.broker.embedded import EmbeddedBroker
    from edge_broker.broker.mosquitto import (
        DEFAULT_MAX_PACKET_SIZE,
        MosquittoBroker,
        MosquittoConfig,
        find_mosquitto,
    )

    if kind not in get_args(Kind):
        raise BrokerError(f"unknown broker kind {kind!r}: use {', '.join(get_args(Kind))}")
    fleets = fleets or [DEFAULT_FLEET]
    if port == 0:
        port = free_port(host)  # 0: any free port (Mosquitto would read "listener 0" as a unix socket)
    if not 0 < port < 65536:
        raise BrokerError(f"port {port} is out of range: use 1-65535, or 0 for any free port")
    if kind == "mosquitto" or (kind == "auto" and find_mosquitto()):
        cfg = MosquittoConfig(host=host, port=port, fleets=fleets,
                              max_packet_size=max_packet_size or DEFAULT_MAX_PACKET_SIZE, tls=tls,  # type: ignore[arg-type]
                              websockets=websockets)  # type: ignore[arg-type]
        b = MosquittoBroker(workdir, accounts, cfg)
        b.write_files()
        return b.start(timeout)
    if websockets is not None:
        raise BrokerError("the embedded broker has no WebSocket listener in the kit: install mosquitto for browser "
                          "devices")
    if tls is not None:
        raise BrokerError("the embedded broker has no TLS support in the kit: install mosquitto for mqtts://")
    e = EmbeddedBroker(workdir, accounts, host=host, port=port, fleets=fleets)
    e.write_files()
    return e.start(timeout)


__all__ = [
    "Account", "Broker", "BrokerError", "free_port", "load_accounts", "make_accounts", "save_accounts", "start_broker",
]

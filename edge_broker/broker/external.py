"""A broker the kit does not run: given by URL (mqtt:// or mqtts://); the kit only connects to it.

Its ACL and accounts are the operator's business; ``acl_patterns`` in the protocol module gives the
filters to configure so devices are confined the same way as on a kit-run Mosquitto.
"""

from __future__ import annotations

from device_runtime.protocol.errors import ConnectError
from device_runtime.protocol.url import BrokerURL, parse_broker_url
from edge_broker.broker.base import Broker, BrokerError, port_open


class ExternalBroker(Broker):
    kind = "external"

    def __init__(self, url: str, *, max_packet_size: int | None = None, check: bool = True) -> None:
        try:
            self.parsed: BrokerURL = parse_broker_url(url)
        except ConnectError as exc:
            raise BrokerError(str(exc)) from None
        self.host, self.port, self.tls = self.parsed.host, self.parsed.port, self.parsed.tls
        self.max_packet_size = max_packet_size
        if check and not port_open(self.host, self.port, timeout=3.0):
            raise BrokerError(f"nothing accepts connections at {self.parsed}: is the external broker running?")

    @property
    def username(self) -> str | None:
        return self.parsed.username

    @property
    def password(self) -> str | None:
        return self.parsed.password

    def stop(self) -> None:
        """Nothing to stop: the kit does not own this broker."""

    def restart(self) -> None:
        raise BrokerError(f"cannot restart the external broker at {self.parsed}: the kit only connects to it")

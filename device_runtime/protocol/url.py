"""Broker URLs: ``mqtt://[user[:password]@]host[:port]`` and ``mqtts://...`` (TLS).

Both the device (``deft device run --broker URL``) and the edge (external brokers) parse them here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from device_runtime.protocol.errors import ConnectError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # nor in a repr (logs, tracebacks)

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def url(self, with_credentials: bool = False) -> str:
        cred = ""
        if with_credentials and self.username:
            cred = self.username + (f":{self.password}" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{cred}{host}:{self.port}"

    def __str__(self) -> str:  # never print a password by accident
        return self.url(with_credentials=False)


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``url``; raise :class:`ConnectError` with the expected form for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConnectError(f"invalid broker URL {url!r} ({exc}): expected mqtt://host:port or "
                           "mqtts://host:port") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ConnectError(
            f"invalid broker URL {url!r}: scheme must be mqtt:// or mqtts:// (TLS), not {parts.scheme or 'missing'!r}"
        )
    if not parts.hostname:
        raise ConnectError(f"invalid broker URL {url!r}: no host (expected {parts.scheme}://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConnectError(f"invalid broker URL {url!r}: a broker URL has no path or query")
    return BrokerURL(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )

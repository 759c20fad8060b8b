"""Protocol errors: one exception family, each message names the problem and the fix.

The device and the edge both catch :class:`ProtocolError`; a CLI prints ``error: <message>`` and exits 2.
"""

from __future__ import annotations

from device_runtime.errors import DeftError


class ProtocolError(DeftError):
    """Base of every error the wire protocol raises."""


class TopicError(ProtocolError, ValueError):
    """A topic (or a fleet / device id going into one) is not part of the deft topic tree."""


class EnvelopeError(ProtocolError):
    """A message could not be decoded into an envelope."""


class TruncatedEnvelope(EnvelopeError):
    """Fewer bytes arrived than the header announced (cut in transit or by a size limit)."""


class HashMismatch(EnvelopeError):
    """The body (or a reassembled transfer) does not match the sha256 its header carries."""


class UnsupportedVersion(EnvelopeError):
    """The peer speaks a protocol version this kit does not."""


class PayloadTooLarge(ProtocolError):
    """A message does not fit the broker's maximum packet size and may not be chunked."""


class ConnectError(ProtocolError):
    """The broker could not be reached or refused the connection."""


class AuthRefused(ConnectError):
    """The broker refused the username / password (or certificate)."""


class PublishTimeout(ProtocolError):
    """The broker did not acknowledge a QoS 1 publish in time."""


class PublishRefused(ProtocolError):
    """The broker refused a publish (MQTT 5 PUBACK reason code), e.g. denied by the ACL."""


class SubscribeRefused(ProtocolError):
    """The broker refused a subscription, e.g. denied by the ACL."""

"""The deft wire protocol, shared by device and edge: topics, envelopes, chunking and the MQTT client.

Light on purpose (stdlib, pydantic, paho-mqtt): a Raspberry Pi imports it without torch or numpy.
``DeftClient`` is imported lazily so topic/envelope helpers work without paho installed.
"""

from device_runtime.protocol.chunking import Reassembler, payload_budget, split
from device_runtime.protocol.envelope import ChunkInfo, Envelope, Header, make_ack, new_key, sha256_hex
from device_runtime.protocol.errors import (
    AuthRefused,
    ConnectError,
    EnvelopeError,
    HashMismatch,
    PayloadTooLarge,
    ProtocolError,
    PublishRefused,
    PublishTimeout,
    SubscribeRefused,
    TopicError,
    TruncatedEnvelope,
    UnsupportedVersion,
)
from device_runtime.protocol.messages import (
    Ack,
    BundleRequest,
    Heartbeat,
    Hello,
    PromptInfo,
    Status,
    Task,
    parse_body,
    to_envelope,
)
from device_runtime.protocol.topics import (
    DEFAULT_FLEET,
    PROTOCOL_VERSION,
    TopicInfo,
    Topics,
    acl_patterns,
    check_id,
    parse_topic,
)
from device_runtime.protocol.url import BrokerURL, parse_broker_url

__all__ = [
    "DEFAULT_FLEET",
    "PROTOCOL_VERSION",
    "Ack",
    "AuthRefused",
    "BrokerURL",
    "BundleRequest",
    "ChunkInfo",
    "ConnectError",
    "Envelope",
    "EnvelopeError",
    "HashMismatch",
    "Header",
    "Heartbeat",
    "Hello",
    "PayloadTooLarge",
    "PromptInfo",
    "ProtocolError",
    "PublishRefused",
    "PublishTimeout",
    "Reassembler",
    "Status",
    "SubscribeRefused",
    "Task",
    "TopicError",
    "TopicInfo",
    "Topics",
    "TruncatedEnvelope",
    "UnsupportedVersion",
    "acl_patterns",
    "check_id",
    "make_ack",
    "new_key",
    "parse_body",
    "parse_broker_url",
    "parse_topic",
    "payload_budget",
    "sha256_hex",
    "split",
    "to_envelope",
]


def __getattr__(name: str):  # lazy: paho only when the client is used
    if name in ("DeftClient", "TLSOptions", "Received", "BadMessage"):
        from device_runtime.protocol import client

        return getattr(client, name)
    raise AttributeError(name)

"""The envelope every deft message travels in: a small JSON header and a raw body.

Wire format (one MQTT payload)::

    b"DEFT" | u32 big-endian header length | header (UTF-8 JSON) | body (raw bytes)

The body is usually a safetensors blob (updates, global state, bundle chunks) and is never parsed
by the envelope; the header carries everything needed to route, deduplicate and verify it: message
type, protocol version, sender, fleet, round, an idempotency key, the body's sha256 and length, and
for a chunk of a larger transfer, its index/count and the whole transfer's hash.
JSON rather than msgpack keeps the device side at stdlib + pydantic and lets a user read headers in
``mosquitto_sub`` output.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from device_runtime.errors import first_error
from device_runtime.protocol.errors import EnvelopeError, HashMismatch, TruncatedEnvelope, UnsupportedVersion
from device_runtime.protocol.topics import PROTOCOL_VERSION, check_id

MAGIC = b"DEFT"
_PREFIX = struct.Struct(">4sI")
PREFIX_BYTES = _PREFIX.size
#: a header is metadata; anything bigger is garbage or an attack
MAX_HEADER_BYTES = 64 * 1024

MsgType = Literal[
    "hello", "heartbeat", "status", "task", "update", "global", "ack", "bundle", "bundle-request", "prompt"
]
ContentType = Literal["safetensors", "json", "bytes"]


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def new_key() -> str:
    """A fresh idempotency key. Re-sending the SAME logical message must reuse its key."""
    return uuid.uuid4().hex


class ChunkInfo(BaseModel):
    """Where a chunk sits in its transfer; the transfer hash lets the receiver verify the whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer: str = Field(min_length=1, max_length=128)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    total_length: int = Field(ge=0)
    total_sha256: str = Field(min_length=64, max_length=64)


class Header(BaseModel):
    """The JSON header. ``sha256``/``length`` describe THIS message's body (for a chunk: the chunk)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = PROTOCOL_VERSION
    type: MsgType
    sender: str
    fleet: str
    round: int | None = Field(default=None, ge=0)
    key: str = Field(default_factory=new_key, min_length=1, max_length=128)
    sha256: str = Field(min_length=64, max_length=64)
    length: int = Field(ge=0)
    content: ContentType = "bytes"
    chunk: ChunkInfo | None = None
    ts: float = Field(default_factory=time.time)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sender", "fleet")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "sender/fleet id")


class Envelope:
    """A decoded (and verified) message: ``header`` + ``body`` bytes."""

    __slots__ = ("body", "header")

    def __init__(self, header: Header, body: bytes) -> None:
        self.header = header
        self.body = bytes(body)

    @classmethod
    def build(
        cls,
        type: MsgType,
        *,
        sender: str,
        fleet: str,
        body: bytes = b"",
        round: int | None = None,
        key: str | None = None,
        content: ContentType = "bytes",
        meta: dict[str, Any] | None = None,
    ) -> Envelope:
        """Make an envelope, computing the body's hash and length."""
        header = Header(
            type=type, sender=sender, fleet=fleet, round=round, key=key or new_key(),
            sha256=sha256_hex(body), length=len(body), content=content, meta=meta or {},
        )
        return cls(header, body)

    @classmethod
    def json_message(cls, type: MsgType, obj: Any, **kw: Any) -> Envelope:
        """An envelope whose body is ``obj`` as JSON (hello, heartbeat, acks, bundle requests)."""
        return cls.build(type, body=json.dumps(obj, separators=(",", ":")).encode(), content="json", **kw)

    def json(self) -> Any:
        if self.header.content != "json":
            raise EnvelopeError(f"{self.header.type} message from {self.header.sender} has a {self.header.content} "
                                "body, not JSON")
        return json.loads(self.body)

    def encode(self) -> bytes:
        head = self.header.model_dump_json(exclude_none=True).encode()
        if len(head) > MAX_HEADER_BYTES:
            raise EnvelopeError(f"envelope header is {len(head)} bytes (limit {MAX_HEADER_BYTES}): put large data in "
                                "the body")
        return _PREFIX.pack(MAGIC, len(head)) + head + self.body

    @property
    def encoded_size(self) -> int:
        return PREFIX_BYTES + len(self.header.model_dump_json(exclude_none=True).encode()) + len(self.body)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Envelope:
        """Parse and verify. Raises a :class:`EnvelopeError` subclass naming what is wrong."""
        data = bytes(data)
        if len(data) < PREFIX_BYTES:
            raise TruncatedEnvelope(f"message is {len(data)} bytes, shorter than the {PREFIX_BYTES}-byte envelope "
                                    "prefix")
        magic, hlen = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise EnvelopeError(f"not a deft envelope (starts with {magic!r}, expected {MAGIC!r}): wrong topic or a "
                                "foreign publisher")
        if hlen > MAX_HEADER_BYTES:
            raise EnvelopeError(f"envelope header length {hlen} exceeds {MAX_HEADER_BYTES} bytes: corrupt message")
        if len(data) < PREFIX_BYTES + hlen:
            raise TruncatedEnvelope(
                f"message truncated inside its header ({len(data) - PREFIX_BYTES} of {hlen} header bytes)"
            )
        try:
            raw = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + hlen])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(f"envelope header is not valid JSON ({exc}): corrupt message") from None
        if not isinstance(raw, dict):
            raise EnvelopeError("envelope header is not a JSON object: corrupt message")
        version = raw.get("v")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"message speaks protocol version {version!r}; this kit speaks {PROTOCOL_VERSION}: "
                "run the same deftkit version on device and edge"
            )
        try:
            header = Header.model_validate(raw)
        except ValidationError as exc:
            where, msg = first_error(exc, "header")
            raise EnvelopeError(f"invalid envelope header field {where!r}: {msg}") from None
        body = data[PREFIX_BYTES + hlen :]
        if len(body) < header.length:
            raise TruncatedEnvelope(
                f"{header.type} message from {header.sender} truncated: body has {len(body)} of {header.length} bytes"
            )
        if len(body) > header.length:
            raise EnvelopeError(
                f"{header.type} message from {header.sender} has {len(body) - header.length} bytes after its body: "
                "corrupt message"
            )
        if sha256_hex(body) != header.sha256:
            raise HashMismatch(
                f"{header.type} message from {header.sender} (key {header.key}) fails its sha256 check: "
                "the body was altered in transit or by a faulty sender"
            )
        return cls(header, body)

    def __repr__(self) -> str:
        h = self.header
        return f"Envelope({h.type} from {h.sender} round={h.round} key={h.key} {h.length} B)"


def make_ack(for_message: Envelope, *, sender: str, accepted: bool, reason: str | None = None) -> Envelope:
    """Application-level acknowledgement of ``for_message`` (its key), e.g. "update accepted"."""
    h = for_message.header
    return Envelope.json_message(
        "ack",
        {"ack": h.key, "type": h.type, "accepted": accepted, "reason": reason},
        sender=sender, fleet=h.fleet, round=h.round,
    )

"""Schemas of the JSON bodies (hello, heartbeat, status, task, ack, bundle request) and of a shared
prompt's description (:class:`PromptInfo`, carried in the prompt payload's header).

Binary bodies (updates, global state, bundle chunks) are safetensors/tar bytes and have no schema
here; everything small and structured does, so device and edge agree on field names and a
malformed body is refused with the field named.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_runtime.errors import first_error
from device_runtime.payload import Encoding
from device_runtime.protocol.envelope import Envelope, MsgType
from device_runtime.protocol.errors import EnvelopeError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Hello(_Body):
    """First message of a device after (re)connecting."""

    kit_version: str
    profile: dict[str, Any] = Field(default_factory=dict)  # hardware profile (board, cores, memory ...)
    capabilities: dict[str, Any] = Field(default_factory=dict)  # backend (ort/torch), encodings ...
    bundles: list[str] = Field(default_factory=list)  # bundle hashes it already holds


class Heartbeat(_Body):
    state: Literal["idle", "downloading", "training", "uploading"] = "idle"
    round: int | None = None
    progress: float | None = None


class Status(_Body):
    """Retained on device/<id>/status; ``offline`` is the device's last will."""

    state: Literal["online", "offline"]


class Task(_Body):
    """A round's work for a device. ``global_round`` names the retained global state to start from."""

    round: int = Field(ge=0)
    bundle_hash: str
    global_round: int | None = None
    global_sha256: str | None = None
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    encoding: Encoding = "fp32"
    delta: bool = True
    deadline_ts: float | None = None
    trainable_blocks: list[int] | None = None
    #: global-state name -> this task's bundle's name, where they differ (an emulator variant of the round's
    #: bundle numbers its blocks its own way); the update comes back in the bundle's names
    tensor_names: dict[str, str] | None = None


class Ack(_Body):
    ack: str  # the acknowledged message's idempotency key
    type: str
    accepted: bool
    reason: str | None = None


class BundleRequest(_Body):
    """Ask for a bundle, or (``missing``) only the chunks a resumed download still lacks."""

    bundle: str
    missing: list[int] | None = None


class PromptInfo(_Body):
    """What a device says about the soft prompt it shares (in the payload header's ``metrics["prompt"]``):
    enough for a newcomer to pick sources without downloading anything else. The tensors themselves
    are an ordinary update payload (``device_runtime.payload``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, max_length=64)
    labels: list[str] = Field(max_length=1024)
    #: accuracy on the device's own held-out rows (None: not measured)
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    #: rows per label in the training data (the shape of the device's data, never the data)
    label_counts: dict[str, int] = Field(default_factory=dict, max_length=1024)
    description: str = Field(default="", max_length=280)


M = TypeVar("M", bound=_Body)

_TYPES: dict[type[_Body], MsgType] = {Hello: "hello", Heartbeat: "heartbeat", Status: "status", Task: "task",
                                      Ack: "ack", BundleRequest: "bundle-request"}


def to_envelope(body: _Body, *, sender: str, fleet: str, round: int | None = None, key: str | None = None) -> Envelope:
    """Wrap a body model in an envelope of the matching type."""
    return Envelope.build(_TYPES[type(body)], sender=sender, fleet=fleet, round=round, key=key,
                          body=body.model_dump_json().encode(), content="json")


def parse_body(env: Envelope, model: type[M]) -> M:
    """The envelope's JSON body as ``model``; a clear EnvelopeError naming the field otherwise."""
    expected = _TYPES[model]
    if env.header.type != expected:
        raise EnvelopeError(f"expected a {expected} message, got {env.header.type} from {env.header.sender}")
    try:
        return model.model_validate_json(env.body)
    except ValidationError as exc:
        where, msg = first_error(exc, "body")
        raise EnvelopeError(f"{expected} message from {env.header.sender}: field {where!r}: {msg}") from None

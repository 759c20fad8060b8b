"""Shared soft prompts: what a device sends to the edge's pool or straight to a peer, and reads back.

A shared prompt is an ordinary update payload (``device_runtime.payload``: safetensors + a hashed
header; the same encodings, the same tamper checks) whose ``metrics["prompt"]`` holds a
:class:`~device_runtime.protocol.messages.PromptInfo` (task, labels, local validation accuracy, label
counts, a short description). It travels in an envelope of type ``prompt``:

- to the pool: ``device/<id>/prompt``; the edge validates it and relays it **retained** on
  ``all/prompts/<id>`` (so a device that joins later gets the whole pool on subscribing);
- to a peer: ``device/<id>/prompt-to/<peer>``, which only ``<peer>`` may read (the ACL).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_runtime.errors import PayloadError, validated
from device_runtime.payload import Update, decode_update, encode_update
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.messages import PromptInfo
from device_runtime.protocol.topics import Topics

#: the payload header's metrics key holding the PromptInfo
PROMPT_KEY = "prompt"


@dataclass(frozen=True)
class SharedPrompt:
    """A decoded, checked prompt: whose it is, what it says about itself, its tensors and its size."""

    device: str
    info: PromptInfo
    samples: int
    tensors: dict[str, np.ndarray]
    bytes: int


def encode_prompt(tensors: Mapping[str, np.ndarray], info: PromptInfo, *, bundle_hash: str, device_id: str,
                  samples: int, encoding: str = "fp32") -> bytes:
    """The prompt (and head) tensors a device trained, as a payload carrying ``info``."""
    return encode_update(tensors, bundle_hash=bundle_hash, device_id=device_id, round=0, samples=samples,
                         metrics={PROMPT_KEY: info.model_dump()}, encoding=encoding)


def prompt_info(update: Update) -> PromptInfo:
    """The PromptInfo of a decoded payload; PayloadError if it has none or a malformed one."""
    raw = update.meta.metrics.get(PROMPT_KEY)
    if not isinstance(raw, dict):
        raise PayloadError("not a shared prompt: the payload header has no 'prompt' description")
    return validated(PromptInfo, raw, PayloadError, "prompt description")


def decode_prompt(blob: bytes, *, bundle_hash: str | None = None) -> SharedPrompt:
    """Decode and check a shared prompt (content hash, bundle, description); PayloadError says why not."""
    upd = decode_update(blob, bundle_hash=bundle_hash)
    return SharedPrompt(upd.meta.device_id, prompt_info(upd), upd.meta.samples, upd.tensors, len(blob))


def prompt_envelope(blob: bytes, *, sender: str, fleet: str, device: str | None = None,
                    key: str | None = None) -> Envelope:
    """The envelope a prompt payload travels in (``device``: whose prompt, when the edge relays it)."""
    return Envelope.build("prompt", sender=sender, fleet=fleet, body=blob, content="safetensors", key=key,
                          meta={"device": device or sender})


def publish_prompt(client, topics: Topics, device: str, blob: bytes, *, timeout: float = 30.0) -> Envelope:
    """Send a prompt to the edge's pool; returns the envelope (its key is what the edge acknowledges)."""
    env = prompt_envelope(blob, sender=device, fleet=topics.fleet)
    client.publish(topics.prompt(device), env, timeout=timeout)
    return env


def send_prompt_to(client, topics: Topics, device: str, peer: str, blob: bytes, *, timeout: float = 30.0) -> Envelope:
    """Send a prompt straight to ``peer`` over the broker (device-to-device transfer)."""
    env = prompt_envelope(blob, sender=device, fleet=topics.fleet)
    client.publish(topics.prompt_to(device, peer), env, timeout=timeout)
    return env


def collect_prompts(messages: queue.Queue, *, bundle_hash: str, want: int, timeout: float,
                    exclude: str | None = None) -> tuple[dict[str, SharedPrompt], dict[str, str]]:
    """Read prompts (pool relays or direct ones) from a subscription queue until ``want`` devices' prompts
    are in or ``timeout`` passes. Returns (device -> prompt, refused sender -> reason): a prompt for
    another bundle, a tampered one or one without a description is refused, never used."""
    got: dict[str, SharedPrompt] = {}
    refused: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(got) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = messages.get(timeout=left)
        except queue.Empty:
            break
        # whose prompt: the topic says (device/<id>/prompt-to/.. is ACL-bound to <id>; all/prompts/<id>)
        who = msg.info.device if msg.info is not None and msg.info.device else msg.envelope.header.sender
        try:
            p = decode_prompt(msg.envelope.body, bundle_hash=bundle_hash)
        except PayloadError as exc:
            refused[who] = str(exc)
            continue
        if p.device != who:
            refused[who] = f"payload says device {p.device!r}, the message says {who!r}"
            continue
        if p.device != exclude:
            got[p.device] = p
    return got, refused

"""The edge's prompt pool: devices' shared soft prompts, validated, kept in SQLite and served retained.

A device publishes its trained prompt on ``device/<id>/prompt`` (``device_runtime.prompts``). The
pool checks it like an update (size, registered sender, sender = payload's device, content hash,
the coordinator's bundle, tensor names/shapes/dtypes, finite values) plus its description (task,
labels), stores it as that device's entry (a newer prompt replaces the older one), relays it
**retained** on ``all/prompts/<id>`` and acknowledges it to the device (``accepted`` or the reason).
A device that subscribes to ``all/prompts/+`` later receives the whole pool at once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from device_runtime.bundle.load import Bundle
from device_runtime.prompts import prompt_envelope
from device_runtime.protocol import ProtocolError, Topics, make_ack
from edge_broker.store import Store
from edge_broker.validation import PromptRules, Rejection, validate_prompt

log = logging.getLogger("deft.edge")


class PromptPool:
    def __init__(self, store: Store, client, topics: Topics, bundle: Bundle, *, sender: str,
                 max_bytes: int = 1024 * 1024) -> None:
        self.store = store
        self.client = client
        self.topics = topics
        self.bundle = bundle
        self.sender = sender
        self.max_bytes = max_bytes

    def rules(self, devices: Collection[str]) -> PromptRules:
        m = self.bundle.manifest
        return PromptRules(devices=set(devices), bundle_hash=self.bundle.hash, specs=m.trainable, task=m.task,
                           labels=list(m.labels), max_bytes=self.max_bytes)

    def handle(self, msg, devices: Collection[str]) -> tuple[bool, Rejection | None]:
        """One received prompt: validate, store, relay, acknowledge. Returns (newly stored, rejection)."""
        dev = msg.info.device
        env = msg.envelope
        checked, rej = validate_prompt(self.rules(devices), env.body, sender=dev)
        stored = False
        if rej is not None:
            log.warning("rejected a prompt from %s: %s", dev, rej)
        else:
            stored = self.store.put_prompt(env.header.key, device=dev, samples=checked.samples, payload=env.body,
                                           meta={"info": checked.info.model_dump(), "bytes": len(env.body)})
            if stored:
                self._relay(dev, env.header.key, env.body)
                log.info("prompt pool: %s's prompt stored (%d bytes)", dev, len(env.body))
        ack = make_ack(env, sender=self.sender, accepted=rej is None, reason=None if rej is None else str(rej))
        try:
            self.client.publish(self.topics.ack_to(dev), ack, wait=False)
        except ProtocolError as exc:
            log.warning("could not acknowledge %s's prompt: %s", dev, exc)
        return stored, rej

    def _relay(self, device: str, key: str, payload: bytes) -> None:
        env = prompt_envelope(payload, sender=self.sender, fleet=self.topics.fleet, device=device, key=key)
        self.client.publish(self.topics.prompts_relay(device), env, retain=True, timeout=60)

    def republish(self) -> int:
        """Serve the stored pool again (after a restart, or on a broker without persistence)."""
        recs = self.store.prompts()
        for r in recs:
            self._relay(r.device, r.key, r.payload)
        return len(recs)

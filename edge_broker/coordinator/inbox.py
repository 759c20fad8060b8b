"""The inbox: every message from the devices arrives here and goes where it belongs.

Hellos, heartbeats and status go to the registry; bundle requests to the bundle server of the bundle
they name; shared prompts to the prompt pool (:mod:`~edge_broker.coordinator.prompt_pool`); updates
are validated and stored in batches (:func:`~edge_broker.coordinator.updates.ingest_many`),
then acknowledged. It also watches the link: after a reconnect, last wills the broker published while
it was away are not believed at once (:meth:`Inbox.believes_lost`).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from device_runtime.bundle.load import Bundle
from device_runtime.protocol import BundleRequest, Envelope, ProtocolError, make_ack, parse_body
from edge_broker.coordinator.bundle_server import BundleServer
from edge_broker.coordinator.config import CoordinatorError
from edge_broker.coordinator.updates import ingest_many, make_rules
from edge_broker.validation import UpdateRules

if TYPE_CHECKING:
    from edge_broker.coordinator.coordinator import Coordinator

log = logging.getLogger("deft.edge")

#: at most this many queued updates share one SQLite commit (bounds an ack's wait behind its batch)
MAX_UPDATE_BATCH = 64
#: a device marked lost by its last will must also have been silent this long (heartbeats come every
#: 2 s) before a round closes without it
LOST_CONFIRM_S = 4.0


@dataclass
class OpenRound:
    """What the inbox must know of the round in progress (None between rounds)."""

    round: int
    selected: list[str]
    #: each selected device's task, re-sent when the device says hello again mid-round
    tasks: dict[str, Envelope] = field(default_factory=dict)
    #: LoLa DEFT: each device's own block bundle
    variants: dict[str, Bundle] = field(default_factory=dict)


def _is_update(msg) -> bool:
    return msg.info is not None and msg.info.direction == "device" and msg.info.kind == "update"


class Inbox:
    def __init__(self, coordinator: Coordinator, messages: queue.Queue) -> None:
        self.c = coordinator
        self.messages = messages
        self.open: OpenRound | None = None
        self._rules: UpdateRules | None = None
        self._connects = 0
        self._distrust_lost_until = 0.0

    def pump(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout`` (at least one wait), then check liveness.

        Updates already queued together are ingested as one batch (one SQLite commit, then their acks);
        any other message first flushes the batch, so messages still take effect in arrival order."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            msg = None
        updates: list = []
        while msg is not None:
            if _is_update(msg):
                self.c.stats.bytes_up += msg.envelope.header.length
                updates.append(msg)
                if len(updates) >= MAX_UPDATE_BATCH:
                    self.on_updates(updates)
                    updates = []
            else:
                if updates:
                    self.on_updates(updates)
                    updates = []
                self.dispatch(msg)
            try:
                msg = self.messages.get_nowait()
            except queue.Empty:
                msg = None
        if updates:
            self.on_updates(updates)
        self._log_refused()
        self.c.registry.check_lost()
        self._watch_link()
        why = self.c.watchdog() if self.c.watchdog is not None else None
        if why:
            raise CoordinatorError(why)

    def _log_refused(self) -> None:
        """Messages the client could not even decode (bad envelope, wrong topic): logged and counted."""
        while True:
            try:
                bad = self.c.client.errors.get_nowait()
            except queue.Empty:
                return
            kind = bad.info.kind if bad.info else "message"
            who = bad.info.device if bad.info else "?"
            log.warning("refused a %s from %s: %s", kind, who, bad.error)
            if kind == "update":
                self.c.stats.rejected["malformed"] += 1

    def _watch_link(self) -> None:
        connects = self.c.client.stats.connects
        if connects != self._connects:
            if self._connects:  # a reconnect: the broker went away, and with it every device's link
                self._distrust_lost_until = time.time() + self.c.cfg.lost_after_s
                log.warning("reconnected to the broker; devices its last wills marked lost get %.0fs to come back "
                            "before a round closes without them", self.c.cfg.lost_after_s)
            self._connects = connects

    def believes_lost(self, device: str) -> bool:
        """Whether a round may close without ``device``: it is lost, and that can be believed. A broker
        that shuts down publishes every device's last will, live ones included; so a lost mark counts
        only while this coordinator is connected, not within ``lost_after_s`` of a reconnect, and once
        the device has been silent for a few seconds (a heartbeat would have come)."""
        d = self.c.store.device(device)
        if d is None or d.status != "lost":
            return False
        now = time.time()
        return (self.c.client.connected and now >= self._distrust_lost_until
                and now - d.last_seen >= min(LOST_CONFIRM_S, self.c.cfg.lost_after_s))

    def dispatch(self, msg) -> None:
        """One message that is not an update batch: registry, bundle request, or a lone update."""
        info = msg.info
        if info is None or info.direction != "device":
            return
        self.c.stats.bytes_up += msg.envelope.header.length
        kind, dev = info.kind, info.device
        if kind in ("hello", "heartbeat", "status"):
            self._on_presence(msg, kind, dev)
        elif kind == "bundle-request":
            if self.c.registry.known(dev):
                sent = self._server_for(msg).handle(msg)
                self.c.stats.bytes_down += sent
                self.c.on_event({"event": "bundle", "device": dev, "bytes": sent})
            else:
                log.warning("bundle request from unregistered device %s ignored (send a hello first)", dev)
        elif kind == "update":
            self.on_updates([msg])
        elif kind == "prompt":
            stored, rej = self.c.prompts.handle(msg, self.c.registry.registered())
            if rej is not None:
                self.c.stats.rejected["prompt_" + rej.reason.value] += 1
            elif stored:
                self.c.on_event({"event": "prompt", "device": dev, "bytes": msg.envelope.header.length})
        # prompt-to: device-to-device traffic the edge sees (it reads the whole tree) but does not handle

    def _on_presence(self, msg, kind: str, dev: str) -> None:
        known_before = self.c.store.device(dev) is not None
        if self.c.registry.handle(msg) and kind == "hello" and self.open is not None:
            # a device that (re)connected mid-round gets its task again, unless it has answered
            r = self.open
            if dev in r.selected and not self.c.store.has_update(r.round, dev) and dev in r.tasks:
                self.c.send(self.c.topics.task_for(dev, r.round), r.tasks[dev])
        if kind == "hello" and not known_before:
            self.c.on_event({"event": "device", "device": dev, "online": len(self.c.registry.online())})

    def on_updates(self, msgs: list) -> None:
        """Validate each update, store them all in one transaction, then ack each (never before the commit)."""
        outs = ingest_many(self.c.store, self._current_rules(),
                           [(m.envelope, m.info.device, m.info.round) for m in msgs])
        stats = self.c.stats
        for msg, out in zip(msgs, outs, strict=True):
            dev = msg.info.device
            if out.reason and out.reason != "duplicate" and not out.accepted:
                stats.rejected[out.reason.split(":")[0]] += 1
            if out.reason == "duplicate":
                stats.duplicates += 1
            ack = make_ack(msg.envelope, sender=self.c.cfg.username, accepted=out.accepted, reason=out.reason)
            try:  # not waiting for the broker's PUBACK: the device resends (same key) if an ack goes missing
                self.c.client.publish(self.c.topics.ack_to(dev), ack, wait=False)
                stats.bytes_down += ack.encoded_size
            except ProtocolError as exc:
                log.warning("could not acknowledge %s's update: %s", dev, exc)
            if out.counted:
                self.c.on_event({"event": "update", "device": dev, "round": msg.info.round,
                                 "bytes": msg.envelope.header.length})

    def _current_rules(self) -> UpdateRules:
        # between rounds the "current" round is the next one: an update for a closed round is refused
        cur = self.open.round if self.open is not None else (self.c.last_round() or 0) + 1
        known = self.c.registry.registered()
        if self._rules is None or self._rules.round != cur or set(self._rules.devices) != set(known):
            self._rules = self.rules(cur, known)
        return self._rules

    def rules(self, round_: int, known: list[str]) -> UpdateRules:
        """What an update for ``round_`` must satisfy to count (validation rules, who may send it)."""
        c = self.c
        rules = make_rules(c.manifest, c.bundle.hash, round_, known, c.cfg.max_update_bytes)
        r = self.open if self.open is not None and self.open.round == round_ else None
        # only the devices given the open round's task may contribute; between rounds nobody may
        rules.selected = set(r.selected) if r is not None else set()
        if r is not None and r.variants:  # LoLa DEFT: each device trains its own block bundle
            rules.device_bundles = {d: b.hash for d, b in r.variants.items()}
            rules.device_specs = {d: b.manifest.trainable for d, b in r.variants.items()}
        return rules

    def reset_rules(self) -> None:
        self._rules = None

    def _server_for(self, msg) -> BundleServer:
        """The server of the bundle a request names (the round's bundle, or a device's block variant)."""
        try:
            want = parse_body(msg.envelope, BundleRequest).bundle
        except ProtocolError:
            return self.c.bundles
        return self.c.servers.get(want, self.c.bundles)

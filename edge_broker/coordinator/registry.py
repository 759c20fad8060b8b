"""Who is in the fleet: hello registers a device, heartbeats keep it online, silence or its last will
marks it lost. Backed by the store so a restarted coordinator remembers the fleet."""

from __future__ import annotations

import logging
import time

from device_runtime.protocol import Heartbeat, Hello, ProtocolError, Status, parse_body
from device_runtime.protocol.client import Received
from edge_broker.store import Store

log = logging.getLogger("deft.edge")


class Registry:
    def __init__(self, store: Store, allowed: list[str] | None, lost_after_s: float) -> None:
        self.store = store
        self.allowed = set(allowed) if allowed is not None else None
        self.lost_after_s = lost_after_s
        self._registered: list[str] | None = None
        # grace period after a (re)start: last_seen values from before it say nothing about now
        self._grace_until = time.time() + lost_after_s
        now = time.time()
        for d in store.devices():
            if d.status != "lost":
                store.touch_device(d.id, now=now, status=d.status)

    def allowed_device(self, device: str) -> bool:
        return self.allowed is None or device in self.allowed

    def known(self, device: str) -> bool:
        return self.allowed_device(device) and self.store.device(device) is not None

    def handle(self, msg: Received) -> str | None:
        """Apply a hello / heartbeat / status message; returns the device id it concerned."""
        info = msg.info
        if info is None or info.device is None:
            return None
        dev = info.device
        if not self.allowed_device(dev):
            log.warning("ignoring %s from unknown device %r (not in this fleet's device list)", info.kind, dev)
            return None
        try:
            if info.kind == "hello":
                hello = parse_body(msg.envelope, Hello)
                self.store.upsert_device(dev, profile=hello.profile,
                                         capabilities={**hello.capabilities, "bundles": hello.bundles,
                                                       "kit_version": hello.kit_version})
                self._registered = None
                log.info("device %s said hello (%s)", dev, hello.profile.get("board", "no profile"))
            elif info.kind == "heartbeat":
                parse_body(msg.envelope, Heartbeat)
                if not self.store.touch_device(dev):
                    log.info("heartbeat from %s before its hello; waiting for the hello", dev)
            elif info.kind == "status":
                status = parse_body(msg.envelope, Status)
                if status.state == "offline" and msg.retained:
                    # replayed on (re)subscribe: history that may predate the device's reconnect; a
                    # device that is really gone is marked lost by its silence
                    log.info("retained 'offline' status of %s ignored (not news)", dev)
                elif status.state == "offline":
                    self.store.set_device_status(dev, "lost")
                    log.warning("device %s went offline (last will)", dev)
                elif self.store.device(dev) is not None:
                    self.store.touch_device(dev)
        except ProtocolError as exc:
            log.warning("bad %s message from %s: %s", info.kind, dev, exc)
            return None
        return dev

    def check_lost(self) -> list[str]:
        if time.time() < self._grace_until:
            return []
        lost = self.store.mark_lost(self.lost_after_s)
        for d in lost:
            log.warning("device %s is lost (silent for more than %.0fs)", d, self.lost_after_s)
        return lost

    def registered(self) -> list[str]:
        """Devices that said hello (cached: asked once per received update)."""
        if self._registered is None:
            self._registered = sorted(d.id for d in self.store.devices() if self.allowed_device(d.id))
        return self._registered

    def online(self) -> list[str]:
        return [d.id for d in self.store.devices("online") if self.allowed_device(d.id)]

    def status(self, device: str) -> str | None:
        d = self.store.device(device)
        return None if d is None else d.status

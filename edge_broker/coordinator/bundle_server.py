"""Serve the round's bundle over MQTT: packed once, split into hashed chunks once, sent to a device
on request (all chunks, or only those a resumed download still lacks)."""

from __future__ import annotations

import logging

from device_runtime.bundle.archive import pack_bundle
from device_runtime.bundle.load import Bundle
from device_runtime.protocol import (
    BundleRequest,
    Envelope,
    ProtocolError,
    Topics,
    parse_body,
    payload_budget,
    split,
)
from device_runtime.protocol.client import DeftClient, Received

log = logging.getLogger("deft.edge")

#: chunk size cap: big enough to be fast, small enough that a lost chunk is cheap to resend
MAX_CHUNK = 4 * 1024 * 1024


class BundleServer:
    def __init__(self, bundle: Bundle, client: DeftClient, topics: Topics, sender: str = "edge") -> None:
        self.bundle = bundle
        self.client = client
        self.topics = topics
        self.sender = sender
        self._chunks: list[bytes] | None = None
        self.bytes_sent = 0

    def chunks(self) -> list[bytes]:
        if self._chunks is None:
            data = pack_bundle(self.bundle.root)
            h = self.bundle.hash
            env = Envelope.build("bundle", sender=self.sender, fleet=self.topics.fleet, body=data, key=h,
                                 meta={"name": f"{h[:12]}.tar", "files": len(self.bundle.manifest.files)})
            # the budget of the longest possible per-device topic, so every device gets the same chunks
            budget = payload_budget(self.client.max_packet_size, self.topics.bundle_to("x" * 64, h))
            self._chunks = [c.encode() for c in split(env, min(budget, MAX_CHUNK), transfer=h)]
            log.info("bundle %s packed: %d bytes in %d chunks", h[:12], len(data), len(self._chunks))
        return self._chunks

    def handle(self, msg: Received) -> int:
        """Answer a bundle request; return the bytes sent."""
        dev = msg.info.device if msg.info else None
        if dev is None:
            return 0
        try:
            req = parse_body(msg.envelope, BundleRequest)
        except ProtocolError as exc:
            log.warning("bad bundle request from %s: %s", dev, exc)
            return 0
        if req.bundle != self.bundle.hash:
            log.warning("device %s asked for bundle %s; this run serves %s", dev, req.bundle[:12],
                        self.bundle.hash[:12])
            return 0
        chunks = self.chunks()
        want = range(len(chunks)) if req.missing is None else [i for i in req.missing if 0 <= i < len(chunks)]
        topic = self.topics.bundle_to(dev, self.bundle.hash)
        sent = 0
        for i in want:
            self.client.publish(topic, chunks[i], chunk=False, timeout=120)
            sent += len(chunks[i])
        log.info("sent %d of %d bundle chunks (%d bytes) to %s", len(want), len(chunks), sent, dev)
        self.bytes_sent += sent
        return sent

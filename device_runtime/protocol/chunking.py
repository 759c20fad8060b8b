"""Split a message over the broker's maximum packet size; reassemble it, resumably, with a per-transfer hash.

A chunk is an ordinary envelope whose header repeats the logical message's type, sender, round, key
and meta, and adds :class:`ChunkInfo` (transfer id, index, count, total length and sha256). So a
receiver needs no extra state to route a chunk, and the reassembled message is verified end to end.
The :class:`Reassembler` keeps what it has (in memory, or on disk with ``spool_dir`` so a device that
restarts mid-download keeps its chunks) and says which indices are still missing, which is what a
device asks the edge to resend.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.atomic import atomic_write_bytes
from device_runtime.protocol.envelope import PREFIX_BYTES, ChunkInfo, Envelope, Header, sha256_hex
from device_runtime.protocol.errors import EnvelopeError, HashMismatch, PayloadTooLarge

#: bytes an MQTT PUBLISH adds around the payload besides the topic: fixed header (<=5), topic length
#: (2), packet id (2), MQTT 5 properties (length + a few properties). Generous on purpose.
MQTT_PUBLISH_OVERHEAD = 64
_HEADER_SLACK = 32


def payload_budget(max_packet_size: int, topic: str) -> int:
    """The largest payload that fits one PUBLISH of ``topic`` under ``max_packet_size``."""
    budget = max_packet_size - len(topic.encode()) - MQTT_PUBLISH_OVERHEAD
    if budget <= 1024:
        raise PayloadTooLarge(
            f"max packet size {max_packet_size} leaves {budget} bytes for a payload on {topic!r}: "
            "raise the broker's max_packet_size (at least 4 KiB)"
        )
    return budget


def _chunk_header(h: Header, info: ChunkInfo, body: bytes) -> Header:
    return h.model_copy(update={"chunk": info, "sha256": sha256_hex(body), "length": len(body)})


def split(message: Envelope, max_payload: int, transfer: str | None = None) -> list[Envelope]:
    """Split ``message`` into chunk envelopes whose encoded size is <= ``max_payload``.

    A message that already fits is returned alone (unchunked). ``transfer`` defaults to the message
    key; give a content hash (e.g. the bundle hash) to let a receiver resume across restarts.
    """
    if message.encoded_size <= max_payload:
        return [message]
    body = message.body
    total_sha = sha256_hex(body)
    tid = transfer or message.header.key
    count = 1
    for _ in range(8):  # the header size depends on the digits of count; converges in 1-2 steps
        probe = ChunkInfo(transfer=tid, index=max(count - 1, 0), count=count, total_length=len(body),
                          total_sha256=total_sha)
        head_len = len(_chunk_header(message.header, probe, b"").model_dump_json(exclude_none=True).encode())
        per_chunk = max_payload - PREFIX_BYTES - head_len - _HEADER_SLACK
        if per_chunk < 256:
            raise PayloadTooLarge(
                f"a payload limit of {max_payload} bytes leaves no room for chunk bodies after a {head_len}-byte "
                "header: raise the broker's max_packet_size or shrink the message meta"
            )
        new_count = max(1, -(-len(body) // per_chunk))
        if new_count == count:
            break
        count = new_count
    out: list[Envelope] = []
    for i in range(count):
        part = body[i * per_chunk : (i + 1) * per_chunk]
        info = ChunkInfo(transfer=tid, index=i, count=count, total_length=len(body), total_sha256=total_sha)
        out.append(Envelope(_chunk_header(message.header, info, part), part))
    return out


@dataclass
class _Transfer:
    header: Header  # the first chunk's header (logical fields + chunk info)
    parts: dict[int, bytes] = field(default_factory=dict)  # in-memory mode
    have: set[int] = field(default_factory=set)
    updated: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collect chunks into whole messages. Thread-safe; bounded in transfers and bytes.

    ``add`` returns the complete, hash-verified :class:`Envelope` when the last chunk of a transfer
    arrives (and passes unchunked envelopes straight through), else None. Duplicate chunks
    (QoS 1 redelivery, a resend) are ignored.
    """

    def __init__(
        self,
        *,
        max_transfers: int = 64,
        max_transfer_bytes: int = 2 * 1024**3,
        ttl_s: float = 3600.0,
        spool_dir: str | Path | None = None,
    ) -> None:
        self.max_transfers = max_transfers
        self.max_transfer_bytes = max_transfer_bytes
        self.ttl_s = ttl_s
        self.spool = Path(spool_dir) if spool_dir is not None else None
        self._t: dict[str, _Transfer] = {}
        self._lock = threading.Lock()
        if self.spool is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
            self._load_spool()

    # ---- public ---------------------------------------------------------------------------------
    def add(self, env: Envelope) -> Envelope | None:
        info = env.header.chunk
        if info is None:
            return env
        if info.index >= info.count:
            raise EnvelopeError(f"chunk index {info.index} out of range for a {info.count}-chunk transfer "
                                f"{info.transfer}")
        if info.total_length > self.max_transfer_bytes:
            raise PayloadTooLarge(
                f"transfer {info.transfer} announces {info.total_length} bytes, over this receiver's "
                f"limit of {self.max_transfer_bytes}"
            )
        with self._lock:
            self._expire()
            t = self._t.get(info.transfer)
            if t is not None:
                old = t.header.chunk
                assert old is not None
                if (old.count, old.total_sha256, old.total_length) != (info.count, info.total_sha256,
                                                                       info.total_length):
                    # the sender restarted the transfer with different content: start over
                    self._drop(info.transfer)
                    t = None
            if t is None:
                if len(self._t) >= self.max_transfers:
                    oldest = min(self._t, key=lambda k: self._t[k].updated)
                    self._drop(oldest)
                t = _Transfer(header=env.header)
                self._t[info.transfer] = t
                self._write_spool_header(info.transfer, env.header)
            t.updated = time.monotonic()
            if info.index in t.have:
                return None
            self._store(info.transfer, t, info.index, env.body)
            if len(t.have) < info.count:
                return None
            body = b"".join(self._load(info.transfer, t, i) for i in range(info.count))
            self._drop(info.transfer)
        if len(body) != info.total_length or sha256_hex(body) != info.total_sha256:
            raise HashMismatch(
                f"transfer {info.transfer} from {env.header.sender} reassembled to a body that fails its sha256 "
                "check: a chunk was altered; request the transfer again"
            )
        header = t.header.model_copy(update={"chunk": None, "sha256": info.total_sha256, "length": info.total_length})
        return Envelope(header, body)

    def missing(self, transfer: str) -> list[int] | None:
        """Indices still missing (None: transfer unknown, e.g. never started or already complete)."""
        with self._lock:
            t = self._t.get(transfer)
            if t is None:
                return None
            assert t.header.chunk is not None
            return [i for i in range(t.header.chunk.count) if i not in t.have]

    def progress(self, transfer: str) -> tuple[int, int] | None:
        with self._lock:
            t = self._t.get(transfer)
            return None if t is None else (len(t.have), t.header.chunk.count)  # type: ignore[union-attr]

    def transfers(self) -> list[str]:
        with self._lock:
            return list(self._t)

    def discard(self, transfer: str) -> None:
        with self._lock:
            self._drop(transfer)

    # ---- storage --------------------------------------------------------------------------------
    def _dir(self, transfer: str) -> Path:
        assert self.spool is not None
        return self.spool / transfer

    def _write_spool_header(self, transfer: str, header: Header) -> None:
        if self.spool is None:
            return
        d = self._dir(transfer)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "header.json", header.model_dump_json().encode())

    def _store(self, transfer: str, t: _Transfer, index: int, body: bytes) -> None:
        if self.spool is None:
            t.parts[index] = body
        else:
            atomic_write_bytes(self._dir(transfer) / f"{index}.part", body)
        t.have.add(index)

    def _load(self, transfer: str, t: _Transfer, index: int) -> bytes:
        if self.spool is None:
            return t.parts[index]
        return (self._dir(transfer) / f"{index}.part").read_bytes()

    def _drop(self, transfer: str) -> None:
        self._t.pop(transfer, None)
        if self.spool is not None:
            shutil.rmtree(self._dir(transfer), ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, t in self._t.items() if now - t.updated > self.ttl_s]:
            self._drop(k)

    def _load_spool(self) -> None:
        assert self.spool is not None
        for d in sorted(p for p in self.spool.iterdir() if p.is_dir()):
            try:
                header = Header.model_validate(json.loads((d / "header.json").read_bytes()))
            except (OSError, ValueError):
                shutil.rmtree(d, ignore_errors=True)  # a spool dir without a readable header is useless
                continue
            if header.chunk is None or header.chunk.transfer != d.name:
                shutil.rmtree(d, ignore_errors=True)
                continue
            have = {int(p.stem) for p in d.glob("*.part") if p.stem.isdigit() and int(p.stem) < header.chunk.count}
            self._t[d.name] = _Transfer(header=header, have=have)

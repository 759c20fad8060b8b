"""SQLite persistence for the coordinator: devices, rounds, received updates, global tensors, strategy state,
and the prompt pool (each device's latest shared soft prompt).

Why SQLite (stdlib, WAL, ``synchronous=FULL``): every write is one transaction, so a coordinator
killed with SIGKILL at any instant restarts with each update either fully stored or absent, never
half-written, and with each closed round's global tensors present. Updates are keyed by the
envelope's idempotency key, so a QoS 1 redelivery or a replay is stored (and counted) once; a second,
different update from the same device for the same round is refused too (one vote per device).
Tensors are stored as safetensors bytes (never pickle). One writer: the coordinator's single thread
owns the connection (SQLite refuses its use from another thread).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from device_runtime.errors import DeftError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    profile TEXT NOT NULL DEFAULT '{}',
    capabilities TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'online',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregating', 'closed', 'failed')),
    bundle_hash TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    started REAL NOT NULL,
    deadline REAL,
    closed REAL,
    result TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    key TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    device TEXT NOT NULL,
    received REAL NOT NULL,
    samples INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    payload BLOB,
    payload_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round);
CREATE UNIQUE INDEX IF NOT EXISTS one_accepted_update_per_device_round ON updates(round, device) WHERE accepted = 1;
CREATE TABLE IF NOT EXISTS globals (
    round INTEGER PRIMARY KEY,
    tensors BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    device TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    received REAL NOT NULL,
    samples INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    payload BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    updated REAL NOT NULL
);
"""

RoundStatus = Literal["open", "aggregating", "closed", "failed"]
AddResult = Literal["stored", "duplicate_key", "device_already_counted"]


class StoreError(DeftError):
    """The database cannot be opened or is from another kit version. The CLI prints ``error: <message>``."""


def tensors_to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def tensors_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(bytes(blob))


@dataclass(frozen=True)
class NewUpdate:
    """One received update to store (the arguments of :meth:`Store.add_update`, for a batch)."""

    key: str
    round: int
    device: str
    samples: int
    payload: bytes | None
    accepted: bool = True
    reason: str | None = None
    meta: Mapping[str, Any] | None = None
    now: float | None = None


@dataclass(frozen=True)
class PromptRecord:
    """One device's prompt in the pool (its latest accepted one)."""

    device: str
    key: str
    received: float
    samples: int
    meta: dict[str, Any]
    payload: bytes


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    profile: dict[str, Any]
    capabilities: dict[str, Any]
    status: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class RoundRecord:
    round: int
    status: RoundStatus
    bundle_hash: str
    config: dict[str, Any]
    started: float
    deadline: float | None
    closed: float | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class UpdateRecord:
    key: str
    round: int
    device: str
    received: float
    samples: int
    accepted: bool
    reason: str | None
    meta: dict[str, Any]
    payload: bytes | None
    payload_sha256: str | None


#: SQLite page size of a new store (bytes)
PAGE_SIZE = 65536


class Store:
    """One coordinator's database. Thread-safe (one connection behind a lock: paho callbacks and the
    round loop may both write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            # 64 KiB pages (takes effect only on a new database, before WAL): an update is a ~80-300 KB
            # blob, stored in a few pages instead of a 75-page overflow chain; ~3x faster to store
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(f"{self.path} has store schema {version}; this kit expects {SCHEMA_VERSION}: "
                                 "use a new --workdir or the matching deftkit version")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the coordinator database {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction (BEGIN IMMEDIATE: take the write lock up front)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ---- devices --------------------------------------------------------------------------------
    def upsert_device(self, device: str, *, profile: Mapping[str, Any] | None = None,
                      capabilities: Mapping[str, Any] | None = None, status: str = "online",
                      now: float | None = None) -> None:
        """Register a device (hello) or refresh what it said about itself."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices(id, profile, capabilities, status, first_seen, last_seen) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET profile=excluded.profile, capabilities=excluded.capabilities, "
                "status=excluded.status, last_seen=excluded.last_seen",
                (device, json.dumps(dict(profile or {})), json.dumps(dict(capabilities or {})), status, now, now),
            )

    def touch_device(self, device: str, now: float | None = None, status: str = "online") -> bool:
        """Heartbeat; False if the device never said hello."""
        with self._tx() as db:
            cur = db.execute("UPDATE devices SET last_seen=?, status=? WHERE id=?",
                             (time.time() if now is None else now, status, device))
            return cur.rowcount == 1

    def set_device_status(self, device: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE devices SET status=? WHERE id=?", (status, device))

    def mark_lost(self, silent_for_s: float, now: float | None = None) -> list[str]:
        """Mark devices silent for longer than ``silent_for_s`` as lost; return their ids."""
        cutoff = (time.time() if now is None else now) - silent_for_s
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM devices WHERE status != 'lost' AND last_seen < ?",
                                            (cutoff,))]
            db.executemany("UPDATE devices SET status='lost' WHERE id=?", [(i,) for i in ids])
        return ids

    def devices(self, status: str | None = None) -> list[DeviceRecord]:
        q = "SELECT id, profile, capabilities, status, first_seen, last_seen FROM devices"
        args: tuple = ()
        if status is not None:
            q, args = q + " WHERE status=?", (status,)
        rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [DeviceRecord(r[0], json.loads(r[1]), json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def device(self, device: str) -> DeviceRecord | None:
        return next((d for d in self.devices() if d.id == device), None)

    # ---- rounds ---------------------------------------------------------------------------------
    def open_round(self, round: int, *, bundle_hash: str, config: Mapping[str, Any] | None = None,
                   deadline: float | None = None, now: float | None = None) -> RoundRecord:
        """Start a round; idempotent for a restarted coordinator (returns the existing record)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO rounds(round, status, bundle_hash, config, started, deadline) "
                "VALUES (?,?,?,?,?,?)",
                (round, "open", bundle_hash, json.dumps(dict(config or {})), time.time() if now is None else now,
                 deadline),
            )
        rec = self.round(round)
        assert rec is not None
        if rec.bundle_hash != bundle_hash:
            raise StoreError(f"round {round} already exists with bundle {rec.bundle_hash[:12]}, not {bundle_hash[:12]}")
        return rec

    def round(self, round: int) -> RoundRecord | None:
        r = self._db.execute(
            "SELECT round, status, bundle_hash, config, started, deadline, closed, result "
            "FROM rounds WHERE round=?",
            (round,)).fetchone()
        if r is None:
            return None
        return RoundRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], json.loads(r[7]) if r[7] else None)

    def rounds(self) -> list[RoundRecord]:
        ns = [r[0] for r in self._db.execute("SELECT round FROM rounds ORDER BY round")]
        return [self.round(n) for n in ns]  # type: ignore[misc]

    def latest_round(self) -> RoundRecord | None:
        r = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]
        return None if r is None else self.round(r)

    def set_round_status(self, round: int, status: RoundStatus, result: Mapping[str, Any] | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE rounds SET status=?, result=COALESCE(?, result) WHERE round=?",
                       (status, json.dumps(dict(result)) if result is not None else None, round))

    def commit_aggregate(self, round: int, tensors: Mapping[str, np.ndarray], *,
                         result: Mapping[str, Any] | None = None,
                         strategy_state: bytes | None = None, now: float | None = None) -> None:
        """Atomically: store the round's new global tensors, the strategy's state, and close the round."""
        blob = tensors_to_bytes(tensors)
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO globals(round, tensors, sha256, created) VALUES (?,?,?,?)",
                       (round, blob, hashlib.sha256(blob).hexdigest(), now))
            if strategy_state is not None:
                db.execute("INSERT OR REPLACE INTO state(name, value, updated) VALUES ('strategy', ?, ?)",
                           (strategy_state, now))
            db.execute("UPDATE rounds SET status='closed', closed=?, result=? WHERE round=?",
                       (now, json.dumps(dict(result or {})), round))

    # ---- updates --------------------------------------------------------------------------------
    def add_update(self, key: str, *, round: int, device: str, samples: int, payload: bytes | None,
                   accepted: bool = True, reason: str | None = None, meta: Mapping[str, Any] | None = None,
                   now: float | None = None) -> AddResult:
        """Store a received update once. A known key -> ``duplicate_key`` (redelivery or replay); a second
        accepted update from the same device in the round -> ``device_already_counted``. Rejected
        updates are stored too (without counting) so the report can say why."""
        return self.add_updates([NewUpdate(key, round, device, samples, payload, accepted, reason, meta, now)])[0]

    def add_updates(self, items: Sequence[NewUpdate]) -> list[AddResult]:
        """:meth:`add_update` for several updates in ONE transaction (one commit and fsync instead of one per
        update, which dominates storing when many arrive at once). Each item gets exactly the result
        it would get alone, in order (a key repeated within the batch is a ``duplicate_key`` the second
        time). All or nothing: if the commit fails, none is stored, so no ack may be sent for any."""
        rows = [(u, hashlib.sha256(u.payload).hexdigest() if u.payload is not None else None) for u in items]
        out: list[AddResult] = []
        with self._tx() as db:
            for u, digest in rows:
                if db.execute("SELECT 1 FROM updates WHERE key=?", (u.key,)).fetchone() is not None:
                    out.append("duplicate_key")
                    continue
                try:  # a failed INSERT undoes only itself (SQLite's statement-level ABORT): the batch goes on
                    db.execute(
                        "INSERT INTO updates(key, round, device, received, samples, accepted, reason, meta, "
                        "payload, payload_sha256) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (u.key, u.round, u.device, time.time() if u.now is None else u.now, int(u.samples),
                         int(u.accepted), u.reason, json.dumps(dict(u.meta or {})), u.payload, digest),
                    )
                except sqlite3.IntegrityError:
                    out.append("device_already_counted")
                    continue
                out.append("stored")
        return out

    def has_update(self, round: int, device: str) -> bool:
        return self._db.execute("SELECT 1 FROM updates WHERE round=? AND device=? AND accepted=1",
                                (round, device)).fetchone() is not None

    def updates(self, round: int, *, accepted: bool | None = True, with_payload: bool = True) -> list[UpdateRecord]:
        """A round's updates in arrival order. ``with_payload=False`` (a cheap "who has answered"): no
        payload and no payload_sha256 either, since the digest column sits after the payload in each row
        and reading it walks the payload's overflow pages (~0.05 ms per 300 KB update, per call)."""
        cols = "key, round, device, received, samples, accepted, reason, meta, " + (
            "payload, payload_sha256" if with_payload else "NULL, NULL")
        q, args = f"SELECT {cols} FROM updates WHERE round=?", [round]
        if accepted is not None:
            q += " AND accepted=?"
            args.append(int(accepted))
        rows = self._db.execute(q + " ORDER BY received, key", args).fetchall()
        return [UpdateRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], json.loads(r[7]),
                             bytes(r[8]) if r[8] is not None else None, r[9]) for r in rows]

    def count_updates(self, round: int, accepted: bool = True) -> int:
        return self._db.execute("SELECT COUNT(*) FROM updates WHERE round=? AND accepted=?",
                                (round, int(accepted))).fetchone()[0]

    # ---- the prompt pool ------------------------------------------------------------------------
    def put_prompt(self, key: str, *, device: str, samples: int, payload: bytes,
                   meta: Mapping[str, Any] | None = None, now: float | None = None) -> bool:
        """Store ``device``'s prompt, replacing its previous one; False if this key is already stored
        (a QoS 1 redelivery)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM prompts WHERE device=? AND key=?", (device, key)).fetchone() is not None:
                return False
            db.execute("INSERT OR REPLACE INTO prompts(device, key, received, samples, meta, payload, payload_sha256) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (device, key, time.time() if now is None else now, int(samples), json.dumps(dict(meta or {})),
                        payload, hashlib.sha256(payload).hexdigest()))
        return True

    def prompts(self) -> list[PromptRecord]:
        """The pool: one prompt per device, by device id; a row that fails its sha256 is an error."""
        rows = self._db.execute("SELECT device, key, received, samples, meta, payload, payload_sha256 FROM prompts "
                                "ORDER BY device").fetchall()
        out = []
        for r in rows:
            if hashlib.sha256(r[5]).hexdigest() != r[6]:
                raise StoreError(f"the prompt of {r[0]} in {self.path} fails its sha256: the database is corrupt")
            out.append(PromptRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), bytes(r[5])))
        return out

    # ---- global tensors and state ---------------------------------------------------------------
    def save_global(self, round: int, tensors: Mapping[str, np.ndarray], now: float | None = None) -> None:
        """The global tensors a round starts from (round 0: the bundle's initial tensors)."""
        blob = tensors_to_bytes(tensors)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO globals(round, tensors, sha256, created) VALUES (?,?,?,?)",
                       (round, blob, hashlib.sha256(blob).hexdigest(), time.time() if now is None else now))

    def load_global(self, round: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """(round, tensors) for ``round``, or the latest stored; None if there is none."""
        if round is None:
            r = self._db.execute(
                "SELECT round, tensors, sha256 FROM globals ORDER BY round DESC LIMIT 1").fetchone()
        else:
            r = self._db.execute("SELECT round, tensors, sha256 FROM globals WHERE round=?", (round,)).fetchone()
        if r is None:
            return None
        if hashlib.sha256(r[1]).hexdigest() != r[2]:
            raise StoreError(f"global tensors of round {r[0]} in {self.path} fail their sha256: the database is "
                             "corrupt")
        return r[0], tensors_from_bytes(r[1])

    def put_state(self, name: str, value: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO state(name, value, updated) VALUES (?,?,?)", (name, value, time.time()))

    def get_state(self, name: str) -> bytes | None:
        r = self._db.execute("SELECT value FROM state WHERE name=?", (name,)).fetchone()
        return None if r is None else bytes(r[0])

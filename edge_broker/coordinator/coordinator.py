"""The coordinator loop: wait for devices, run the rounds, plug in, report; resume after a restart.

Everything that must survive a crash is in the SQLite store (devices, each round's selection and
deadline, every received update under its idempotency key, each round's global tensors and the
strategy state), and the MQTT session is persistent (QoS 1), so updates sent while the coordinator
was down are delivered when it comes back. A restarted coordinator re-reads the open round,
re-sends tasks only to devices that have not answered, and counts each update once.
Single-threaded on purpose: one loop pulls messages and checks deadlines, so there is no shared
state to lock.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_runtime.bundle.load import load_bundle
from device_runtime.errors import DeviceError
from device_runtime.protocol import Envelope, ProtocolError, Task, Topics, make_ack, to_envelope
from device_runtime.weights import initial_tensors
from edge_broker.aggregation import get_strategy
from edge_broker.coordinator.bundle_server import BundleServer
from edge_broker.coordinator.config import CoordinatorConfig, CoordinatorError
from edge_broker.coordinator.registry import Registry
from edge_broker.coordinator.report import write_report
from edge_broker.coordinator.rounds import RoundStats, aggregate_round, ingest_many, make_rules
from edge_broker.store import Store, tensors_from_bytes, tensors_to_bytes

log = logging.getLogger("deft.edge")

#: a device marked lost by its last will must also have been silent this long (heartbeats come every
#: 2 s) before a round closes without it
LOST_CONFIRM_S = 4.0
#: at most this many queued updates share one SQLite commit (bounds an ack's wait behind its batch)
MAX_UPDATE_BATCH = 64


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, *, on_event: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.on_event = on_event or (lambda e: None)
        try:
            self.bundle = load_bundle(cfg.bundle)
        except DeviceError as exc:
            raise CoordinatorError(str(exc)) from None
        self.manifest = self.bundle.manifest
        self.topics = Topics(cfg.fleet)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.workdir / "edge.db")
        self.strategy = get_strategy(cfg.strategy, clip_norm=cfg.clip_norm, **cfg.strategy_params)
        saved = self.store.get_state("strategy")
        if saved:
            self.strategy.load_state_dict(tensors_from_bytes(saved))
        self.registry = Registry(self.store, cfg.devices, cfg.lost_after_s)
        self.client = None
        self.stats: RoundStats = RoundStats()
        self._global_env: Envelope | None = None
        self._round: int | None = None
        self._selected: list[str] = []
        self._task_env: dict[str, Envelope] = {}
        self.stop_requested = False
        self._connects = 0
        self._distrust_lost_until = 0.0
        #: called while waiting; a returned message aborts the run (the demo: "a device process died")
        self.watchdog: Callable[[], str | None] | None = None
        self._rules = None
        self._variants: dict = {}
        self._planner = None
        if cfg.allocation is not None:
            from edge_broker.coordinator.block_plan import BlockPlanner

            steps = int(cfg.hyperparams.get("steps") or cfg.plan_steps)
            bpv = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-row": 1.05}[cfg.encoding]
            self._planner = BlockPlanner(self.bundle, cfg.workdir / "variants", cfg.allocation, cfg.cost_table,
                                         cfg.total_bandwidth, steps, bpv)
        self._evaluator = None
        self._bundle_evaluator = None

    # ---- connection and messages ----------------------------------------------------------------
    def connect(self) -> None:
        from device_runtime.protocol.client import DeftClient

        self.client = DeftClient.from_url(self.cfg.broker, client_id=f"deft-edge-{self.cfg.fleet}",
                                          username=self.cfg.username, password=self.cfg.password,
                                          persistent_session=True, reconnect_max_s=5.0,
                                          max_packet_size=self.cfg.max_packet_size)
        try:
            self.client.connect(timeout=30)
        except ProtocolError as exc:
            raise CoordinatorError(str(exc)) from None
        self.inbox = self.client.subscribe(self.topics.from_devices("#"))
        self.bundles = BundleServer(self.bundle, self.client, self.topics, sender=self.cfg.username)
        self.servers: dict[str, BundleServer] = {self.bundle.hash: self.bundles}

    def _send(self, topic: str, env: Envelope, *, fanout: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, env, retain=retain, timeout=60)
        self.stats.bytes_down += env.encoded_size * max(1, fanout)

    def pump(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout`` (at least one wait), then check liveness.

        Updates already queued together are ingested as one batch (one SQLite commit, then their acks);
        any other message first flushes the batch, so messages still take effect in arrival order."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            msg = None
        updates: list = []
        while msg is not None:
            if msg.info is not None and msg.info.direction == "device" and msg.info.kind == "update":
                self.stats.bytes_up += msg.envelope.header.length
                updates.append(msg)
                if len(updates) >= MAX_UPDATE_BATCH:
                    self._on_updates(updates)
                    updates = []
            else:
                if updates:
                    self._on_updates(updates)
                    updates = []
                self._dispatch(msg)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                msg = None
        if updates:
            self._on_updates(updates)
        while True:
            try:
                bad = self.client.errors.get_nowait()
            except queue.Empty:
                break
            kind = bad.info.kind if bad.info else "message"
            who = bad.info.device if bad.info else "?"
            log.warning("refused a %s from %s: %s", kind, who, bad.error)
            if kind == "update":
                self.stats.rejected["malformed"] += 1
        self.registry.check_lost()
        connects = self.client.stats.connects
        if connects != self._connects:
            if self._connects:  # a reconnect: the broker went away, and with it every device's link
                self._distrust_lost_until = time.time() + self.cfg.lost_after_s
                log.warning("reconnected to the broker; devices its last wills marked lost get %.0fs to come back "
                            "before a round closes without them", self.cfg.lost_after_s)
            self._connects = connects
        why = self.watchdog() if self.watchdog is not None else None
        if why:
            raise CoordinatorError(why)

    def _dispatch(self, msg) -> None:
        info = msg.info
        if info is None or info.direction != "device":
            return
        self.stats.bytes_up += msg.envelope.header.length
        kind, dev = info.kind, info.device
        if kind in ("hello", "heartbeat", "status"):
            known_before = self.store.device(dev) is not None
            if self.registry.handle(msg) and kind == "hello" and self._round is not None:
                # a device that (re)connected mid-round gets its task again, unless it has answered
                if dev in self._selected and not self.store.has_update(self._round, dev) and dev in self._task_env:
                    self._send(self.topics.task_for(dev, self._round), self._task_env[dev])
            if kind == "hello" and not known_before:
                self.on_event({"event": "device", "device": dev, "online": len(self.registry.online())})
        elif kind == "bundle-request":
            if self.registry.known(dev):
                sent = self._server_for(msg).handle(msg)
                self.stats.bytes_down += sent
                self.on_event({"event": "bundle", "device": dev, "bytes": sent})
            else:
                log.warning("bundle request from unregistered device %s ignored (send a hello first)", dev)
        elif kind == "update":
            self._on_updates([msg])

    def _on_update(self, msg) -> None:
        self._on_updates([msg])

    def _on_updates(self, msgs: list) -> None:
        """Validate each update, store them all in one transaction, then ack each (never before the commit)."""
        # between rounds the "current" round is the next one: an update for a closed round is refused
        cur = self._round if self._round is not None else (self._last_round() or 0) + 1
        known = self._known_devices()
        if self._rules is None or self._rules.round != cur or set(self._rules.devices) != set(known):
            self._rules = self._make_rules(cur, known)
        outs = ingest_many(self.store, self._rules, [(m.envelope, m.info.device, m.info.round) for m in msgs])
        for msg, out in zip(msgs, outs):
            dev = msg.info.device
            if out.reason and out.reason != "duplicate" and not out.accepted:
                self.stats.rejected[out.reason.split(":")[0]] += 1
            if out.reason == "duplicate":
                self.stats.duplicates += 1
            ack = make_ack(msg.envelope, sender=self.cfg.username, accepted=out.accepted, reason=out.reason)
            try:  # not waiting for the broker's PUBACK: the device resends (same key) if an ack goes missing
                self.client.publish(self.topics.ack_to(dev), ack, wait=False)
                self.stats.bytes_down += ack.encoded_size
            except ProtocolError as exc:
                log.warning("could not acknowledge %s's update: %s", dev, exc)
            if out.counted:
                self.on_event({"event": "update", "device": dev, "round": msg.info.round,
                               "bytes": msg.envelope.header.length})

    def _server_for(self, msg) -> BundleServer:
        """The server of the bundle a request names (the round's bundle, or a device's block variant)."""
        from device_runtime.protocol import BundleRequest, parse_body

        try:
            want = parse_body(msg.envelope, BundleRequest).bundle
        except ProtocolError:
            return self.bundles
        return self.servers.get(want, self.bundles)

    def _written_off(self, device: str) -> bool:
        """Whether a round may close without ``device``: it is lost, and that can be believed. A broker
        that shuts down publishes every device's last will, live ones included; so a lost mark counts
        only while this coordinator is connected, not within ``lost_after_s`` of a reconnect, and once
        the device has been silent for a few seconds (a heartbeat would have come)."""
        d = self.store.device(device)
        if d is None or d.status != "lost":
            return False
        now = time.time()
        return (self.client.connected and now >= self._distrust_lost_until
                and now - d.last_seen >= min(LOST_CONFIRM_S, self.cfg.lost_after_s))

    def _known_devices(self) -> list[str]:
        return self.registry.registered()

    def _make_rules(self, round_: int, known: list[str]):
        rules = make_rules(self.manifest, self.bundle.hash, round_, known, self.cfg.max_update_bytes)
        # only the devices given the open round's task may contribute; between rounds nobody may
        rules.selected = set(self._selected) if round_ == self._round else set()
        if round_ == self._round and self._variants:  # LoLa DEFT: each device trains its own block bundle
            rules.device_bundles = {d: b.hash for d, b in self._variants.items()}
            rules.device_specs = {d: b.manifest.trainable for d, b in self._variants.items()}
        return rules

    def _last_round(self) -> int | None:
        rec = self.store.latest_round()
        return None if rec is None else rec.round

    # ---- global state ---------------------------------------------------------------------------
    def _initial_global(self) -> tuple[int, dict[str, np.ndarray]]:
        got = self.store.load_global()
        if got is None:
            tensors = initial_tensors(self.bundle)
            self.store.save_global(0, tensors)
            return 0, tensors
        return got

    def _publish_global(self, round_: int, tensors: dict[str, np.ndarray]) -> Envelope:
        env = Envelope.build("global", sender=self.cfg.username, fleet=self.cfg.fleet, round=round_,
                             body=tensors_to_bytes(tensors), content="safetensors",
                             meta={"bundle": self.bundle.hash, "round": round_})
        self._send(self.topics.global_state(), env, fanout=max(1, len(self.registry.online())), retain=True)
        self._global_env = env
        return env

    # ---- the run --------------------------------------------------------------------------------
    def wait_for_devices(self) -> list[str]:
        need = self.cfg.min_devices
        deadline = time.monotonic() + self.cfg.wait_devices_s
        log.info("waiting for %d device(s) to say hello on %s", need, self.topics.base)
        while time.monotonic() < deadline and not self.stop_requested:
            online = self.registry.online()
            if len(online) >= need:
                return online
            self.pump(0.5)
        raise CoordinatorError(
            f"only {len(self.registry.online())} of {need} devices said hello within {self.cfg.wait_devices_s:.0f}s: "
            "start the devices (`deft device run`) or lower --min-devices")

    def run(self) -> dict:
        if self.client is None:
            self.connect()
        t0 = time.time()
        g_round, g = self._initial_global()
        self._publish_global(g_round, g)
        report: dict[str, Any] = {"fleet": self.cfg.fleet, "bundle": self.bundle.hash, "strategy": self.cfg.strategy,
                                  "encoding": self.cfg.encoding, "rounds": [r.result for r in self.store.rounds()
                                                                             if r.status == "closed" and r.result]}
        if self.cfg.eval_data is not None and self.cfg.eval_initial:
            init = self.store.get_state("initial_eval")
            if init is None:
                first = self.store.load_global(0)
                ev = self._evaluate(first[1] if first else g)
                self.store.put_state("initial_eval", repr(ev.get("accuracy")).encode())
                report["initial_accuracy"] = ev.get("accuracy")
            else:
                report["initial_accuracy"] = float(init.decode())
            self.on_event({"event": "initial_eval", "accuracy": report["initial_accuracy"]})
        for r in range(1, self.cfg.rounds + 1):
            rec = self.store.round(r)
            if rec is not None and rec.status == "closed":
                continue
            if self.stop_requested:
                break
            result = self.run_round(r)
            report["rounds"] = [x for x in report["rounds"] if x["round"] != r] + [result]
        return self.finish(report, t0)

    def run_round(self, r: int) -> dict:
        self.stats = RoundStats()
        rec = self.store.round(r)
        g_round, g = self.store.load_global()
        if rec is None:
            # min_devices gates the first round only: later rounds go on with the devices still online
            # (one lost in an earlier round must not stall the run), waiting only below the quorum
            online = self.registry.online()
            selected = self.wait_for_devices() if r == 1 or len(online) < self.cfg.min_updates else online
            config: dict[str, Any] = {"selected": selected, "global_round": g_round}
            if self._planner is not None:
                config.update(self._plan(selected))
                selected = config["selected"]
            rec = self.store.open_round(r, bundle_hash=self.bundle.hash, config=config,
                                        deadline=time.time() + self.cfg.deadline_s)
            log.info("round %d opened with %s (deadline in %.0fs)", r, ", ".join(selected), self.cfg.deadline_s)
        else:
            log.info("round %d resumed after a restart (%d update(s) already counted)", r, self.store.count_updates(r))
        selected = list(rec.config["selected"])
        self._variants = {}
        for dev, path in rec.config.get("variants", {}).items():
            b = load_bundle(path)
            self._variants[dev] = b
            if b.hash not in self.servers:
                self.servers[b.hash] = BundleServer(b, self.client, self.topics, sender=self.cfg.username)
        if rec.config.get("global_round") != g_round:
            got = self.store.load_global(rec.config["global_round"])
            if got is None:
                raise CoordinatorError(f"round {r} starts from global round {rec.config['global_round']}, "
                                       "which the store does not hold; the database is damaged")
            g_round, g = got
        if self._global_env is None or self._global_env.header.round != g_round:
            self._publish_global(g_round, g)
        self._round, self._selected = r, selected
        blocks = rec.config.get("blocks", {})
        self._task_env = {}
        for d in selected:
            task = Task(round=r, bundle_hash=self._variants[d].hash if d in self._variants else self.bundle.hash,
                        global_round=g_round, global_sha256=self._global_env.header.sha256,
                        hyperparams=self.cfg.hyperparams, encoding=self.cfg.encoding, delta=self.cfg.delta,
                        deadline_ts=rec.deadline, trainable_blocks=blocks.get(d))
            self._task_env[d] = to_envelope(task, sender=self.cfg.username, fleet=self.cfg.fleet, round=r)
        self._rules = None
        # all tasks back to back, one wait for the broker's acknowledgements (not a round trip per device)
        sends = [(self.topics.task_for(d, r), self._task_env[d]) for d in selected if not self.store.has_update(r, d)]
        self.client.publish_many(sends, timeout=60)
        self.stats.bytes_down += sum(env.encoded_size for _, env in sends)
        self.on_event({"event": "round_open", "round": r, "devices": selected})
        deadline = rec.deadline or (time.time() + self.cfg.deadline_s)
        extensions = 0
        deadline_hit = False
        while True:
            self.pump(0.2)
            got = {u.device for u in self.store.updates(r, with_payload=False)}
            pending = [d for d in selected if d not in got]
            if not pending:
                break
            if self.cfg.quorum is not None and len(got) >= self.cfg.quorum:
                log.info("round %d: quorum of %d updates reached; closing without %s", r, self.cfg.quorum,
                         ", ".join(pending))
                break
            alive = [d for d in pending if not self._written_off(d)]
            if not alive and len(got) >= self.cfg.min_updates:
                log.warning("round %d: closing without lost device(s) %s", r, ", ".join(pending))
                break
            if self.stop_requested:
                raise CoordinatorError(f"stopped during round {r}; start again to resume it")
            if time.time() >= deadline:
                if len(got) >= self.cfg.min_updates:
                    deadline_hit = True
                    log.warning("round %d: deadline reached; closing without %s", r, ", ".join(pending))
                    break
                if extensions >= self.cfg.max_deadline_extensions:
                    self.store.set_round_status(r, "failed", {"reason": "too few updates by the deadline"})
                    raise CoordinatorError(f"round {r}: only {len(got)} of {self.cfg.min_updates} required updates "
                                           f"after {extensions + 1} deadlines; check the devices' logs")
                extensions += 1
                deadline = time.time() + self.cfg.deadline_s
                log.warning("round %d: %d of %d required updates at the deadline; extending it by %.0fs",
                            r, len(got), self.cfg.min_updates, self.cfg.deadline_s)
        rules = self._make_rules(r, self._known_devices())
        new, summary = aggregate_round(self.store, rules, self.strategy, g)
        result: dict[str, Any] = {"round": r, "selected": selected, "missing": pending, "deadline_hit": deadline_hit,
                                  "accepted": len(summary["devices"]), "rejected": dict(self.stats.rejected),
                                  "duplicates": self.stats.duplicates, **summary}
        if "plan" in rec.config:  # LoLa DEFT: the allocator's prediction next to what happened
            measured = {u.device: round(u.received - rec.started, 3) for u in self.store.updates(r, with_payload=False)}
            result["allocation"] = {**rec.config["plan"], "measured_latency_s": max(measured.values(), default=None),
                                    "measured_device_latency_s": measured}
            log.info("round %d: predicted latency %.2fs (%s), measured %.2fs", r, rec.config["plan"]["round_latency_s"],
                     rec.config["plan"]["method"], result["allocation"]["measured_latency_s"] or float("nan"))
        if self.cfg.eval_data is not None:
            ev = self._evaluate(new)
            result.update(accuracy=ev["accuracy"], eval_loss=ev["loss"], eval_s=ev["eval_s"])
            if self._bundle_evaluator is not None:
                result["bundle_accuracy"] = self._bundle_evaluator.evaluate(new)["accuracy"]
        # publish before committing: a crash in between re-aggregates the same updates to the same tensors
        self._publish_global(r, new)
        result.update(bytes_up=self.stats.bytes_up, bytes_down=self.stats.bytes_down,
                      wall_s=round(time.time() - rec.started, 3))
        state = self.strategy.state_dict()
        self.store.commit_aggregate(r, new, result=result, strategy_state=tensors_to_bytes(state) if state else None)
        self._round = None
        log.info("round %d closed: %d update(s)%s", r, result["accepted"],
                 f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else "")
        self.on_event({"event": "round_closed", **result})
        return result

    def _plan(self, online: list[str]) -> dict[str, Any]:
        """Run the allocator for this round: who trains which blocks, with which variant bundle."""
        devices = [d for d in self.store.devices() if d.id in online]
        plan, variants = self._planner.plan(devices)
        busy = [d.id for d in plan.devices if not d.idle]
        if plan.idle:
            log.info("plan: %s idle this round (more devices than blocks)", ", ".join(plan.idle))
        return {"selected": busy,
                "variants": {d: str(b.root) for d, b in variants.items()},
                "blocks": {d.id: d.blocks for d in plan.devices if not d.idle},
                "plan": {"method": plan.method, "round_latency_s": plan.round_latency_s, "cost_source": plan.cost_source,
                         "idle": plan.idle, "notes": plan.notes,
                         "devices": {d.id: {"blocks": d.blocks, "layers": d.layers, "bandwidth_hz": d.bandwidth_hz,
                                            "predicted_latency_s": d.predicted_latency_s, "board": d.board}
                                     for d in plan.devices}}}

    def _evaluate(self, tensors: dict[str, np.ndarray]) -> dict:
        from edge_broker.coordinator.evaluation import BundleEvaluator, FullModelEvaluator

        if self._evaluator is None:
            self._evaluator = FullModelEvaluator(self.bundle, self.cfg.eval_data, self.cfg.model)
            if self.cfg.eval_bundle:
                self._bundle_evaluator = BundleEvaluator(self.bundle, self.cfg.eval_data)
        return self._evaluator.evaluate(tensors)

    def finish(self, report: dict, t0: float) -> dict:
        """Plug the final global state into the full model, write the adapter and the report."""
        last = self.store.load_global()
        out = self.cfg.out_dir
        rounds = sorted(report["rounds"], key=lambda x: x["round"])
        report["rounds"] = rounds
        report["accuracy"] = [x.get("accuracy") for x in rounds]
        report["final_accuracy"] = rounds[-1].get("accuracy") if rounds else None
        report["bytes_up"] = int(sum(x.get("bytes_up", 0) for x in rounds))
        report["bytes_down"] = int(sum(x.get("bytes_down", 0) for x in rounds))
        report["wall_s"] = round(time.time() - t0, 3)
        report["adapter_dir"] = None
        if last is not None and self.manifest.peft.peft_config:
            try:
                if self._evaluator is not None:
                    path = self._evaluator.save_adapter(last[1], out / "adapter")
                else:
                    from export.plugin import load_full_model, plug_in, save_adapter

                    path = save_adapter(plug_in(load_full_model(self.manifest, self.cfg.model), self.manifest,
                                                last[1]), out / "adapter")
                report["adapter_dir"] = str(path)
            except ImportError:
                log.warning("torch/peft are not installed here: no adapter directory written (pip install deftkit[export])")
        out.mkdir(parents=True, exist_ok=True)
        (out / "global.safetensors").write_bytes(tensors_to_bytes(last[1])) if last else None
        path, png = write_report(report, out)
        report["report"] = str(path)
        report["plot"] = str(png) if png else None
        return report

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.store.close()

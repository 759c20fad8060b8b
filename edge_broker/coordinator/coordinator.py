"""The coordinator loop: wait for devices, run the rounds, plug in, report; resume after a restart.

Everything that must survive a crash is in the SQLite store (devices, each round's selection and
deadline, every received update under its idempotency key, each round's global tensors and the
strategy state), and the MQTT session is persistent (QoS 1), so updates sent while the coordinator
was down are delivered when it comes back. A restarted coordinator re-reads the open round,
re-sends tasks only to devices that have not answered, and counts each update once.
Single-threaded on purpose: one loop pulls messages (:mod:`~edge_broker.coordinator.inbox`) and
checks deadlines (:mod:`~edge_broker.coordinator.rounds`), so there is no shared state to lock.

A round here: :meth:`Coordinator.open_round` (select, plan, store the round, publish the global
state), :meth:`~Coordinator.send_tasks`, :meth:`~Coordinator.collect` (until the state machine
closes it), :meth:`~Coordinator.close_round` (aggregate through the update transforms, evaluate,
publish, commit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_runtime.bundle.load import load_bundle
from device_runtime.errors import DeftError, DeviceError
from device_runtime.payload import BYTES_PER_VALUE
from device_runtime.protocol import Envelope, ProtocolError, Task, Topics, to_envelope
from device_runtime.weights import initial_tensors
from edge_broker.aggregation import get_strategy
from edge_broker.channel.step import make_channel
from edge_broker.coordinator.bundle_server import BundleServer
from edge_broker.coordinator.config import CoordinatorConfig, CoordinatorError
from edge_broker.coordinator.evaluation import Evaluations, plug_in_and_report
from edge_broker.coordinator.inbox import Inbox, OpenRound
from edge_broker.coordinator.prompt_pool import PromptPool
from edge_broker.coordinator.registry import Registry
from edge_broker.coordinator.rounds import ClosePolicy, RoundState, RoundStats, Verdict, step
from edge_broker.coordinator.updates import UpdateTransform, aggregate_round
from edge_broker.store import RoundRecord, Store, tensors_from_bytes, tensors_to_bytes

log = logging.getLogger("deft.edge")


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
        self.inbox: Inbox | None = None
        self.stats: RoundStats = RoundStats()
        self._global_env: Envelope | None = None
        self.stop_requested = False
        #: called while waiting; a returned message aborts the run (the demo: "a device process died")
        self.watchdog: Callable[[], str | None] | None = None
        #: the seam between "updates received" and "aggregate" (see edge_broker.coordinator.updates)
        self.update_transforms: list[UpdateTransform] = []
        #: what the edge hears of the updates (None: exactly what it received; see edge_broker.channel)
        self.channel = make_channel(cfg.channel.model_copy(update={"digital_bits": 8 * BYTES_PER_VALUE[cfg.encoding]}))
        self.policy = ClosePolicy(min_updates=cfg.min_updates, quorum=cfg.quorum,
                                  max_extensions=cfg.max_deadline_extensions, deadline_s=cfg.deadline_s)
        self._planner = None
        if cfg.allocation is not None:
            from edge_broker.coordinator.block_plan import BlockPlanner

            steps = int(cfg.hyperparams.get("steps") or cfg.plan_steps)
            self._planner = BlockPlanner(self.bundle, cfg.workdir / "variants", cfg.allocation, cfg.cost_table,
                                         cfg.total_bandwidth, steps, BYTES_PER_VALUE[cfg.encoding])
        self._controller = None
        if cfg.controller is not None:
            from edge_broker.controller.serve import RoundController

            try:
                self._controller = RoundController(cfg.controller, self.bundle, cfg.controller_variants)
            except DeftError as exc:
                raise CoordinatorError(str(exc)) from None
        self.evaluations = (Evaluations(self.bundle, cfg.eval_data, cfg.model, cfg.eval_bundle)
                            if cfg.eval_data is not None else None)

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
        self.inbox = Inbox(self, self.client.subscribe(self.topics.from_devices("#")))
        self.bundles = BundleServer(self.bundle, self.client, self.topics, sender=self.cfg.username)
        self.prompts = PromptPool(self.store, self.client, self.topics, self.bundle, sender=self.cfg.username,
                                  max_bytes=self.cfg.max_prompt_bytes)
        self.prompts.republish()
        self.servers: dict[str, BundleServer] = {self.bundle.hash: self.bundles}

    def send(self, topic: str, env: Envelope, *, fanout: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, env, retain=retain, timeout=60)
        self.stats.bytes_down += env.encoded_size * max(1, fanout)

    def pump(self, timeout: float) -> None:
        """Handle what the devices send for up to ``timeout`` seconds (see :class:`Inbox`)."""
        self.inbox.pump(timeout)

    def last_round(self) -> int | None:
        rec = self.store.latest_round()
        return None if rec is None else rec.round

    # ---- global state ---------------------------------------------------------------------------
    def initial_global(self) -> tuple[int, dict[str, np.ndarray]]:
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
        self.send(self.topics.global_state(), env, fanout=max(1, len(self.registry.online())), retain=True)
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
        g_round, g = self.initial_global()
        self._publish_global(g_round, g)
        report: dict[str, Any] = {"fleet": self.cfg.fleet, "bundle": self.bundle.hash, "strategy": self.cfg.strategy,
                                  "encoding": self.cfg.encoding, "rounds": [r.result for r in self.store.rounds()
                                                                             if r.status == "closed" and r.result]}
        if self.evaluations is not None and self.cfg.eval_initial:
            report["initial_accuracy"] = self._initial_accuracy(g)
            if self._controller is not None:
                self._controller.set_accuracy(report["initial_accuracy"])
            self.on_event({"event": "initial_eval", "accuracy": report["initial_accuracy"]})
        for r in range(1, self.cfg.rounds + 1):
            rec = self.store.round(r)
            if rec is not None and rec.status == "closed":
                continue
            if self.stop_requested:
                break
            result = self.run_round(r)
            report["rounds"] = [x for x in report["rounds"] if x["round"] != r] + [result]
        return plug_in_and_report(report, self.store.load_global(), manifest=self.manifest, model=self.cfg.model,
                                  out=self.cfg.out_dir, evaluations=self.evaluations, t0=t0)

    def _initial_accuracy(self, g: dict[str, np.ndarray]) -> float | None:
        """The accuracy before any round (stored, so a restarted run does not evaluate it again)."""
        init = self.store.get_state("initial_eval")
        if init is not None:
            return float(init.decode())
        first = self.store.load_global(0)
        acc = self.evaluations.evaluate(first[1] if first else g).get("accuracy")
        self.store.put_state("initial_eval", repr(acc).encode())
        return acc

    def run_round(self, r: int) -> dict:
        """One round from its opening (or its resumption after a restart) to its commit."""
        self.stats = RoundStats()
        rec, g_round, g = self.open_round(r)
        self.send_tasks(rec, g_round)
        state, verdict = self.collect(rec)
        return self.close_round(rec, g, state, verdict)

    def open_round(self, r: int) -> tuple[RoundRecord, int, dict[str, np.ndarray]]:
        """Open round ``r`` (select, plan, store it) or re-read it after a restart; publish the global
        state it starts from; tell the inbox which round is open."""
        rec = self.store.round(r)
        g_round, g = self.store.load_global()
        if rec is None:
            # min_devices gates the first round only: later rounds go on with the devices still online
            # (one lost in an earlier round must not stall the run), waiting only below the quorum
            online = self.registry.online()
            selected = self.wait_for_devices() if r == 1 or len(online) < self.cfg.min_updates else online
            config: dict[str, Any] = {"selected": selected, "global_round": g_round}
            if self._planner is not None:
                config.update(self._planner.round_config([d for d in self.store.devices() if d.id in selected]))
            if self._controller is not None:
                config.update(self._controller.round_config(selected, self.cfg.hyperparams))
            rec = self.store.open_round(r, bundle_hash=self.bundle.hash, config=config,
                                        deadline=time.time() + self.cfg.deadline_s)
            log.info("round %d opened with %s (deadline in %.0fs)", r, ", ".join(config["selected"]),
                     self.cfg.deadline_s)
        else:
            log.info("round %d resumed after a restart (%d update(s) already counted)", r, self.store.count_updates(r))
        open_ = OpenRound(r, list(rec.config["selected"]))
        for dev, path in rec.config.get("variants", {}).items():
            b = load_bundle(path)
            open_.variants[dev] = b
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
        self.inbox.open = open_
        self.inbox.reset_rules()
        return rec, g_round, g

    def send_tasks(self, rec: RoundRecord, g_round: int) -> None:
        """Each selected device's task; sent to those that have not answered yet."""
        r, open_ = rec.round, self.inbox.open
        blocks, hyper = rec.config.get("blocks", {}), rec.config.get("hyperparams", {})
        names = rec.config.get("tensor_names", {})
        for d in open_.selected:
            bundle_hash = open_.variants[d].hash if d in open_.variants else self.bundle.hash
            task = Task(round=r, bundle_hash=bundle_hash, global_round=g_round,
                        global_sha256=self._global_env.header.sha256, hyperparams=hyper.get(d, self.cfg.hyperparams),
                        encoding=self.cfg.encoding, delta=self.cfg.delta, deadline_ts=rec.deadline,
                        trainable_blocks=blocks.get(d), tensor_names=names.get(d))
            open_.tasks[d] = to_envelope(task, sender=self.cfg.username, fleet=self.cfg.fleet, round=r)
        # all tasks back to back, one wait for the broker's acknowledgements (not a round trip per device)
        sends = [(self.topics.task_for(d, r), open_.tasks[d]) for d in open_.selected
                 if not self.store.has_update(r, d)]
        self.client.publish_many(sends, timeout=60)
        self.stats.bytes_down += sum(env.encoded_size for _, env in sends)
        self.on_event({"event": "round_open", "round": r, "devices": open_.selected})

    def collect(self, rec: RoundRecord) -> tuple[RoundState, Verdict]:
        """Pump messages until the round state machine closes the round (or it fails)."""
        r = rec.round
        state = RoundState(r, tuple(self.inbox.open.selected), rec.deadline or (time.time() + self.cfg.deadline_s))
        while True:
            self.pump(0.2)
            got = {u.device for u in self.store.updates(r, with_payload=False)}
            lost = {d for d in state.selected if d not in got and self.inbox.believes_lost(d)}
            state, verdict = step(state, self.policy, got, lost, time.time())
            if verdict in (Verdict.ALL_IN, Verdict.QUORUM, Verdict.LOST):
                break
            if self.stop_requested:
                raise CoordinatorError(f"stopped during round {r}; start again to resume it")
            if verdict is Verdict.DEADLINE:
                break
            if verdict is Verdict.FAIL:
                self.store.set_round_status(r, "failed", {"reason": "too few updates by the deadline"})
                raise CoordinatorError(f"round {r}: only {len(got)} of {self.cfg.min_updates} required updates "
                                       f"after {state.extensions + 1} deadlines; check the devices' logs")
            if verdict is Verdict.EXTEND:
                log.warning("round %d: %d of %d required updates at the deadline; extending it by %.0fs",
                            r, len(got), self.cfg.min_updates, self.cfg.deadline_s)
        pending = ", ".join(state.pending)
        if verdict is Verdict.QUORUM:
            log.info("round %d: quorum of %d updates reached; closing without %s", r, self.cfg.quorum, pending)
        elif verdict is Verdict.LOST:
            log.warning("round %d: closing without lost device(s) %s", r, pending)
        elif verdict is Verdict.DEADLINE:
            log.warning("round %d: deadline reached; closing without %s", r, pending)
        return state, verdict

    def close_round(self, rec: RoundRecord, g: dict[str, np.ndarray], state: RoundState, verdict: Verdict) -> dict:
        """Aggregate, evaluate, publish the new global state, commit; the round's result."""
        r = rec.round
        rules = self.inbox.rules(r, self.registry.registered())
        transforms = list(self.update_transforms)
        if rec.config.get("tensor_names"):  # emulator variants: their updates back in the global names
            from edge_broker.controller.variants import rename_updates

            transforms.insert(0, lambda ups: rename_updates(ups, rec.config["tensor_names"]))
        new, summary = aggregate_round(self.store, rules, self.strategy, g, transforms, self.channel)
        result: dict[str, Any] = {"round": r, "selected": list(state.selected), "missing": state.pending,
                                  "deadline_hit": verdict is Verdict.DEADLINE, "accepted": len(summary["devices"]),
                                  "rejected": dict(self.stats.rejected), "duplicates": self.stats.duplicates,
                                  **summary}
        if "plan" in rec.config:
            result["allocation"] = self._measured_allocation(rec)
        if self.evaluations is not None:
            result.update(self.evaluations.round_result(new))
        if "controller" in rec.config:
            result["controller"] = self._controller_report(rec)
            if self._controller is not None:
                self._controller.observe(result.get("accuracy"))
        # publish before committing: a crash in between re-aggregates the same updates to the same tensors
        self._publish_global(r, new)
        result.update(bytes_up=self.stats.bytes_up, bytes_down=self.stats.bytes_down,
                      wall_s=round(time.time() - rec.started, 3))
        state_dict = self.strategy.state_dict()
        self.store.commit_aggregate(r, new, result=result,
                                    strategy_state=tensors_to_bytes(state_dict) if state_dict else None)
        self.inbox.open = None
        log.info("round %d closed: %d update(s)%s", r, result["accepted"],
                 f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else "")
        self.on_event({"event": "round_closed", **result})
        return result

    def _measured_allocation(self, rec: RoundRecord) -> dict[str, Any]:
        """LoLa DEFT: the allocator's predicted latency next to the measured one."""
        plan = rec.config["plan"]
        measured = {u.device: round(u.received - rec.started, 3)
                    for u in self.store.updates(rec.round, with_payload=False)}
        out = {**plan, "measured_latency_s": max(measured.values(), default=None),
               "measured_device_latency_s": measured}
        log.info("round %d: predicted latency %.2fs (%s), measured %.2fs", rec.round, plan["round_latency_s"],
                 plan["method"], out["measured_latency_s"] or float("nan"))
        return out

    def _controller_report(self, rec: RoundRecord) -> dict[str, Any]:
        """The controller's choices next to what happened: each device's time and peak RSS vs its budget."""
        out = dict(rec.config["controller"])
        choices = {d: dict(c) for d, c in out.get("choices", {}).items()}
        for u in self.store.updates(rec.round, with_payload=False):
            c = choices.get(u.device)
            if c is None:
                continue
            rss = (u.meta.get("metrics") or {}).get("peak_rss_mb")
            c.update(measured_s=round(u.received - rec.started, 2), peak_rss_mb=rss,
                     within_budget=None if rss is None else rss <= c["memory_budget_mb"])
        out["choices"] = choices
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.store.close()

"""One round's rules: which updates count (validation -> store, once per key) and how they combine.

Kept apart from the message loop so the same functions serve the live coordinator, a restarted one
(which re-reads the round's stored updates) and tests.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.protocol import Envelope
from edge_broker.aggregation import ClientUpdate, Strategy
from edge_broker.store import AddResult, NewUpdate, Store
from edge_broker.validation import RejectReason, UpdateRules, validate_payload

log = logging.getLogger("deft.edge")


@dataclass
class Outcome:
    """What happened to one received update, and what to acknowledge to its sender."""

    accepted: bool
    reason: str | None
    counted: bool  # True only the first time an update is stored


@dataclass
class RoundStats:
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def make_rules(manifest: Manifest, bundle_hash: str, round: int, devices: list[str], max_bytes: int) -> UpdateRules:
    return UpdateRules(devices=set(devices), round=round, bundle_hash=bundle_hash, specs=manifest.trainable,
                       max_bytes=max_bytes)


def ingest(store: Store, rules: UpdateRules, env: Envelope, *, sender: str, topic_round: int | None) -> Outcome:
    """Validate one update and store it once under its idempotency key (a rejected one is stored too,
    with its reason, so the report can say what was refused and why)."""
    return ingest_many(store, rules, [(env, sender, topic_round)])[0]


def ingest_many(store: Store, rules: UpdateRules, received: list[tuple[Envelope, str, int | None]]) -> list[Outcome]:
    """:func:`ingest` for updates that arrived together ((envelope, sender, topic round) each): validated
    one by one, stored in ONE transaction (one fsync for the lot), an outcome each, in order. The caller
    acknowledges only after this returns, so an ack never precedes its update's commit."""
    rows: list[NewUpdate] = []
    rejections = []
    for env, sender, topic_round in received:
        checked, rej = validate_payload(rules, env.body, sender=sender, round=topic_round)
        rejections.append(rej)
        if rej is not None:
            round_ = topic_round if topic_round is not None else rules.round
            rows.append(NewUpdate(env.header.key, round_, sender, 0, None, accepted=False, reason=rej.reason.value,
                                  meta={"detail": rej.detail}))
        else:
            assert checked is not None
            rows.append(NewUpdate(env.header.key, checked.round, sender, checked.samples, env.body,
                                  meta={"metrics": checked.metrics, "bytes": len(env.body)}))
    results = store.add_updates(rows) if rows else []
    return [_outcome(store, row, rej, res) for row, rej, res in zip(rows, rejections, results)]


def _outcome(store: Store, row: NewUpdate, rej, res: AddResult) -> Outcome:
    """What storing one update meant, and what to acknowledge."""
    if rej is not None:
        if res == "duplicate_key":
            return Outcome(store.has_update(row.round, row.device), "duplicate", False)
        log.warning("rejected update %s from %s: %s", row.key, row.device, rej)
        return Outcome(False, str(rej), False)
    if res == "stored":
        log.info("round %d: update from %s accepted (%d samples, %d bytes)", row.round, row.device, row.samples,
                 len(row.payload or b""))
        return Outcome(True, None, True)
    if res == "duplicate_key":  # a QoS 1 redelivery or a replay: acknowledged, not counted again
        return Outcome(store.has_update(row.round, row.device), "duplicate", False)
    reason = (f"{RejectReason.DEVICE_MISMATCH.value}: device {row.device} already has an update counted in "
              f"round {row.round}")
    log.warning("rejected a second update from %s in round %d", row.device, row.round)
    return Outcome(False, reason, False)


def aggregate_round(store: Store, rules: UpdateRules, strategy: Strategy,
                    global_tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """The new global tensors from every update counted in the round, and a summary of them."""
    t0 = time.perf_counter()
    ups: list[ClientUpdate] = []
    losses = []
    for u in store.updates(rules.round):
        checked, rej = validate_payload(rules, u.payload or b"", sender=u.device, round=rules.round)
        if rej is not None:  # cannot happen for a stored accepted update unless the DB was edited
            log.error("stored update %s of %s no longer validates (%s); leaving it out", u.key, u.device, rej)
            continue
        ups.append(ClientUpdate(u.device, checked.tensors, checked.samples, is_delta=checked.is_delta))
        if "final_train_loss" in checked.metrics:
            losses.append(float(checked.metrics["final_train_loss"]))
    if all(set(u.tensors) == set(global_tensors) for u in ups):
        new = strategy.aggregate(global_tensors, ups)
        rep = strategy.report
        weights, norms, clipped = rep.weights, rep.delta_norms, list(rep.clipped)
    else:
        new, clipped = aggregate_by_tensor(strategy, global_tensors, ups)
        weights, norms = [], []
    summary = {
        "devices": [u.device for u in ups],
        "samples": int(sum(u.samples for u in ups)),
        "weights": [round(float(w), 4) for w in weights],
        "delta_norms": [round(float(n), 5) for n in norms],
        "clipped": clipped,
        "mean_final_train_loss": float(np.mean(losses)) if losses else None,
        "aggregation_s": round(time.perf_counter() - t0, 4),
    }
    return new, summary


def aggregate_by_tensor(strategy: Strategy, global_tensors: Mapping[str, np.ndarray], ups: list[ClientUpdate]
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Aggregate where devices trained different blocks (LoLa DEFT): each tensor over the devices that
    sent it; a tensor nobody trained keeps its global value."""
    new = {k: np.asarray(v) for k, v in global_tensors.items()}
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in global_tensors:
        owners = tuple(u.device for u in ups if name in u.tensors)
        if owners:
            groups.setdefault(owners, []).append(name)
    clipped: set[str] = set()
    for owners, names in groups.items():
        sub = [ClientUpdate(u.device, {n: u.tensors[n] for n in names}, u.samples, is_delta=u.is_delta)
               for u in ups if u.device in owners]
        new.update(strategy.aggregate({n: global_tensors[n] for n in names}, sub))
        clipped.update(strategy.report.clipped)
    return new, sorted(clipped)

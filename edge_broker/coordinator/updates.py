"""What happens to a round's updates: in (validate, store once per key) and out (transform, aggregate).

Kept apart from the message loop so the same functions serve the live coordinator, a restarted one
(which re-reads the round's stored updates) and tests.

**The seam between "updates received" and "aggregate".** :func:`aggregate_round` reads the round's
counted updates from the store, passes them through ``transforms`` (each a
:data:`UpdateTransform`: ``list[ClientUpdate] -> list[ClientUpdate]``, applied in order) and only
then hands them to the strategy. The identity (no transforms) is today's behaviour. This is where an
over-the-air channel simulator (noise, fading and lost updates on the uplink) and a prompt pool
(keep the received soft prompts, aggregate only some tensors) plug in, without touching the
intake, the state machine or the strategies: the coordinator passes ``Coordinator.update_transforms``.
After them, ``channel`` (an :data:`edge_broker.channel.step.Channel`, e.g. over-the-air aggregation)
turns what the devices sent into what the edge hears; it needs the global tensors and the round, and
returns a report that lands in the round's summary under ``"channel"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.protocol import Envelope
from edge_broker.aggregation import ClientUpdate, Strategy
from edge_broker.channel.step import Channel
from edge_broker.store import AddResult, NewUpdate, Store
from edge_broker.validation import RejectReason, UpdateRules, validate_payload

log = logging.getLogger("deft.edge")

#: turns the round's received updates into the ones that are aggregated (see the module docstring)
UpdateTransform = Callable[[list[ClientUpdate]], list[ClientUpdate]]


@dataclass
class Outcome:
    """What happened to one received update, and what to acknowledge to its sender."""

    accepted: bool
    reason: str | None
    counted: bool  # True only the first time an update is stored


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
    return [_outcome(store, row, rej, res) for row, rej, res in zip(rows, rejections, results, strict=True)]


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


def received_updates(store: Store, rules: UpdateRules) -> tuple[list[ClientUpdate], list[float]]:
    """Every update counted in the round, re-validated from the store, and their final train losses."""
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
    return ups, losses


def aggregate_round(store: Store, rules: UpdateRules, strategy: Strategy, global_tensors: Mapping[str, np.ndarray],
                    transforms: Sequence[UpdateTransform] = (), channel: Channel | None = None
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """The new global tensors from every update counted in the round (after ``transforms`` and
    ``channel``, the seam described in the module docstring), and a summary of them."""
    t0 = time.perf_counter()
    ups, losses = received_updates(store, rules)
    for transform in transforms:
        ups = transform(ups)
    heard = None
    if channel is not None:
        ups, heard = channel(ups, global_tensors, rules.round)
    if all(set(u.tensors) == set(global_tensors) for u in ups):
        new, rep = strategy.aggregate(global_tensors, ups)
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
    if heard is not None:
        summary["channel"] = heard
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
        tensors, rep = strategy.aggregate({n: global_tensors[n] for n in names}, sub)
        new.update(tensors)
        clipped.update(rep.clipped)
    return new, sorted(clipped)

"""The round state machine: when a round closes, waits, gets more time, or fails. Pure functions.

A round is open from its tasks until :func:`step` says it closes. Each turn of the coordinator's
loop feeds :func:`step` what it observed (who has answered, whom it may write off as lost, the
time) and gets back the round's next state and a :class:`Verdict`; it does no I/O and reads no
clock, so every close rule is testable on its own (``tests/test_round_state.py``). The loop that
drives it, sends the tasks and acts on the verdicts is :meth:`Coordinator.collect
<edge_broker.coordinator.coordinator.Coordinator.collect>`.

The close rules, in order: every selected device answered (``ALL_IN``); ``quorum`` updates are in
(``QUORUM``, stragglers are not waited for); everyone still pending is written off as lost and at
least ``min_updates`` are in (``LOST``); at the deadline with ``min_updates`` (``DEADLINE``). A
round with too few updates at the deadline gets it extended (``EXTEND``) up to
``max_extensions`` times, then fails (``FAIL``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Verdict(StrEnum):
    WAIT = "wait"
    ALL_IN = "all_in"
    QUORUM = "quorum"
    LOST = "lost"
    DEADLINE = "deadline"
    EXTEND = "extend"
    FAIL = "fail"

    @property
    def closes(self) -> bool:
        """The round closes and its updates are aggregated."""
        return self in (Verdict.ALL_IN, Verdict.QUORUM, Verdict.LOST, Verdict.DEADLINE)


@dataclass(frozen=True)
class ClosePolicy:
    """When a round may close (from :class:`~edge_broker.coordinator.config.CoordinatorConfig`)."""

    min_updates: int
    quorum: int | None
    max_extensions: int
    deadline_s: float


@dataclass(frozen=True)
class RoundState:
    """One open round as the state machine sees it."""

    round: int
    selected: tuple[str, ...]
    deadline: float
    extensions: int = 0
    received: frozenset[str] = frozenset()

    @property
    def pending(self) -> list[str]:
        """Selected devices that have not answered, in selection order."""
        return [d for d in self.selected if d not in self.received]


def verdict(state: RoundState, policy: ClosePolicy, written_off: Collection[str], now: float) -> Verdict:
    """Whether the round closes now, waits, gets more time or fails (see the module's rules)."""
    got, pending = len(state.received), state.pending
    if not pending:
        return Verdict.ALL_IN
    if policy.quorum is not None and got >= policy.quorum:
        return Verdict.QUORUM
    if all(d in written_off for d in pending) and got >= policy.min_updates:
        return Verdict.LOST
    if now < state.deadline:
        return Verdict.WAIT
    if got >= policy.min_updates:
        return Verdict.DEADLINE
    return Verdict.FAIL if state.extensions >= policy.max_extensions else Verdict.EXTEND


def step(state: RoundState, policy: ClosePolicy, received: Collection[str], written_off: Collection[str],
         now: float) -> tuple[RoundState, Verdict]:
    """The round's next state and verdict after observing ``received`` (the devices with a counted
    update) at ``now``; an ``EXTEND`` moves the deadline to ``now + deadline_s``."""
    state = replace(state, received=frozenset(received))
    v = verdict(state, policy, written_off, now)
    if v is Verdict.EXTEND:
        state = replace(state, deadline=now + policy.deadline_s, extensions=state.extensions + 1)
    return state, v


@dataclass
class RoundStats:
    """What the edge counted during one round (for its result in the report)."""

    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

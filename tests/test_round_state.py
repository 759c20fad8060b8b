"""The round state machine's close rules, as pure functions: no broker, no store, no clock."""

from __future__ import annotations

from edge_broker.coordinator.rounds import ClosePolicy, RoundState, Verdict, step

POLICY = ClosePolicy(min_updates=2, quorum=None, max_extensions=1, deadline_s=60.0)
OPEN = RoundState(1, ("a", "b", "c"), deadline=100.0)


def test_waits_until_every_selected_device_answered():
    s, v = step(OPEN, POLICY, {"a", "b"}, set(), now=10.0)
    assert v is Verdict.WAIT and s.pending == ["c"]
    s, v = step(s, POLICY, {"a", "b", "c"}, set(), now=11.0)
    assert v is Verdict.ALL_IN and v.closes and s.pending == []


def test_quorum_closes_without_stragglers():
    policy = ClosePolicy(min_updates=1, quorum=2, max_extensions=0, deadline_s=60.0)
    assert step(OPEN, policy, {"a"}, set(), now=0.0)[1] is Verdict.WAIT
    assert step(OPEN, policy, {"a", "c"}, set(), now=0.0)[1] is Verdict.QUORUM


def test_lost_devices_are_not_waited_for_once_enough_updates_are_in():
    assert step(OPEN, POLICY, {"a", "b"}, {"c"}, now=0.0)[1] is Verdict.LOST
    # too few updates: the round waits for its deadline even if the rest are lost
    assert step(OPEN, POLICY, {"a"}, {"b", "c"}, now=0.0)[1] is Verdict.WAIT


def test_deadline_closes_extends_then_fails():
    assert step(OPEN, POLICY, {"a", "b"}, set(), now=100.0)[1] is Verdict.DEADLINE
    s, v = step(OPEN, POLICY, {"a"}, set(), now=100.0)
    assert v is Verdict.EXTEND and (s.deadline, s.extensions) == (160.0, 1)
    assert step(s, POLICY, {"a"}, set(), now=120.0)[1] is Verdict.WAIT
    s, v = step(s, POLICY, {"a"}, set(), now=160.0)
    assert v is Verdict.FAIL and not v.closes

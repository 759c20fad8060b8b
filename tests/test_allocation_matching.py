"""The two feasibility checks agree: nested-prefix Hall condition vs exact Hopcroft-Karp matching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_broker.allocation.crunch import bottleneck_matching
from edge_broker.allocation.matching import (
    covering_matching,
    hall_prefix,
    match_general,
    match_prefix,
    prefix_lengths,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.integers(1, 8).flatmap(
        lambda d: st.tuples(
            st.just(d),
            st.lists(st.integers(0, d), min_size=1, max_size=9),
            st.lists(st.integers(1, 3), min_size=9, max_size=9),
        )
    )
)
def test_hall_prefix_agrees_with_hopcroft_karp(args) -> None:
    d, lengths, caps = args
    lengths = np.array(lengths)
    cap = np.array(caps[: len(lengths)])
    allowed = np.arange(d)[None, :] < lengths[:, None]
    got_lengths, prefix = prefix_lengths(allowed)
    assert prefix and np.array_equal(got_lengths, lengths)
    hall = hall_prefix(lengths, cap, d)
    exact = match_general(allowed, cap)
    assert hall == (exact is not None)
    if hall:
        match = match_prefix(lengths, cap, d)
        assert all(allowed[match[j], j] for j in range(d))  # only allowed pairs
        assert all(np.sum(match == k) <= cap[k] for k in range(len(cap)))  # capacities respected


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 7), st.data())
def test_bottleneck_matching_is_the_least_feasible_threshold(d: int, n: int, data) -> None:
    """Arbitrary (non-monotone) latency matrices: no smaller candidate admits a covering matching."""
    t = np.array(
        data.draw(
            st.lists(
                st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0, np.inf]), min_size=d, max_size=d),
                min_size=n,
                max_size=n,
            )
        )
    )
    cap = np.array(data.draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    found = bottleneck_matching(t, cap)
    if found is None:
        assert covering_matching(np.isfinite(t), cap) is None
        return
    tau, match = found
    assert max(t[match[j], j] for j in range(d)) == tau
    assert all(np.sum(match == k) <= cap[k] for k in range(n))
    below = t[t < tau]
    if below.size:
        assert covering_matching(t <= below.max(), cap) is None

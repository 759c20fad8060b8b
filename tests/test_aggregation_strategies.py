"""Aggregation strategies: exact maths on small cases, robustness to one bad device in five, FedAdam state."""

from __future__ import annotations

import numpy as np
import pytest

from edge_broker.aggregation import AggregationError, ClientUpdate, available, get_strategy

SHAPES = {"layer.0.lora_A": (8, 32), "layer.0.lora_B": (32, 8), "classifier.weight": (2, 32)}


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _honest(n: int, seed: int = 1) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """n honest deltas around a shared direction, and their plain mean."""
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(size=s) * 0.1 for k, s in SHAPES.items()}
    deltas = [{k: direction[k] + rng.normal(size=s) * 0.01 for k, s in SHAPES.items()} for _ in range(n)]
    mean = {k: np.mean([d[k] for d in deltas], axis=0) for k in SHAPES}
    return deltas, mean


def _dist(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in a)))


def test_registry_names_and_unknown_name_error():
    assert available() == ["fedadam", "fedavg", "median", "trimmed_mean"]
    with pytest.raises(AggregationError, match="unknown aggregation strategy 'krum'.*fedavg"):
        get_strategy("krum")
    with pytest.raises(AggregationError, match="bad parameters for 'median'"):
        get_strategy("median", trim=0.1)
    with pytest.raises(AggregationError, match=r"trim must be in \[0, 0.5\)"):
        get_strategy("trimmed_mean", trim=0.5)


def test_fedavg_is_sample_weighted_and_full_equals_delta():
    g = _global()
    a = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    b = {k: np.full(s, 4.0, np.float32) for k, s in SHAPES.items()}
    ups = [ClientUpdate("a", a, samples=300), ClientUpdate("b", b, samples=100)]
    out = get_strategy("fedavg").aggregate(g, ups)[0]
    for k in SHAPES:
        np.testing.assert_allclose(out[k], g[k] + (0.75 * 1 + 0.25 * 4), rtol=1e-6)
        assert out[k].dtype == np.float32
    # the same updates sent as full tensors give the same global state
    full = [ClientUpdate(u.device, {k: g[k] + u.tensors[k] for k in SHAPES}, u.samples, is_delta=False) for u in ups]
    out_full = get_strategy("fedavg").aggregate(g, full)[0]
    for k in SHAPES:
        np.testing.assert_allclose(out_full[k], out[k], atol=1e-5)


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_one_bad_device_in_five_moves_fedavg_but_not_median_or_trimmed_mean(attack):
    g = _global()
    deltas, honest_mean_of_4 = _honest(4)
    bad = {k: (50.0 if attack == "scaled" else -10.0) * deltas[0][k] for k in SHAPES}
    ups = [ClientUpdate(f"d{i}", d, samples=100) for i, d in enumerate(deltas)] + [ClientUpdate("evil", bad, 100)]
    target = {k: g[k] + honest_mean_of_4[k] for k in SHAPES}
    honest_step = _dist({k: honest_mean_of_4[k] for k in SHAPES}, {k: np.zeros(s) for k, s in SHAPES.items()})
    err = {name: _dist(get_strategy(name).aggregate(g, ups)[0], target) for name in ("fedavg", "median",
                                                                                     "trimmed_mean")}
    assert err["fedavg"] > 1.5 * honest_step, err  # FedAvg is dragged further than the honest step itself
    for robust in ("median", "trimmed_mean"):
        assert err[robust] < 0.1 * honest_step, err  # within the honest devices' noise
        assert err[robust] < err["fedavg"] / 20


def test_clipping_bounds_one_device_for_fedavg():
    g = _global()
    deltas, mean4 = _honest(4)
    bad = {k: 50.0 * deltas[0][k] for k in SHAPES}
    ups = [ClientUpdate(f"d{i}", d, 100) for i, d in enumerate(deltas)] + [ClientUpdate("evil", bad, 100)]
    honest_norm = max(np.sqrt(sum(np.sum(d[k] ** 2) for k in SHAPES)) for d in deltas)
    target = {k: g[k] + mean4[k] for k in SHAPES}
    plain = get_strategy("fedavg")
    clipped = get_strategy("fedavg", clip_norm=float(honest_norm))
    e_plain = _dist(plain.aggregate(g, ups)[0], target)
    new, report = clipped.aggregate(g, ups)
    e_clip = _dist(new, target)
    assert report.clipped == ["evil"] and report.devices[-1] == "evil"  # returned, not kept on the strategy
    assert e_clip < e_plain / 10


def test_median_and_trimmed_mean_exact_on_small_case():
    g = {"w": np.zeros((3,), np.float32)}
    vals = [[1, 10, -1], [2, 20, -2], [3, 30, -3], [4, 40, -4], [100, -100, 100]]
    ups = [ClientUpdate(f"d{i}", {"w": np.array(v, np.float32)}, samples=1 + i) for i, v in enumerate(vals)]
    np.testing.assert_allclose(get_strategy("median").aggregate(g, ups)[0]["w"], [3, 20, -2])
    # trim 0.2 of 5 = 1 per side per coordinate: mean of the middle three
    np.testing.assert_allclose(get_strategy("trimmed_mean", trim=0.2).aggregate(g, ups)[0]["w"], [3, 20, -2])
    np.testing.assert_allclose(get_strategy("trimmed_mean", trim=0.0).aggregate(g, ups)[0]["w"], [22, 0, 18])


def test_fedadam_matches_hand_computed_steps_and_resumes_from_state():
    g = {"w": np.array([1.0, -1.0], np.float32)}
    d1 = ClientUpdate("a", {"w": np.array([0.2, -0.4])}, 1)
    d2 = ClientUpdate("a", {"w": np.array([0.1, 0.1])}, 1)
    s = get_strategy("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x1 = s.aggregate(g, [d1])[0]
    m = 0.1 * np.array([0.2, -0.4])
    v = 0.01 * np.array([0.2, -0.4]) ** 2
    np.testing.assert_allclose(x1["w"], g["w"] + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    # a coordinator restarted between rounds continues the same optimiser from the saved state
    resumed = get_strategy("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    resumed.load_state_dict(s.state_dict())
    x2_a, x2_b = s.aggregate(x1, [d2])[0], resumed.aggregate(x1, [d2])[0]
    np.testing.assert_array_equal(x2_a["w"], x2_b["w"])
    fresh = get_strategy("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3).aggregate(x1, [d2])[0]
    assert not np.allclose(fresh["w"], x2_a["w"])  # the state mattered
    assert resumed.state_dict()["step"][0] == 2


def test_inconsistent_updates_are_named():
    g = _global()
    ok = {k: np.zeros(s) for k, s in SHAPES.items()}
    missing = dict(ok)
    missing.pop("classifier.weight")
    with pytest.raises(AggregationError, match="update from x does not match.*classifier.weight"):
        get_strategy("fedavg").aggregate(g, [ClientUpdate("x", missing, 1)])[0]
    wrong = dict(ok, **{"classifier.weight": np.zeros((3, 32))})
    with pytest.raises(AggregationError, match=r"shape \(3, 32\)"):
        get_strategy("median").aggregate(g, [ClientUpdate("y", wrong, 1)])[0]
    with pytest.raises(AggregationError, match="no updates"):
        get_strategy("fedavg").aggregate(g, [])[0]
    with pytest.raises(AggregationError, match="samples > 0"):
        get_strategy("fedavg").aggregate(g, [ClientUpdate("z", ok, 0)])[0]


def test_shared_maths_are_pure_functions():
    from edge_broker.aggregation.aggregate import clip_deltas, median, trimmed_mean, weighted_mean

    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([3.0, 4.0])}, {"w": np.array([100.0, -100.0])}]
    np.testing.assert_allclose(weighted_mean(deltas[:2], np.array([0.75, 0.25]))["w"], [1.5, 1.0])
    np.testing.assert_allclose(median(deltas)["w"], [3.0, 0.0])
    np.testing.assert_allclose(trimmed_mean(deltas, 0.34)["w"], [3.0, 0.0])
    clipped, idx = clip_deltas(deltas, 5.0)
    assert idx == [2] and np.isclose(np.linalg.norm(clipped[2]["w"]), 5.0)
    assert deltas[2]["w"][0] == 100.0  # the input is left as it was

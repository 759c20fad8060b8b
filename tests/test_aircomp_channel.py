"""Over-the-air aggregation (edge_broker/channel): the channel maths against its closed forms, the channel
step against FedAvg, reproducibility, the CLI's refusals, and one real round through the channel."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_broker.aggregation import ClientUpdate, get_strategy
from edge_broker.channel import aircomp as ac
from edge_broker.channel.config import ChannelConfig
from edge_broker.channel.step import AirCompChannel, device_distance

CELL, ALPHA = 100.0, 3.0


def _air(k: int, snr_db: float, g_th: float, values: int = 100_000, seed: int = 0):
    """i.i.d. unit-variance values sent once over the air; (values, estimate, survivors' mean, reception)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, values))
    sym = ac.pack(x)
    rho0 = ac.power_scaling(ac.power_limit(10 ** (snr_db / 10), CELL, ALPHA), CELL, ALPHA, g_th)
    rec = ac.transmit(sym, ac.draw_fading(rng, sym.shape), ac.draw_distances(rng, k, 10.0, CELL), rho0=rho0,
                      g_th=g_th, alpha=ALPHA, rng=rng)
    return (x, ac.unpack(ac.estimate(rec.y, rec.active, rho0), values), ac.unpack(ac.survivor_mean(sym, rec.active),
                                                                                   values), rec, rho0)


@pytest.mark.parametrize("k, snr_db, g_th", [(2, 0.0, 0.05), (4, 10.0, 0.1), (4, 30.0, 0.1), (10, 5.0, 0.5),
                                             (20, 20.0, 1.0)])
def test_monte_carlo_mse_matches_the_closed_forms_within_5_percent(k, snr_db, g_th):
    x, x_hat, target, rec, rho0 = _air(k, snr_db, g_th)
    rx = ac.receive_snr(10 ** (snr_db / 10), g_th)
    assert rho0 / ac.SIGMA2 == pytest.approx(rx)
    heard = np.repeat(rec.active.sum(axis=0) > 0, 2)
    # the noise against the mean over the transmitting devices: exact for any data
    assert np.mean((x_hat - target)[heard] ** 2) == pytest.approx(ac.noise_mse(k, rx, g_th), rel=0.05)
    # the total against the mean over all K devices: i.i.d. values (truncation error included)
    assert np.mean((x_hat - x.mean(axis=0)) ** 2) == pytest.approx(ac.aggregation_mse(k, rx, g_th), rel=0.05)


@pytest.mark.parametrize("g_th", [0.05, 0.3, 1.0, 2.0])
def test_truncation_rate_is_1_minus_exp_minus_g_th_and_power_stays_within_p0(g_th):
    _, _, _, rec, rho0 = _air(8, 10.0, g_th, values=40_000, seed=1)
    assert abs((1 - rec.active.mean()) - ac.truncation_probability(g_th)) < 0.02
    assert ac.truncation_probability(g_th) == pytest.approx(1 - np.exp(-g_th))
    # inversion at the cell edge would use rho0 R^alpha E1(g_th) = P0 on average; devices nearer use less
    p0 = ac.power_limit(10.0, CELL, ALPHA)
    assert rho0 * CELL**ALPHA * __import__("scipy").special.exp1(g_th) == pytest.approx(p0)


def _updates(samples: list[int], seed: int = 0) -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    rng = np.random.default_rng(seed)
    g = {"lora_A": rng.standard_normal((8, 32)).astype(np.float32),
         "head": (rng.standard_normal(7) * 0.1).astype(np.float32)}
    ups = [ClientUpdate(f"dev{i}", {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32)
                                    for k, v in g.items()}, s) for i, s in enumerate(samples)]
    return g, ups


@pytest.mark.parametrize("samples", [[100, 100, 100, 100], [40, 250, 90]])
def test_at_very_high_snr_the_air_aggregate_is_fedavg(samples):
    """Equal samples: the plain mean of the updates; unequal: the sample-weighted one (weights folded in
    before transmission). Truncation made negligible, since a truncated device really drops out."""
    g, ups = _updates(samples)
    heard, rep = AirCompChannel(ChannelConfig(kind="aircomp", snr_db=150, truncation=1e-9))(ups, g, 1)
    got, _ = get_strategy("fedavg").aggregate(g, heard)
    want, _ = get_strategy("fedavg").aggregate(g, ups)
    for k in g:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
    if len(set(samples)) == 1:
        for k in g:
            np.testing.assert_allclose(got[k], g[k] + np.mean([u.tensors[k] for u in ups], axis=0), atol=1e-4)
    assert rep["truncation_rate"] == 0 and rep["nmse"] < 1e-8 and [u.device for u in heard] == [u.device for u in ups]


def test_the_channel_report_degrades_with_snr_and_the_draws_are_seeded():
    g, ups = _updates([100, 100, 100, 100], seed=3)
    reps = {}
    for snr in (30.0, 0.0):
        ch = AirCompChannel(ChannelConfig(kind="aircomp", snr_db=snr, seed=7))
        a, reps[snr] = ch(ups, g, 2)
        b, again = ch(ups, g, 2)  # a re-aggregation (restart) hears the same
        assert again == reps[snr]
        for k in g:
            np.testing.assert_array_equal(a[0].tensors[k], b[0].tensors[k])
        c, other = ch(ups, g, 3)  # another round: other draws
        assert not np.array_equal(a[0].tensors["lora_A"], c[0].tensors["lora_A"])
    assert reps[0.0]["nmse"] > reps[30.0]["nmse"] > 0
    rep = reps[0.0]
    assert set(rep["truncated"]) == {u.device for u in ups}
    assert rep["air_latency_s"] > 0 and rep["digital_latency_s"] > 0 and rep["max_power_ratio"] <= 1.5
    # a device stays where it is in every round and run with the same seed
    cfg = ChannelConfig(kind="aircomp", seed=7)
    assert device_distance(cfg, "dev1") == device_distance(cfg, "dev1") != device_distance(cfg, "dev2")
    assert 10.0 <= device_distance(cfg, "dev1") <= 100.0


def test_air_latency_stays_flat_while_digital_grows_with_k():
    from edge_broker.channel import digital as dg

    lat = {}
    for k in (2, 8, 32):
        rng = np.random.default_rng(k)
        d = ac.draw_distances(rng, k, 10.0, CELL)
        rates = dg.shannon_rates(dg.device_snrs(100.0, d, CELL, ALPHA), np.abs(ac.draw_fading(rng, (k, 1000))) ** 2,
                                 1e6)
        lat[k] = dg.digital_latency(74_498, 8, rates)
    air = dg.air_latency(74_498, 1000, 1e6)
    assert air == pytest.approx(38 * 1000 / 1e6)  # 37,249 symbols in 38 OFDM symbols of 1 ms
    assert lat[2] < lat[8] < lat[32] and lat[32] / air > 3 * lat[2] / air


@pytest.mark.parametrize("args, msg", [
    (["--channel", "aircomp", "--subchannels", "-4"], "--subchannels"),
    (["--channel", "aircomp", "--truncation", "0"], "--truncation"),
    (["--channel", "aircomp", "--truncation", "-1"], "--truncation"),
    (["--channel", "aircomp", "--cell-radius", "5"], "below cell_radius"),
    (["--channel", "aircomp", "--strategy", "median"], "--strategy fedavg or fedadam"),
    (["--channel", "radio"], "'radio' is not one of"),
])
def test_serve_refuses_bad_channel_input_in_one_line_with_exit_2(tmp_path, args, msg):
    from edge_broker.cli import app

    r = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path / "none"), "--broker", "mqtt://127.0.0.1:1",
                                 "--workdir", str(tmp_path / "edge"), *args])
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    if "not one of" not in msg:
        assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "edge").exists()  # nothing stored


def test_demo_refuses_bad_channel_input_before_starting_anything(tmp_path):
    from edge_broker.demo_cli import demo_command

    app = __import__("typer").Typer()
    app.command()(demo_command)
    r = CliRunner().invoke(app, ["--workdir", str(tmp_path / "demo"), "--channel", "aircomp", "--subchannels", "0"])
    assert r.exit_code == 2 and "--subchannels" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "demo").exists()


@pytest.mark.mosquitto
def test_a_real_round_through_the_air_at_high_snr_is_fedavg(fresh_mosquitto, tiny_bert_bundle, tmp_path):
    """`deft edge serve --channel aircomp` with real devices over Mosquitto: the stored global state is the
    sample-weighted mean of the stored deltas (what the edge would aggregate without a channel), and the
    round's report carries the channel's figures."""
    from tests._fleet import fedavg_from_store, running_fleet, store_globals, write_shard

    devices = ["dev1", "dev2"]
    data = {"dev1": write_shard(tmp_path / "dev1.tsv", 0, 64), "dev2": write_shard(tmp_path / "dev2.tsv", 64, 32)}
    with running_fleet(fresh_mosquitto(), tiny_bert_bundle, tmp_path / "fleet") as fleet:
        edge = fleet.coordinator(devices=devices, rounds=1, min_devices=2, steps=2,
                                 extra=["--channel", "aircomp", "--snr-db", "150", "--truncation", "1e-9"])
        devs = [fleet.device(d, data[d], max_rounds=1) for d in devices]
        assert edge.wait(120) == 0, edge.tail()
        for p in devs:
            assert p.wait(30) == 0, p.tail()
        rep = fleet.report()["rounds"][0]["channel"]
        expect, _ = fedavg_from_store(fleet.db_path, 1)
        got = store_globals(fleet.db_path)[1]
    assert rep["kind"] == "aircomp" and rep["truncation_rate"] == 0 and rep["nmse"] < 1e-8
    assert set(rep["truncated"]) == set(devices) and rep["digital_latency_s"] > 0
    for k, v in got.items():
        np.testing.assert_allclose(v, expect[k], atol=1e-4, rtol=0, err_msg=k)

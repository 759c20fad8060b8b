"""AirComp bench: over-the-air aggregation (broadband analog aggregation, Zhu, Wang, Huang 2020) on its own
and in the real federated pipeline.

1. **mse**: Monte-Carlo aggregation MSE against the closed forms of ``edge_broker/channel/aircomp.py``
   over SNR (cell-edge, dB), K devices and truncation thresholds g_th: i.i.d. unit-variance values,
   100,000 per point (50,000 complex symbols), the noise MSE against the mean over the transmitting
   devices and the total MSE against the mean over all K;
2. **latency**: simulated uplink latency of one round, air vs the digital OFDMA baseline (each device at
   its Shannon rate on a 1/K share of the band, int8 payload) vs K, for the demo's 74,498-value update
   (M = 1000 sub-channels, 1 MHz, 20 dB cell-edge SNR, 100 m cell, alpha = 3), mean over 20 seeds;
3. **accuracy**: ``deft demo --channel aircomp --snr-db X --json`` (and ``--channel ideal``) exactly as a
   user runs it, each in its own process, one work directory reused (the exported bundle is cached);
   final accuracy, per-round accuracy and the channel's per-round NMSE / truncation / latency.

Results go to ``bench/results/aircomp_bench.json`` (written after every demo run, so an interrupted run
keeps what it finished) and ``aircomp_bench.png``.

    .venv/bin/python bench/aircomp_bench.py [--parts mse,latency,accuracy] [--snrs ideal,30,20,10,0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_broker.channel import aircomp as ac  # noqa: E402
from edge_broker.channel import digital as dg  # noqa: E402

RESULTS = REPO / "bench" / "results" / "aircomp_bench.json"
PLOT = RESULTS.with_suffix(".png")
DEMO_VALUES = 74_498  # the demo's LoRA + head parameters (README)


def mc_point(k: int, snr_db: float, g_th: float, values: int, seed: int) -> dict:
    """One Monte-Carlo point: MSEs measured and in closed form."""
    rng = np.random.default_rng([seed, k, int(round(snr_db * 10)) + 1000, int(g_th * 1e6)])
    x = rng.standard_normal((k, values))
    sym = ac.pack(x)
    snr = 10 ** (snr_db / 10)
    p0 = ac.power_limit(snr, 100.0, 3.0)
    rho0 = ac.power_scaling(p0, 100.0, 3.0, g_th)
    rec = ac.transmit(sym, ac.draw_fading(rng, sym.shape), ac.draw_distances(rng, k, 10.0, 100.0), rho0=rho0,
                      g_th=g_th, alpha=3.0, rng=rng)
    x_hat = ac.unpack(ac.estimate(rec.y, rec.active, rho0), values)
    target = ac.unpack(ac.survivor_mean(sym, rec.active), values)
    heard = np.repeat(rec.active.sum(axis=0) > 0, 2)[:values]
    rx = ac.receive_snr(snr, g_th)
    return {"k": k, "snr_db": snr_db, "g_th": g_th,
            "noise_mse_mc": float(np.mean((x_hat - target)[heard] ** 2)), "noise_mse_cf": ac.noise_mse(k, rx, g_th),
            "mse_mc": float(np.mean((x_hat - x.mean(axis=0)) ** 2)), "mse_cf": ac.aggregation_mse(k, rx, g_th),
            "truncation_mc": float(1 - rec.active.mean()), "truncation_cf": ac.truncation_probability(g_th),
            "max_power_ratio": float(rec.tx_power.max() / p0)}


def run_mse(values: int = 100_000) -> list[dict]:
    return [mc_point(k, s, g, values, seed=0) for g in (0.1, 0.5) for k in (2, 4, 10, 20)
            for s in (-10, 0, 10, 20, 30)]


def run_latency(seeds: int = 20) -> list[dict]:
    out = []
    t_air = dg.air_latency(DEMO_VALUES, 1000, 1e6)
    for k in (1, 2, 4, 8, 16, 32, 64, 100, 150, 200):
        digital = []
        for seed in range(seeds):
            rng = np.random.default_rng([seed, k])
            d = ac.draw_distances(rng, k, 10.0, 100.0)
            gains = np.abs(ac.draw_fading(rng, (k, 1000))) ** 2
            digital.append(dg.digital_latency(DEMO_VALUES, 8, dg.shannon_rates(dg.device_snrs(100.0, d, 100.0, 3.0),
                                                                                  gains, 1e6)))
        t_dig = float(np.mean(digital))
        out.append({"k": k, "air_s": t_air, "digital_s": t_dig, "ratio": t_dig / t_air})
    return out


def demo_run(setting: str, workdir: Path, timeout: float) -> dict:
    """``deft demo`` at one channel setting ('ideal' or an SNR in dB), in its own process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    args = ["--channel", "ideal"] if setting == "ideal" else ["--channel", "aircomp", "--snr-db", setting]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "deftkit.cli", "demo", "--workdir", str(workdir), "--json", *args],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False)
    if r.returncode != 0:
        return {"setting": setting, "error": r.stderr.strip()[-2000:], "returncode": r.returncode}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rounds = out.get("channel_rounds") or []
    return {"setting": setting, "final_accuracy": out["final_accuracy"], "accuracy": out["accuracy"],
            "initial_accuracy": out.get("initial_accuracy"), "wall_s": round(time.time() - t0, 1),
            "nmse": [r["nmse"] for r in rounds], "mse": [r["mse"] for r in rounds],
            "truncation_rate": [r["truncation_rate"] for r in rounds],
            "air_latency_s": [r["air_latency_s"] for r in rounds],
            "digital_latency_s": [r["digital_latency_s"] for r in rounds]}


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for i, k in enumerate((2, 4, 10, 20)):
        pts = [p for p in res.get("mse", []) if p["k"] == k and p["g_th"] == 0.1]
        if pts:
            xs = [p["snr_db"] for p in pts]
            ax.semilogy(xs, [p["mse_cf"] for p in pts], color=f"C{i}", label=f"K={k} closed form")
            ax.semilogy(xs, [p["mse_mc"] for p in pts], "o", color=f"C{i}", label=f"K={k} Monte-Carlo")
    ax.set(title="aggregation MSE per value (g_th = 0.1)", xlabel="cell-edge SNR (dB)", ylabel="MSE (normalised)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    lat = res.get("latency", [])
    if lat:
        ks = [p["k"] for p in lat]
        ax.loglog(ks, [p["digital_s"] for p in lat], "s-", label="digital OFDMA (int8, Shannon rate)")
        ax.loglog(ks, [p["air_s"] for p in lat], "o-", label="over the air")
        ax2 = ax.twinx()
        ax2.plot(ks, [p["ratio"] for p in lat], "k:", label="digital / air")
        ax2.set_ylabel("latency ratio digital / air")
        ax2.set_xscale("log")
        ax.legend(fontsize=8, loc="upper left")
    ax.set(title="uplink latency of one round (74,498 values)", xlabel="devices K", ylabel="seconds")
    ax.grid(alpha=0.3)
    ax = axes[2]
    acc = [a for a in res.get("accuracy", []) if "final_accuracy" in a]
    if acc:
        labels = [a["setting"] + ("" if a["setting"] == "ideal" else " dB") for a in acc]
        ax.bar(labels, [100 * a["final_accuracy"] for a in acc], color="tab:blue")
        for i, a in enumerate(acc):
            ax.text(i, 100 * a["final_accuracy"] + 0.3, f"{100 * a['final_accuracy']:.1f}", ha="center")
        ax.set_ylim(50, 90)
    ax.set(title="deft demo: final accuracy vs channel", xlabel="channel", ylabel="SST-2 validation accuracy (%)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title="Monte-Carlo / closed form (g_th = 0.1)")
    for col in ("K", "SNR dB", "noise MSE MC", "closed", "ratio", "MSE MC", "closed", "ratio", "trunc MC"):
        t.add_column(col, justify="right")
    for p in res.get("mse", []):
        if p["g_th"] == 0.1:
            t.add_row(str(p["k"]), f"{p['snr_db']:g}", f"{p['noise_mse_mc']:.4g}", f"{p['noise_mse_cf']:.4g}",
                      f"{p['noise_mse_mc'] / p['noise_mse_cf']:.3f}", f"{p['mse_mc']:.4g}", f"{p['mse_cf']:.4g}",
                      f"{p['mse_mc'] / p['mse_cf']:.3f}", f"{p['truncation_mc']:.4f}")
    c.print(t)
    t = Table(title="latency of one round")
    for col in ("K", "air ms", "digital ms", "ratio"):
        t.add_column(col, justify="right")
    for p in res.get("latency", []):
        t.add_row(str(p["k"]), f"{1e3 * p['air_s']:.1f}", f"{1e3 * p['digital_s']:.1f}", f"{p['ratio']:.1f}")
    c.print(t)
    t = Table(title="deft demo vs channel")
    for col in ("channel", "round accuracies", "final", "NMSE per round", "truncated", "s"):
        t.add_column(col, justify="right")
    for a in res.get("accuracy", []):
        if "final_accuracy" not in a:
            t.add_row(a["setting"], "error", a.get("error", "")[-80:], "", "", "")
            continue
        t.add_row(a["setting"], " / ".join(f"{100 * x:.1f}" for x in a["accuracy"]), f"{100 * a['final_accuracy']:.1f}",
                  " / ".join(f"{x:.3g}" for x in a["nmse"]), " / ".join(f"{x:.3f}" for x in a["truncation_rate"]),
                  f"{a['wall_s']:.0f}")
    c.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="mse,latency,accuracy")
    ap.add_argument("--snrs", default="20,0,ideal,10,30", help="demo settings, in the order run")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deft-aircomp-bench"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    res = load()
    parts = args.parts.split(",")
    if not args.plot_only:
        if "mse" in parts:
            res["mse"] = run_mse()
            save(res)
        if "latency" in parts:
            res["latency"] = run_latency()
            save(res)
        if "accuracy" in parts:
            runs = {a["setting"]: a for a in res.get("accuracy", [])}
            for s in args.snrs.split(","):
                print(f"deft demo, channel {s} ...", flush=True)
                runs[s] = demo_run(s, args.workdir, args.timeout)
                order = ["ideal", *sorted((k for k in runs if k != "ideal"), key=float, reverse=True)]
                res["accuracy"] = [runs[k] for k in order if k in runs]
                save(res)
                print(json.dumps(runs[s]), flush=True)
    plot(res)
    table(res)


if __name__ == "__main__":
    main()

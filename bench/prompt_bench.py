"""Prompt bench: soft prompt + head vs LoRA + head on MiniLM, on the same rows.

How strong is prompt tuning on a small encoder? For the prompts demo's newcomer rows (N = 64 random
SST-2 training rows, seeds 0-2, 10 epochs) and for one pool device's data (the first 900 rows of
``data/sst2/train.tsv``, 2 epochs), both bundles are trained with the device runtime on the same
batches and scored on the 872 GLUE SST-2 validation sentences; wall time per run is recorded.
Prompt + head uses lr 1e-1 (the demo's, chosen on unused training rows), LoRA + head lr 1e-3 (the
README's default); the untrained bundles' accuracy is the floor.

    .venv/bin/python bench/prompt_bench.py --prompt-bundle deft-demo-prompts/bundle-prompt20-pool4 \
        --lora-bundle deft-demo/bundle-full [--plot-only]

Results: ``bench/results/prompt_bench.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "prompt_bench.json"
PLOT = RESULTS.with_suffix(".png")
TRAIN = REPO / "data" / "sst2" / "train.tsv"
VALID = REPO / "data" / "sst2" / "validation.tsv"

#: setting -> (rows, epochs, seeds)
SETTINGS = {"newcomer (64 rows, 10 epochs)": (64, 10.0, (0, 1, 2)),
            "pool device (900 rows, 2 epochs)": (900, 2.0, (0,))}
LR = {"prompt+head": 1e-1, "lora+head": 1e-3}


def _rows(n: int, seed: int | None, work: Path) -> Path:
    from edge_broker.demo.shards import read_labelled_tsv, write_tsv

    fields, rows = read_labelled_tsv(TRAIN)
    picked = rows[:n] if seed is None else random.Random(seed).sample(rows, n)
    return write_tsv(work / f"rows-{n}-{seed}.tsv", fields, picked)


def run(prompt_bundle: Path, lora_bundle: Path, work: Path) -> dict:
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.prompt_ensemble import accuracy_of
    from device_runtime.train import TrainConfig, train
    from device_runtime.weights import initial_tensors

    out: dict = {"untrained": {}, "runs": []}
    for method, path in (("prompt+head", prompt_bundle), ("lora+head", lora_bundle)):
        b = load_bundle(path)
        val = load_dataset(VALID, b.manifest, b.path("tokenizer.json"))
        out["untrained"][method] = accuracy_of(b, initial_tensors(b), val)["accuracy"]
        out.setdefault("trainable_params", {})[method] = b.manifest.params_trainable
        for setting, (n, epochs, seeds) in SETTINGS.items():
            for seed in seeds:
                ds = load_dataset(_rows(n, seed if n < 900 else None, work), b.manifest, b.path("tokenizer.json"))
                res = train(b, ds, TrainConfig(epochs=epochs, lr=LR[method], seed=seed, progress=False), val)
                out["runs"].append({"method": method, "setting": setting, "seed": seed, "rows": n,
                                    "accuracy": res.report["eval_accuracy"], "train_s": res.report["wall_s"]})
                print(f"{method:12s} {setting:32s} seed {seed}: {res.report['eval_accuracy']:.4f} "
                      f"({res.report['wall_s']:.1f}s)", flush=True)
    return out


def table(res: dict) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        for method in LR:
            runs = [r for r in res["runs"] if r["setting"] == setting and r["method"] == method]
            if runs:
                rows.append({"setting": setting, "method": method,
                             "accuracy": statistics.fmean(r["accuracy"] for r in runs),
                             "train_s": statistics.fmean(r["train_s"] for r in runs), "runs": len(runs)})
    return rows


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(res)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['method']}\n{r['setting'].split(' (')[0]}" for r in rows]
    ax.bar(labels, [r["accuracy"] for r in rows], color=["tab:orange" if "prompt" in r["method"] else "tab:blue"
                                                          for r in rows])
    for m, a in res["untrained"].items():
        ax.axhline(a, ls=":", color="grey", lw=1)
        ax.text(len(rows) - 0.5, a, f"untrained {m}", fontsize=7, va="bottom", ha="right")
    ax.set_ylim(0.45, 0.9)
    ax.set_ylabel("GLUE SST-2 validation accuracy")
    ax.set_title("MiniLM: soft prompt + head vs LoRA + head, same rows")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-bundle", type=Path)
    ap.add_argument("--lora-bundle", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deft-prompt-bench"))
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    if not a.plot_only:
        if a.prompt_bundle is None or a.lora_bundle is None:
            raise SystemExit("error: give --prompt-bundle and --lora-bundle (or --plot-only)")
        a.work.mkdir(parents=True, exist_ok=True)
        res = run(a.prompt_bundle, a.lora_bundle, a.work)
        res["table"] = table(res)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=1))
    res = json.loads(RESULTS.read_text())
    for r in res["table"]:
        print(f"{r['setting']:34s} {r['method']:12s} {r['accuracy']:.4f}  {r['train_s']:.1f}s  ({r['runs']} runs)")
    plot(res)


if __name__ == "__main__":
    main()

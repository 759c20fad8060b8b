"""Browser device bench: a training step of the page (onnxruntime-web, WASM, in headless Chromium) vs the
Python device (plain onnxruntime) on the same batches.

The page joins a private Mosquitto over WebSockets and gets one task from a hand-played edge (the bench
is the edge: global state, task, the bundle over HTTP like ``deft edge serve --web``, an ack), trains
``--steps`` steps on SST-2 rows and records every batch, learning rate, loss and step time. The Python
step backend then runs the very same batches (2 threads, like the page, and 1 thread, like
``deft device run --threads 1``). Step 1 of each includes session warm-up and is left out of the medians.
The machine's 1-minute load average is recorded: on a shared machine the figures move with it.

    python bench/web_bench.py --bundle bundles/minilm [--steps 8] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
SST2 = REPO / "data" / "sst2" / "train.tsv"


def page_run(bundle_dir: Path, rows: str, steps: int, batch: int, threads: int, work: Path) -> dict:
    """One task for the page; returns its ``window.deft`` state after the round."""
    from playwright.sync_api import sync_playwright

    from device_runtime.bundle.load import load_bundle
    from device_runtime.payload import decode_update
    from device_runtime.protocol import Envelope, Task, Topics, make_ack, to_envelope
    from device_runtime.protocol.client import DeftClient
    from device_runtime.weights import initial_tensors
    from edge_broker.broker import make_accounts
    from edge_broker.broker.base import free_port
    from edge_broker.broker.mosquitto import MosquittoBroker, MosquittoConfig, WebSocketListener
    from edge_broker.store import tensors_to_bytes
    from edge_broker.web import WEB_DIST, serve_page
    from tests._browser import CHROMIUM_ARGS

    bundle = load_bundle(bundle_dir)
    pw = {"edge": "bench-edge", "web1": "bench-web1"}
    ws_port = free_port()
    broker = MosquittoBroker(work / "mosquitto", make_accounts(["web1"], passwords=pw),
                             MosquittoConfig(port=free_port(), fleets=["bench"], websockets=WebSocketListener(ws_port)))
    broker.write_files()
    broker.start()
    server = serve_page("127.0.0.1", free_port(), root=WEB_DIST, bundles={bundle.hash: bundle_dir})
    edge = DeftClient("127.0.0.1", broker.port, client_id="bench-edge", username="edge", password=pw["edge"],
                      persistent_session=False).connect()
    t = Topics("bench")
    try:
        hello = edge.subscribe(t.hello("web1"))
        updates = edge.subscribe(t.from_devices("update"))
        g = Envelope.build("global", sender="edge", fleet="bench", round=0, content="safetensors",
                           body=tensors_to_bytes(initial_tensors(bundle)))
        edge.publish(t.global_state(), g, retain=True, chunk=False)
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(work / "chromium"), executable_path="/usr/bin/chromium",
                                                       headless=True, args=CHROMIUM_ARGS)
            page = ctx.new_page()
            page.goto(server.url("127.0.0.1", broker=f"ws://127.0.0.1:{ws_port}", fleet="bench", id="web1",
                                 threads=str(threads)))
            page.fill("#password", pw["web1"])
            page.fill("#rows", rows)
            page.click("#join")
            hello.get(timeout=60)
            task = Task(round=1, bundle_hash=bundle.hash, global_round=0, global_sha256=g.header.sha256,
                        hyperparams={"steps": steps, "batch_size": batch, "lr": 1e-3, "schedule": "constant"},
                        encoding="int8")
            edge.publish(t.task_for("web1", 1), to_envelope(task, sender="edge", fleet="bench", round=1))
            up = updates.get(timeout=1800)
            decode_update(up.envelope.body, bundle_hash=bundle.hash)  # the Python edge reads it
            edge.publish(t.ack_to("web1"), make_ack(up.envelope, sender="edge", accepted=True))
            page.wait_for_function("window.deft.rounds.length > 0", timeout=60_000)
            state = page.evaluate("window.deft")
            page.screenshot(path=str(RESULTS / "web_bench_page.png"), full_page=True)
            ctx.close()
        return state
    finally:
        edge.close()
        server.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from tests._browser import replay_in_python

    with open(SST2, newline="") as f:
        r = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = "\n".join("\t".join(x) for x in r[: a.rows + 1]) + "\n"
    work = Path(tempfile.mkdtemp(prefix="web-bench-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        load0 = os.getloadavg()[0]
        state = page_run(a.bundle, rows, a.steps, a.batch_size, a.threads, work)
        rnd = state["rounds"][0]
        trace = rnd["trace"]
        py2, s2 = replay_in_python(a.bundle, trace, 2)
        py1, s1 = replay_in_python(a.bundle, trace, 1)
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    page_s = [tr["ms"] / 1000 for tr in trace]
    med = {"page_wasm": statistics.median(page_s[1:]), "python_ort_2_threads": statistics.median(s2[1:]),
           "python_ort_1_thread": statistics.median(s1[1:])}
    out = {"bundle": str(a.bundle), "steps": len(trace), "batch_size": a.batch_size, "page_threads": state["threads"],
           "page_isolated": state["isolated"], "median_step_s": med,
           "page_over_python_2_threads": med["page_wasm"] / med["python_ort_2_threads"],
           "max_loss_diff": max(abs(tr["loss"] - p) for tr, p in zip(trace, py2, strict=True)),
           "page_step_s": page_s, "python_2_threads_step_s": s2, "python_1_thread_step_s": s1,
           "loadavg_1min": [load0, load1], "accepted": rnd["accepted"]}
    (RESULTS / "web_bench.json").write_text(json.dumps(out, indent=1))
    print(f"{'runtime':<28}{'median step (s)':>16}")
    for k, v in med.items():
        print(f"{k:<28}{v:>16.3f}")
    print(f"page / python (2 threads): {out['page_over_python_2_threads']:.2f}x; max |loss diff| "
          f"{out['max_loss_diff']:.2e}; load average {load0:.1f} -> {load1:.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"page (WASM, {state['threads']} thr)", "Python ORT, 2 thr", "Python ORT, 1 thr"]
    ax.bar(labels, list(med.values()))
    ax.set_ylabel("median step (s)")
    ax.set_title(f"{a.bundle.name}: batch {a.batch_size}, {len(trace)} steps")
    fig.tight_layout()
    fig.savefig(RESULTS / "web_bench.png", dpi=120)


if __name__ == "__main__":
    main()

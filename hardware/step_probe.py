"""Measure one bundle's training step (the device runtime's backend) on this machine: median latency and peak RSS.

Runs as its own process (``python -m hardware.step_probe BUNDLE``) so the peak RSS is the bundle's
alone, and imports only the torch-free device stack, as a device would. The profiler and the
benchmarks call :func:`probe` which starts that process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from device_runtime.resources import peak_rss_mb


def _run(bundle: Path, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import numpy as np

    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle

    b = load_bundle(bundle, verify=False)  # a variant being measured; its maker hashes it afterwards
    m = b.manifest
    seq = min(seq, m.max_length)
    rss_before = peak_rss_mb()
    backend = make_backend(b)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    labels = (rng.integers(0, max(2, len(m.labels)), size=batch, dtype=np.int64) if m.task == "seq-cls"
              else ids.copy())
    batch_arrays = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        backend.train_step(batch_arrays, 1e-4, i, 0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    return {"median_step_s": statistics.median(times), "steps": steps, "batch": batch, "seq": seq,
            "peak_rss_mb": peak, "baseline_rss_mb": rss_before,
            "update_bytes": 4 * m.params_trainable}


def probe(bundle: str | Path, batch: int = 16, seq: int = 64, steps: int = 10, warmup: int = 2,
          threads: int | None = None) -> dict:
    """Measure ``bundle`` in a fresh process; returns median step seconds and peak RSS (MB)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "hardware.step_probe", str(bundle), str(batch), str(seq), str(steps), str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"step probe failed for {bundle}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    b, bs, sq, st, wu = sys.argv[1:6]
    print(json.dumps(_run(Path(b), int(bs), int(sq), int(st), int(wu))))

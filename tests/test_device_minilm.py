"""Issue 3 acceptance on the real MiniLM bundle (LoRA r=8 on query,value + head), through the exact
command scripts use:

    deft device train --bundle DIR --data FILE --eval-data FILE --epochs 1 --encoding int8 --out U --json

One training run per session (4,000 SST-2 rows, 1 epoch, batch 16, max length 64, lr 1e-3, linear
decay: the CLI defaults), evaluated on the 872-sentence GLUE SST-2 validation set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from device_runtime.payload import decode_update
from tests._models import REPO, SST2_TRAIN, SST2_VALIDATION

pytestmark = pytest.mark.slow
DEFT = [sys.executable, "-c", "from deftkit.cli import main; main()"]


def _deft(*args) -> dict:
    r = subprocess.run([*DEFT, *map(str, args)], check=False, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def minilm_run(minilm_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm-device")
    lines = SST2_TRAIN.read_text().splitlines()
    data = d / "train4000.tsv"
    data.write_text("\n".join(lines[:4001]) + "\n")
    out = d / "update.safetensors"
    report = _deft("device", "train", "--bundle", minilm_bundle, "--data", data, "--eval-data", SST2_VALIDATION,
                   "--epochs", "1", "--encoding", "int8", "--out", out, "--json", "--no-progress")
    return minilm_bundle, report, out


def test_minilm_reaches_80_percent(minilm_run):
    _, rep, _ = minilm_run
    assert rep["steps"] == 250 and rep["samples"] == 4000 and rep["batch_size"] == 16 and rep["lr"] == 1e-3
    assert rep["eval_rows"] == 872 and rep["skipped_rows"] == 0
    assert len(rep["train_loss"]) == 250
    assert sum(rep["train_loss"][-25:]) < sum(rep["train_loss"][:25])
    assert rep["eval_accuracy"] >= 0.80, rep["eval_accuracy"]
    assert rep["median_step_s"] > 0 and rep["peak_rss_mb"] > 0


def test_minilm_int8_payload_is_small_and_rebuilds_the_model(minilm_run):
    bundle, rep, out = minilm_run
    assert rep["payload_bytes"] == out.stat().st_size <= 80_000
    upd = decode_update(out.read_bytes(), bundle_hash=rep["bundle_hash"])
    assert upd.meta.encoding == "int8" and upd.meta.samples == 4000
    assert upd.meta.metrics["eval_accuracy"] == rep["eval_accuracy"]
    rebuilt = _deft("device", "eval", "--bundle", bundle, "--data", SST2_VALIDATION, "--state", out, "--json")
    assert rebuilt["rows"] == 872
    assert abs(rebuilt["accuracy"] - rep["eval_accuracy"]) <= 0.003, (rebuilt["accuracy"], rep["eval_accuracy"])

"""The edge bench runs end to end on a small fleet and its figures hang together (no timing asserts).

Runs ``bench/edge_bench.py`` as a script, as a user would, with 6 devices against a real Mosquitto
and the real coordinator (``Coordinator.run_round`` on a real exported MiniLM bundle, cached between
runs): every round must complete (each update stored once by the coordinator and acked as accepted;
every raw byte received), FedAvg of what went through the broker and SQLite must equal the devices'
true mean, and the byte accounting must match the MiniLM LoRA payload sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mosquitto

REPO = Path(__file__).resolve().parent.parent
DEVICES = 6


@pytest.fixture(scope="module")
def bench_result(mosquitto_binary: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("edge-bench") / "edge.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "edge_bench.py"), "--devices", str(DEVICES), "--reps", "1", "--quick",
         "--link-mbps", "0,400", "--out", str(out)],
        capture_output=True, text=True, timeout=150, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "kit/raw" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())


def test_every_round_completes_and_counts_each_update_once(bench_result: dict) -> None:
    rounds = bench_result["rounds"]
    assert {r["scenario"] for r in rounds} == {"burst", "link_400mbps"}
    assert {r["mode"] for r in rounds} == {"kit", "kit-unbatched", "raw"}
    assert bench_result["settings"]["edge"] == "edge_broker.coordinator.Coordinator.run_round"
    for r in rounds:
        assert r["devices_ok"] == DEVICES and r["received"] == DEVICES, r
        if r["mode"] == "raw":
            assert r["raw_bytes_rx"] == r["bytes_up"]  # the edge got every byte the devices sent
        else:
            assert r["stored"] == r["accepted"] == DEVICES and r["rejected"] == {} and r["duplicates"] == 0
            assert r["acks_accepted"] == DEVICES
            # an ack never precedes its update's commit; the coordinator's round includes aggregating
            assert 0 < r["last_stored_s"] <= r["wall_s"] and r["last_stored_s"] < r["coordinator_round_s"]
            assert r["aggregation_s"] > 0
            # every update stored by some commit; unbatched: one commit per update
            assert 1 <= r["commits"] <= DEVICES and r["max_batch"] >= 1
            if r["mode"] == "kit-unbatched":
                assert r["commits"] == DEVICES and r["max_batch"] == 1


def test_aggregation_of_what_crossed_the_broker_is_the_true_mean(bench_result: dict) -> None:
    agg = bench_result["aggregation"]
    assert agg["updates"] == DEVICES
    assert agg["fedavg_max_abs_err_vs_true_mean"] < 1e-6  # fp32 payloads: exact up to float rounding
    assert all(agg[k] > 0 for k in ("load_decode_s", "fedavg_s", "median_s", "trimmed_mean_s"))


def test_byte_accounting_matches_the_minilm_lora_payloads(bench_result: dict) -> None:
    b = bench_result["bytes"]
    assert b["lora_trainable_params"] == 6 * 2 * (8 * 384 + 384 * 8) + 384 * 2 + 2  # 74,498
    assert 22_000_000 < b["full_model_params"] < 23_500_000
    per_dev = {enc: bench_result["round"]["burst"][enc]["bytes_up_per_round"] / DEVICES for enc in ("fp32", "int8")}
    assert 4 * b["lora_trainable_params"] < per_dev["fp32"] < 4 * b["lora_trainable_params"] + 8_000
    assert per_dev["int8"] <= 80_000  # issue #3's int8 payload target, with the envelope around it
    assert b["full_model_fedavg"]["total"] == 2 * DEVICES * 4 * b["full_model_params"]
    assert b["lora_int8"]["full_over_lora"] > b["lora_fp32"]["full_over_lora"] > 100
    ratio = bench_result["kit_ratio"]["burst"]
    assert set(ratio) == {"fp32", "int8"} and all(v > 0 for v in ratio.values())

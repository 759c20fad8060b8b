"""`deft hw profile`: a real per-block cost table measured with ONNX Runtime on a tiny random BERT bundle."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.bundle.manifest import Manifest
from hardware.cost_table import CostTable
from hardware.profiler import ProfilerError, block_depth, block_tensors, block_update_bytes, trainable_blocks

DEFT = Path(sys.executable).with_name("deft")


def _deft(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEFT), *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def profiled(tiny_bert_bundle: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("profile") / "cost.json"
    r = _deft(
        "hw",
        "profile",
        str(tiny_bert_bundle),
        "--out",
        str(out),
        "--batch",
        "16",
        "--seq",
        "32",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def test_block_grouping_puts_the_head_with_the_block_next_to_the_output(tiny_bert_bundle: Path) -> None:
    m = Manifest.load(tiny_bert_bundle)
    assert trainable_blocks(m) == [0, 1, 2, 3]
    assert [block_depth(m, b) for b in (0, 3)] == [4, 1]
    groups = block_tensors(m)
    assert sorted(t.name for ts in groups.values() for t in ts) == sorted(m.trainable_names)  # each once
    assert {t.kind for t in groups[3]} == {"lora_A", "lora_B", "head"}
    assert all(t.block == 0 for t in groups[0])
    upd = block_update_bytes(m)
    lora = 4 * sum(t.numel for t in m.trainable if t.block == 0)
    head = 4 * sum(t.numel for t in m.trainable if t.kind == "head")
    assert upd == {0: lora, 1: lora, 2: lora, 3: lora + head}


def test_profile_writes_a_monotone_cost_table(tiny_bert_bundle: Path, profiled: tuple[Path, dict]) -> None:
    out, report = profiled
    table = CostTable.load(out)  # the written file is a valid CostTable
    assert report["ok"] is True and report["out"] == str(out)
    assert CostTable.model_validate(report["table"]) == table
    assert table.profile == "laptop-x86" and table.source == "measured" and table.backend == "cpu"
    assert (table.batch, table.seq) == (16, 32)
    assert [e.depth for e in table.entries] == [1, 2, 3, 4]
    lat = [e.step_latency_s for e in table.entries]
    mem = [e.peak_memory_bytes for e in table.entries]
    assert all(b >= a for a, b in itertools.pairwise(lat)), lat
    assert all(b >= a for a, b in itertools.pairwise(mem)), mem
    assert all(0 < t < 5 for t in lat)
    assert all(50 * 2**20 < m < 2 * 2**30 for m in mem)  # a real ORT process, not a made-up number
    m = Manifest.load(tiny_bert_bundle)
    upd = block_update_bytes(m)
    assert [e.update_bytes for e in table.entries] == [upd[3], upd[2], upd[1], upd[0]]

    # measurements line up with the table: depth d is block L - d, with its real step times and RSS
    meas = report["measurements"]
    assert [x["block"] for x in meas] == [3, 2, 1, 0]
    for x in meas:
        assert x["peak_rss_mb"] > x["baseline_rss_mb"] > 0  # training allocated memory beyond the start
        assert x["step_s_per_repeat"] == [x["median_step_s"]]
    # backpropagation to depth 4 keeps more activations than to depth 1: visible in raw peak RSS
    assert meas[-1]["peak_rss_mb"] > meas[0]["peak_rss_mb"]


def test_adjusted_entries_are_exactly_the_ironed_ones(profiled: tuple[Path, dict]) -> None:
    _, report = profiled
    measured = CostTable.model_validate(report["measured"])
    table = CostTable.model_validate(report["table"])
    assert measured.monotone() == table
    listed = {(a["depth"], a["field"]): a for a in report["adjusted"]}
    for raw, fixed in zip(measured.entries, table.entries, strict=True):
        for field in ("step_latency_s", "peak_memory_bytes"):
            a, b = getattr(raw, field), getattr(fixed, field)
            if (raw.depth, field) in listed:
                adj = listed[(raw.depth, field)]
                assert adj["measured"] == a < b == adj["adjusted"]
            else:
                assert a == b


def test_profile_then_scale_to_a_pi(profiled: tuple[Path, dict], tmp_path: Path) -> None:
    """The profiler's file is what `deft hw scale` reads: the measured table predicts a slower Pi 4."""
    out, _ = profiled
    r = _deft("hw", "scale", str(out), "--to", "rpi4-4gb", "--json")
    assert r.returncode == 0, r.stderr
    pred = CostTable.model_validate(json.loads(r.stdout.strip().splitlines()[-1]))
    src = CostTable.load(out)
    assert pred.profile == "rpi4-4gb" and pred.predicted_from == "laptop-x86"
    assert all(p.step_latency_s > 2 * s.step_latency_s for p, s in zip(pred.entries, src.entries, strict=True))


def test_not_a_bundle_is_a_one_line_error(tmp_path: Path) -> None:
    r = _deft("hw", "profile", str(tmp_path), "--out", str(tmp_path / "c.json"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "not a deftkit bundle" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "c.json").exists()


def test_bundle_without_blocks_is_a_one_line_error(bundle_factory, tiny_model_dir, tmp_path: Path) -> None:
    head_only = bundle_factory(
        tiny_model_dir("bert"), task="seq-cls", num_labels=2, max_length=32, peft="head"
    )
    with pytest.raises(ProfilerError, match="no trainable transformer blocks"):
        block_tensors(Manifest.load(head_only))
    r = _deft("hw", "profile", str(head_only), "--out", str(tmp_path / "c.json"))
    assert r.returncode == 2
    assert "no trainable transformer blocks" in r.stderr and "--peft lora" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "c.json").exists()


def test_bad_profile_and_output_dir(tiny_bert_bundle: Path, tmp_path: Path) -> None:
    r = _deft(
        "hw", "profile", str(tiny_bert_bundle), "--profile", "commodore-64", "--out", str(tmp_path / "c.json")
    )
    assert r.returncode == 2 and "unknown profile 'commodore-64'" in r.stderr
    r = _deft("hw", "profile", str(tiny_bert_bundle), "--out", str(tmp_path / "missing" / "c.json"))
    assert r.returncode == 2 and "output directory" in r.stderr and "does not exist" in r.stderr


def test_a_soft_prompt_goes_with_the_block_next_to_the_input(tiny_bert_bundle: Path) -> None:
    from device_runtime.bundle.manifest import TensorSpec

    m = Manifest.load(tiny_bert_bundle)
    prompt = TensorSpec(name="prompt_encoder.default.embedding.weight", shape=(4, 32), kind="prompt")
    m2 = m.model_copy(update={"trainable": [*m.trainable, prompt]})
    groups = block_tensors(m2)
    assert prompt in groups[0] and all(prompt not in groups[b] for b in (1, 2, 3))
    assert block_update_bytes(m2)[0] == block_update_bytes(m)[0] + 4 * 4 * 32


def test_adjustments_name_every_raised_entry() -> None:
    from hardware.cost_table import CostEntry
    from hardware.profiler import adjustments

    noisy = CostTable(
        profile="laptop-x86",
        entries=[
            CostEntry(depth=1, step_latency_s=0.10, peak_memory_bytes=100.0, update_bytes=1),
            CostEntry(depth=2, step_latency_s=0.09, peak_memory_bytes=120.0, update_bytes=1),
            CostEntry(depth=3, step_latency_s=0.12, peak_memory_bytes=110.0, update_bytes=1),
        ],
    )
    adj = adjustments(noisy, noisy.monotone())
    assert [(a.depth, a.field, a.measured, a.adjusted) for a in adj] == [
        (2, "step_latency_s", 0.09, 0.10),
        (3, "peak_memory_bytes", 110.0, 120.0),
    ]

"""``deft device`` as scripts call it, its one-line errors, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_runtime.payload import decode_update, encode_update
from tests._models import REPO, SST2_TRAIN, SST2_VALIDATION

pytest_plugins = ["tests._device_fixtures"]  # bundles shared by the device tests

DEFT = [sys.executable, "-c", "from deftkit.cli import main; main()"]


def deft(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*DEFT, *map(str, args)], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout,
                          env=env)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("device-data")
    lines = SST2_TRAIN.read_text().splitlines()
    train = d / "train.tsv"
    train.write_text("\n".join(lines[:161]) + "\n\tpositive\nodd row\tmaybe\n")  # + 1 empty, 1 unknown label
    ev = d / "eval.csv"
    import csv

    rows = [r.split("\t") for r in SST2_VALIDATION.read_text().splitlines()[1:65]]
    with open(ev, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return train, ev


def test_train_exact_form_prints_json_report(tiny_bert_bundle, small_data, tmp_path):
    train, ev = small_data
    out = tmp_path / "update.safetensors"
    r = deft("device", "train", "--bundle", tiny_bert_bundle, "--data", train, "--eval-data", ev, "--epochs", "1",
             "--encoding", "int8", "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = last_json(r.stdout)
    for key in ("eval_accuracy", "train_loss", "samples", "skipped_rows", "median_step_s", "peak_rss_mb",
                "payload_bytes"):
        assert key in rep, key
    assert rep["samples"] == 160 and rep["skipped_rows"] == 2 and rep["skipped"] == {"empty": 1, "unknown_label": 1}
    assert len(rep["train_loss"]) == 10 and rep["eval_rows"] == 64 and 0 <= rep["eval_accuracy"] <= 1
    assert rep["payload_bytes"] == out.stat().st_size
    u = decode_update(out.read_bytes(), bundle_hash=rep["bundle_hash"])
    assert u.meta.encoding == "int8" and u.meta.samples == 160
    assert not Path(str(out) + ".ckpt").exists()  # checkpoints of a finished run are cleaned up

    # eval and predict with the trained state
    e = deft("device", "eval", "--bundle", tiny_bert_bundle, "--data", ev, "--state", out, "--json")
    assert e.returncode == 0, e.stderr
    assert abs(last_json(e.stdout)["accuracy"] - rep["eval_accuracy"]) <= 2 / 64  # int8 rebuild vs fp32
    p = deft("device", "predict", "--bundle", tiny_bert_bundle, "--text", "a gem", "--text", "dull",
             "--state", out, "--json")
    assert p.returncode == 0, p.stderr
    preds = last_json(p.stdout)["predictions"]
    assert len(preds) == 2 and all(abs(sum(x["probs"]) - 1) < 1e-4 for x in preds)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_cli_bad_inputs_are_one_line_errors(tiny_bert_bundle, small_data, tmp_path):
    train, ev = small_data
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bert_bundle, bad)
    blob = bytearray((bad / "weights.safetensors").read_bytes())
    blob[-100] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(blob))
    _one_line_error(deft("device", "train", "--bundle", bad, "--data", train), "weights.safetensors", "sha256")
    _one_line_error(deft("device", "train", "--bundle", tiny_bert_bundle, "--data", tmp_path / "none.tsv"),
                    "none.tsv", "does not exist")
    cols = tmp_path / "cols.tsv"
    cols.write_text("review\tgrade\nnice\t1\n")
    _one_line_error(deft("device", "train", "--bundle", tiny_bert_bundle, "--data", cols), "no text column",
                    "--text-column")
    unusable = tmp_path / "unusable.tsv"
    unusable.write_text("sentence\tlabel\n\t0\nfine\tperhaps\n")
    _one_line_error(deft("device", "train", "--bundle", tiny_bert_bundle, "--data", unusable), "no usable rows")

    # global state with a wrong shape / NaN, and a truncated payload
    from device_runtime.bundle.load import load_bundle

    man = load_bundle(tiny_bert_bundle).manifest
    good = {t.name: np.zeros(t.shape, np.float32) for t in man.trainable}
    name = man.trainable_names[0]
    for tensors, needle in ((dict(good, **{name: np.zeros((2, 2), np.float32)}), "has shape (2, 2)"),
                            (dict(good, **{name: np.full(good[name].shape, np.nan, np.float32)}), "NaN")):
        from safetensors.numpy import save_file

        path = tmp_path / "state.safetensors"
        save_file(tensors, str(path))
        _one_line_error(deft("device", "train", "--bundle", tiny_bert_bundle, "--data", train, "--steps", "1",
                             "--global-state", path), needle)
    payload = encode_update(good, bundle_hash="x", device_id="edge", encoding="fp16")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(payload[: len(payload) - 40])
    _one_line_error(deft("device", "eval", "--bundle", tiny_bert_bundle, "--data", ev, "--state", cut), "truncated")


def test_global_state_is_the_starting_point(tiny_bert_bundle, small_data, tmp_path):
    """--global-state + --delta: the payload is the change from the received tensors."""
    from device_runtime.bundle.load import load_bundle

    train, _ = small_data
    man = load_bundle(tiny_bert_bundle).manifest
    rng = np.random.default_rng(5)
    glob = {t.name: (rng.standard_normal(t.shape) * 0.05).astype(np.float32) for t in man.trainable}
    gpath = tmp_path / "global.safetensors"
    gpath.write_bytes(encode_update(glob, bundle_hash=load_bundle(tiny_bert_bundle).hash, device_id="edge"))
    out = tmp_path / "delta.safetensors"
    r = deft("device", "train", "--bundle", tiny_bert_bundle, "--data", train, "--steps", "3", "--global-state", gpath,
             "--delta", "--out", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    u = decode_update(out.read_bytes())
    assert u.meta.kind == "delta"
    full = u.full_tensors(glob)
    moved = max(float(np.abs(full[n] - glob[n]).max()) for n in glob)
    assert 0 < moved < 0.1  # three small steps away from the global tensors, not from the bundle's own
    assert max(float(np.abs(u.tensors[n]).max()) for n in glob) < 0.1


def _train_cmd(bundle: Path, data: Path, out: Path, ckpt: Path) -> list[str]:
    return [*DEFT, "device", "train", "--bundle", str(bundle), "--data", str(data), "--steps", "1500",
            "--batch-size", "4", "--lr", "1e-3", "--seed", "7", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "25", "--out", str(out), "--encoding", "fp32", "--no-progress", "--json"]


def test_sigkill_and_restart_resumes_to_the_same_tensors(tiny_bert_bundle, small_data, tmp_path):
    train, _ = small_data
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    ref_out, out = tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors"
    ref = subprocess.run(_train_cmd(tiny_bert_bundle, train, ref_out, tmp_path / "ref.ckpt"), check=False, cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]

    ckpt = tmp_path / "run.ckpt"
    cmd = _train_cmd(tiny_bert_bundle, train, out, ckpt)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            progress = ckpt / "progress.json"
            if progress.is_file():
                step = json.loads(progress.read_text())["step"]
                if step >= 100:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    assert not out.exists()

    resumed = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rep = last_json(resumed.stdout)
    assert rep["resumed_from_step"] is not None and rep["resumed_from_step"] >= killed_at
    assert rep["steps_run"] == 1500 - rep["resumed_from_step"] and len(rep["train_loss"]) == 1500
    # bit-exact: the checkpoint holds the tensors, AdamW moments and step, and a step is a pure function
    np.testing.assert_array_equal(rep["train_loss"], last_json(ref.stdout)["train_loss"])
    a, b = decode_update(ref_out.read_bytes()).tensors, decode_update(out.read_bytes()).tensors
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(b[n], a[n], err_msg=n)


def test_checkpoint_of_another_run_is_refused(tiny_bert_bundle, small_data, tmp_path):
    train, _ = small_data
    ck = tmp_path / "ck"
    base = ["device", "train", "--bundle", tiny_bert_bundle, "--data", train, "--steps", "4",
            "--checkpoint-dir", ck, "--no-progress"]
    assert deft(*base).returncode == 0
    _one_line_error(deft(*base[:-1], "--lr", "0.5", "--no-progress"), "different run", "--checkpoint-dir")


def test_predict_prompt_ensemble_from_the_cli(tiny_prompt_bundle, tmp_path):
    """--member/--weight average class probabilities over soft prompts given as payload files."""
    from device_runtime.bundle.load import load_bundle

    b = load_bundle(tiny_prompt_bundle)
    prompt = next(t for t in b.manifest.trainable if t.kind == "prompt")
    rng = np.random.default_rng(3)
    files = []
    for i in range(2):
        f = tmp_path / f"prompt{i}.safetensors"
        f.write_bytes(encode_update({prompt.name: rng.standard_normal(prompt.shape).astype(np.float32)},
                                    bundle_hash=b.hash, device_id=f"peer{i}"))
        files.append(f)
    texts = ["an utterly charming film", "a tedious mess"]
    args = ["device", "predict", "--bundle", tiny_prompt_bundle, "--json"]
    for t in texts:
        args += ["--text", t]
    singles = []
    for f in files:
        r = deft(*args, "--member", f)
        assert r.returncode == 0, r.stderr[-2000:]
        singles.append(np.array([p["probs"] for p in last_json(r.stdout)["predictions"]]))
    r = deft(*args, "--member", files[0], "--member", files[1], "--weight", "1", "--weight", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = last_json(r.stdout)
    assert rep["ensemble"] == 2
    ens = np.array([p["probs"] for p in rep["predictions"]])
    np.testing.assert_allclose(ens, 0.25 * singles[0] + 0.75 * singles[1], atol=1e-5)
    _one_line_error(deft(*args, "--member", files[0], "--weight", "1", "--weight", "2"), "--weight")


@pytest.mark.parametrize("option, bad", [("--encoding", "int4"), ("--schedule", "step"), ("--long-rows", "wrap"),
                                         ("--backend", "tflite")])
def test_a_choice_outside_its_list_is_refused_with_the_list(tmp_path, option, bad):
    """typer checks the choices (from their one definition) before anything runs: exit 2, the allowed values."""
    from typer.testing import CliRunner

    from device_runtime.cli import app

    r = CliRunner().invoke(app, ["train", "--bundle", str(tmp_path), "--data", str(tmp_path / "x.tsv"), option, bad])
    assert r.exit_code == 2
    assert f"'{bad}' is not one of" in r.output and "Traceback" not in r.output

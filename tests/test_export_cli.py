"""`deft export` / `deft bundle verify|inspect`: the interface scripts call, bad input, damaged bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deftkit.cli import _build_app

REPO = Path(__file__).resolve().parent.parent
DEFT = [sys.executable, "-m", "deftkit.cli"]


def deft(*args: str):
    """Run `deft` in-process; returns (exit code, stdout, stderr)."""
    runner = CliRunner()
    res = runner.invoke(_build_app(list(args)), list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_export_then_verify_subprocess(tiny_model_dir, tmp_path):
    """The documented form, as a script outside the project would run it."""
    out = tmp_path / "bundle"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(DEFT + ["export", "--model", str(tiny_model_dir("bert")), "--task", "seq-cls",
                               "--labels", "neg,pos", "--peft", "lora", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout)["ok"] is True
    r = subprocess.run(DEFT + ["bundle", "verify", str(out), "--json"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = last_json(r.stdout)
    assert res["ok"] is True and res["problems"] == []


@pytest.fixture()
def fresh_bundle(tiny_bert_bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bert_bundle, dst)
    return dst


def _verify(bundle: Path) -> tuple[int, dict]:
    code, out, _ = deft("bundle", "verify", str(bundle), "--json")
    return code, last_json(out)


def test_verify_names_flipped_byte(fresh_bundle):
    p = fresh_bundle / "step.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    code, res = _verify(fresh_bundle)
    assert code != 0 and res["ok"] is False
    assert any(x.startswith("step.onnx") and "sha256" in x for x in res["problems"])


def test_verify_names_missing_file(fresh_bundle):
    (fresh_bundle / "tokenizer.json").unlink()
    code, res = _verify(fresh_bundle)
    assert code != 0
    assert any(x.startswith("tokenizer.json") and "missing" in x for x in res["problems"])


def test_verify_manifest_that_does_not_match_graphs(fresh_bundle):
    mpath = fresh_bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    name = m["trainable"][0]["name"]
    m["trainable"][0]["shape"] = [m["trainable"][0]["shape"][0] + 1, m["trainable"][0]["shape"][1]]
    mpath.write_text(json.dumps(m))
    code, res = _verify(fresh_bundle)
    assert code != 0
    assert any(x.startswith("weights.safetensors") and name in x and "shape" in x for x in res["problems"])


def test_verify_manifest_with_wrong_inputs(fresh_bundle):
    mpath = fresh_bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    m["inputs"] = ["input_ids", "token_type_ids"]
    mpath.write_text(json.dumps(m))
    code, res = _verify(fresh_bundle)
    assert code != 0 and any(x.startswith("inference.onnx") and "inputs" in x for x in res["problems"])


def test_verify_not_a_bundle(tmp_path):
    code, res = _verify(tmp_path)
    assert code != 0 and "manifest.json" in res["problems"][0]


def test_inspect_json(tiny_bert_bundle):
    code, out, _ = deft("bundle", "inspect", str(tiny_bert_bundle), "--json")
    s = last_json(out)
    assert code == 0 and s["layer_map"] == [0, 1, 2, 3] and s["params_trainable"] > 0
    assert sum(s["block_params"].values()) + 32 * 2 + 2 == s["params_trainable"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--lora-targets", "nope"], "match no module"),
        (["--lora-r", "0"], "rank must be > 0"),
        (["--emulator", "0,2,0"], "keeps no trainable blocks"),
        (["--trainable-blocks", "9"], "out of range"),
        (["--num-labels", "1"], "--num-labels"),
        (["--emulator", "1,2"], "FIRST,MIDDLE,LAST"),
        (["--task", "causal-lm"], "task 'causal-lm' is not supported for 'bert'"),
        (["--frozen-dtype", "bf16"], "--frozen-dtype"),
        (["--frozen-dtype", "float16", "--format", "ort-training"], "needs the step format"),
    ],
)
def test_bad_input_one_line_error(args, message, tiny_model_dir, tmp_path):
    base = {"--model": str(tiny_model_dir("bert")), "--num-labels": "2", "--out": str(tmp_path / "b")}
    for k, v in zip(args[::2], args[1::2], strict=False):
        base[k] = v
    argv = ["export"] + [x for kv in base.items() for x in kv]
    code, out, err = deft(*argv)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))


def test_unsupported_architecture(tmp_path):
    from transformers import T5Config

    d = tmp_path / "t5"
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=100).save_pretrained(d)
    code, _, err = deft("export", "--model", str(d), "--num-labels", "2", "--out", str(tmp_path / "b"))
    assert code == 2 and "unsupported architecture 't5'" in err


def test_existing_output_needs_force(tiny_model_dir, tiny_bert_bundle, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = deft("export", "--model", str(tiny_model_dir("bert")), "--num-labels", "2", "--out", str(out))
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "user data"
    code, _, err = deft("export", "--model", str(tiny_model_dir("bert")), "--num-labels", "2", "--out", str(out),
                        "--max-length", "32", "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_failed_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A failure after staging started (here: writing the weights) removes the partial bundle."""
    from export import api
    from export.api import export_bundle

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing the weights")

    monkeypatch.setattr(api, "save_safetensors", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(str(tiny_model_dir("bert")), tmp_path / "b", num_labels=2, max_length=32)
    assert list(tmp_path.iterdir()) == []

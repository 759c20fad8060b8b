"""Distilled emulators: the KD loop, what it may and may not change, the cache, the manifest record,
`deft plugin` (parity with stock PEFT) and bad input to the new options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._models import _TINY, REPO, SST2_TRAIN, SST2_VALIDATION
from tests.test_export_cli import deft, last_json

DEFT = [sys.executable, "-m", "deftkit.cli"]
DISTILL_TEXT = REPO / "data" / "distill" / "sst2_unlabelled.txt"


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("distill") / "texts.txt"
    p.write_text("\n".join(DISTILL_TEXT.read_text().splitlines()[:128]) + "\n")
    return p


def _distill_opts(texts: Path, cache: Path, **kw) -> dict:
    distill = {"data": str(texts), "steps": kw.pop("steps", 30), "lr": 1e-3, "batch_size": 16, "warmup_steps": 3,
               "cache_dir": str(cache)}
    return {"task": "seq-cls", "num_labels": 2, "max_length": 32, "emulator": (1, 1, 1), "distill": distill, **kw}


def _build(model_dir: Path, opts: dict, **kw):
    from export import ExportConfig, build_peft_model
    from export.loading import load_model, load_tokenizer_json

    cfg = ExportConfig(**opts)
    model, arch = load_model(str(model_dir), cfg)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    pm, spec, _, _ = build_peft_model(model, arch, cfg, tokenizer_json=load_tokenizer_json(str(model_dir)), **kw)
    return pm, spec, full


def test_kd_loss_decreases(tiny_model_dir, texts, tmp_path):
    from export import ExportConfig
    from export.distill import DistillSettings, distill_middle, tokenize
    from export.loading import load_model, load_tokenizer_json

    src = tiny_model_dir("bert")
    model, arch = load_model(str(src), ExportConfig(num_labels=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = tokenize(load_tokenizer_json(str(src)), texts.read_text().splitlines(), 32)
    res = distill_middle(model, arch, 1, 1, [1], rows, 0,
                         DistillSettings(steps=40, lr=1e-3, batch_size=16, max_length=32, warmup_steps=4, seed=0))
    assert res.kd_loss_final < 0.7 * res.kd_loss_initial, (res.kd_loss_initial, res.kd_loss_final)
    assert len(res.history) == 40 and np.mean(res.history[-10:]) < np.mean(res.history[:10])
    assert set(res.state) == {k.replace("bert.encoder.layer.1.", "0.") for k in before if ".layer.1." in k}
    # the loop returns the student; the model it was given is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distilled_emulator_keeps_adapter_side_and_caches(tiny_model_dir, texts, tmp_path):
    cache = tmp_path / "cache"
    src = tiny_model_dir("bert")
    pm, spec, full = _build(src, _distill_opts(texts, cache))
    assert spec.layer_map == [0, 1, 3] and spec.distillation is not None
    d = spec.distillation
    assert d.kd_loss_final < d.kd_loss_initial and d.rows == 128 and d.steps == 30
    base = pm.get_base_model().state_dict()
    emu_to_full = dict(enumerate(spec.layer_map))
    checked = 0
    for name, value in base.items():
        if "lora_" in name or "classifier" in name:
            continue
        clean = name.replace(".base_layer", "")
        if ".layer." in clean:
            i = int(clean.split(".layer.")[1].split(".")[0])
            if i not in spec.adapter_blocks:
                continue  # the distilled middle
            clean = clean.replace(f".layer.{i}.", f".layer.{emu_to_full[i]}.")
        assert torch.equal(value, full[clean]), name  # first/last blocks, embeddings: untouched
        checked += 1
    assert checked > 20
    middle = {k: v for k, v in base.items() if ".layer.1." in k}
    assert any(not torch.equal(v, full[k]) for k, v in middle.items())  # the middle did change
    # second export: from the cache (same weights, no training)
    msgs: list[str] = []
    pm2, spec2, _ = _build(src, _distill_opts(texts, cache), progress=msgs.append)
    assert any("from the cache" in m for m in msgs) and not any("step" in m for m in msgs)
    assert spec2.distillation == spec.distillation
    assert all(torch.equal(v, pm2.get_base_model().state_dict()[k]) for k, v in middle.items())
    assert len(list(cache.glob("*.safetensors"))) == 1
    # other settings, other entry
    _build(src, _distill_opts(texts, cache, steps=5))
    assert len(list(cache.glob("*.safetensors"))) == 2


#: the exported distilled emulator keeps a chosen middle block (not the uniform one) at half its FFN width,
#: so the export, the device run and `deft plugin` cover --emulator-middle / --emulator-middle-width too
LAYOUT = {"first": 1, "middle": 1, "last": 1, "middle_blocks": [2], "middle_width": _TINY["inter"] // 2}


@pytest.fixture(scope="module")
def distilled_bundle(tiny_model_dir, texts, tmp_path_factory) -> Path:
    from export import export_bundle

    out = tmp_path_factory.mktemp("distilled") / "bundle"
    export_bundle(str(tiny_model_dir("bert")), out, **_distill_opts(texts, out.parent / "cache", emulator=LAYOUT))
    return out


def test_manifest_records_distillation(distilled_bundle, texts):
    from device_runtime.bundle.load import load_bundle
    from device_runtime.weights import weight_shapes

    b = load_bundle(distilled_bundle)
    m = b.manifest
    d = m.emulator.distillation
    assert d is not None and d.data == str(texts) and d.steps == 30 and d.batch_size == 16 and d.max_length == 32
    assert 0 < d.kd_loss_final < d.kd_loss_initial and len(d.key) == 64
    assert m.emulator.layer_map == [0, 2, 3] and m.emulator.middle_width == _TINY["inter"] // 2
    widths = {n: s[0] for n, s in weight_shapes(b).items() if n.endswith("intermediate.dense.weight")}
    assert sorted(widths.values()) == [_TINY["inter"] // 2, _TINY["inter"], _TINY["inter"]], widths


def test_select_layers_named_middle():
    from export.emulator import select_layers
    from export.errors import ExportError

    assert select_layers(6, 1, 1, 2).layer_map == [0, 1, 4, 5]  # uniform
    assert select_layers(6, 1, 1, 2, [2, 3]).layer_map == [0, 2, 3, 5]
    for bad in ([0, 2], [3, 2], [2, 2], [2], [1, 5]):
        with pytest.raises(ExportError, match="--emulator-middle"):
            select_layers(6, 1, 1, 2, bad)


def test_narrow_block_keeps_highest_norm_neurons(tiny_model_dir):
    """The narrowed block computes exactly the full block with the other neurons' outputs removed."""
    from export import ExportConfig
    from export.emulator_width import narrow_block, neuron_scores
    from export.loading import load_model

    model, arch = load_model(str(tiny_model_dir("bert")), ExportConfig(num_labels=2))
    block = model.bert.encoder.layer[1]
    w_in, w_out = block.intermediate.dense.weight.detach().clone(), block.output.dense.weight.detach().clone()
    width = _TINY["inter"] // 4
    keep = torch.topk(neuron_scores(w_in, w_out), width).indices.sort().values
    x = torch.randn(2, 5, _TINY["hidden"])
    with torch.no_grad():
        block.output.dense.weight[:, [j for j in range(_TINY["inter"]) if j not in set(keep.tolist())]] = 0
        expected = block(x)[0]
        narrow_block(block, arch, width)
        got = block(x)[0]
    assert block.intermediate.dense.weight.shape == (width, _TINY["hidden"])
    assert block.output.dense.weight.shape == (_TINY["hidden"], width)
    assert torch.equal(block.intermediate.dense.weight, w_in[keep])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_plugin_parity_with_stock_peft(distilled_bundle, tiny_model_dir, tmp_path):
    """Adapters trained on the distilled emulator, loaded by stock PEFT on the full model, score what
    `deft plugin` reports."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset

    train = tmp_path / "train.tsv"
    train.write_text("".join(SST2_TRAIN.read_text().splitlines(keepends=True)[:129]))
    ev = tmp_path / "eval.tsv"
    ev.write_text("".join(SST2_VALIDATION.read_text().splitlines(keepends=True)[:101]))
    upd = tmp_path / "update.safetensors"
    r = subprocess.run(DEFT + ["device", "train", "--bundle", str(distilled_bundle), "--data", str(train),
                               "--steps", "8", "--lr", "1e-2", "--encoding", "int8", "--out", str(upd),
                               "--no-progress", "--json"], capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    adapter = tmp_path / "adapter"
    r = subprocess.run(DEFT + ["plugin", "--bundle", str(distilled_bundle), "--state", str(upd), "--model",
                               str(tiny_model_dir("bert")), "--out", str(adapter), "--eval-data", str(ev), "--json"],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    rep = last_json(r.stdout)
    assert rep["ok"] and rep["distilled"] and rep["eval_rows"] == 100 and rep["adapter_dir"] == str(adapter)

    b = load_bundle(distilled_bundle)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir("bert")), num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ds = load_dataset(ev, b.manifest, b.tokenizer)
    batch = ds.batch(np.arange(len(ds)))
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(batch["input_ids"]),
                       attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    acc = float((logits.argmax(-1).numpy() == batch["labels"]).mean())
    loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"])))
    assert acc == rep["eval_accuracy"]
    assert abs(loss - rep["eval_loss"]) < 1e-4
    # the device really trained (the parity is not between two untrained models)
    from device_runtime.state import load_state_file
    from device_runtime.weights import initial_tensors

    trained, init = load_state_file(upd), initial_tensors(b)
    assert any(not np.allclose(trained[k], init[k]) for k in trained)


# ----------------------------------------------------------------------------------- bad input


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


@pytest.mark.parametrize("extra,words", [
    (["--distill-data", "DATA"], ["--emulator"]),                                    # no emulator
    (["--emulator", "2,0,2", "--distill-data", "DATA"], ["MIDDLE >= 1"]),           # nothing to distil
    (["--emulator", "1,1,1", "--distill-data", "DATA", "--distill-steps", "0"], ["--distill-steps"]),
    (["--emulator", "1,1,1", "--distill-data", "DATA", "--distill-lr", "-1"], ["--distill-lr"]),
    (["--emulator", "1,1,1", "--distill-data", "DATA", "--distill-batch", "0"], ["--distill-batch"]),
    (["--emulator", "1,1,1", "--distill-data", "DATA", "--distill-warmup", "40"], ["--distill-warmup"]),
    (["--emulator", "1,1,1", "--distill-steps", "10"], ["--distill-data"]),          # option without data
    (["--emulator", "1,1,1", "--distill-data", "MISSING"], ["does not exist"]),
    (["--emulator", "1,1,1", "--distill-data", "EMPTY"], ["no text"]),
    (["--emulator", "1,1,1", "--distill-data", "NOCOL"], ["column"]),
    (["--emulator-middle", "2"], ["--emulator FIRST,MIDDLE,LAST"]),                # layout without emulator
    (["--emulator", "1,1,1", "--emulator-middle", "3"], ["--emulator-middle", "[1, 2]"]),  # not a middle block
    (["--emulator", "1,1,1", "--emulator-middle-width", "0"], ["--emulator-middle-width", "> 0"]),
    (["--emulator", "1,1,1", "--emulator-middle-width", "100000"], ["wider"]),
])
def test_export_distill_bad_input(extra, words, tiny_model_dir, texts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    nocol = tmp_path / "rows.tsv"
    nocol.write_text("review\tscore\ngood film\t1\n")
    subst = {"DATA": str(texts), "MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(empty), "NOCOL": str(nocol)}
    if "--distill-warmup" in extra:
        extra = [*extra, "--distill-steps", "40"]
    args = ["export", "--model", str(tiny_model_dir("bert")), "--num-labels", "2", "--out", str(tmp_path / "b"),
            "--distill-cache", str(tmp_path / "cache"), *[subst.get(a, a) for a in extra]]
    if "--distill-data" not in extra:
        args.remove("--distill-cache")
        args.remove(str(tmp_path / "cache"))
    code, _, err = deft(*args)
    _one_line_error(code, err, *words)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def plugin_inputs(distilled_bundle, tmp_path_factory) -> dict:
    from safetensors.numpy import save_file

    from device_runtime.bundle.load import load_bundle
    from device_runtime.weights import initial_tensors

    root = tmp_path_factory.mktemp("plugin-bad")
    tensors = initial_tensors(load_bundle(distilled_bundle))
    good = root / "state.safetensors"
    save_file(tensors, str(good))
    wrong = root / "wrong.safetensors"
    save_file({"not.a.tensor": np.zeros(2, np.float32)}, str(wrong))
    nan = root / "nan.safetensors"
    save_file({k: np.full_like(v, np.nan) for k, v in tensors.items()}, str(nan))
    junk = root / "junk.bin"
    junk.write_bytes(b"not a payload")
    taken = root / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    return {"BUNDLE": str(distilled_bundle), "STATE": str(good), "WRONG": str(wrong), "NAN": str(nan),
            "JUNK": str(junk), "TAKEN": str(taken), "NOTBUNDLE": str(root), "MISSING": str(root / "missing")}


@pytest.mark.parametrize("args,words", [
    (["--bundle", "NOTBUNDLE", "--state", "STATE"], []),                         # not a bundle
    (["--bundle", "BUNDLE", "--state", "MISSING"], ["does not exist"]),          # no state file
    (["--bundle", "BUNDLE", "--state", "JUNK"], ["junk.bin"]),                  # not a state file
    (["--bundle", "BUNDLE", "--state", "WRONG"], ["not trainable"]),             # another bundle's state
    (["--bundle", "BUNDLE", "--state", "NAN"], ["NaN"]),                         # non-finite values
    (["--bundle", "BUNDLE", "--state", "STATE", "--eval-data", "MISSING"], ["does not exist"]),
    (["--bundle", "BUNDLE", "--state", "STATE", "--model", "MINILM"], ["not the one the bundle"]),
    (["--bundle", "BUNDLE", "--state", "STATE", "--model", "MISSING"], ["--model"]),
])
def test_plugin_bad_input(args, words, plugin_inputs, minilm_path, tmp_path):
    subst = {**plugin_inputs, "MINILM": str(minilm_path)}
    out = tmp_path / "adapter"
    code, _, err = deft("plugin", *[subst.get(a, a) for a in args], "--out", str(out))
    _one_line_error(code, err, *words)
    assert not out.exists()


def test_plugin_refuses_existing_out(plugin_inputs):
    code, _, err = deft("plugin", "--bundle", plugin_inputs["BUNDLE"], "--state", plugin_inputs["STATE"],
                        "--out", plugin_inputs["TAKEN"])
    _one_line_error(code, err, "--force")
    assert (Path(plugin_inputs["TAKEN"]) / "x").read_text() == "x"


def test_distill_data_reader(tmp_path):
    from export.distill_data import read_texts
    from export.errors import ExportError

    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\na fine film \t1\n\t0\nbad\t0\n")
    assert read_texts(tsv) == ["a fine film", "bad"]
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\n two \n")
    assert read_texts(txt) == ["one", "two"]
    with pytest.raises(ExportError, match="--distill-text-column"):
        read_texts(txt, text_column="text")
    assert len(read_texts(DISTILL_TEXT)) == 4000

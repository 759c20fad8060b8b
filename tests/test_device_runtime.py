"""Device runtime on tiny random-model bundles: bundle checks, data, training, state, prediction.

Everything runs the real ONNX Runtime training API on real exported bundles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime.backends import make_backend
from device_runtime.bundle.load import load_bundle
from device_runtime.bundle.verify import bundle_problems
from device_runtime.data import batch_indices, epoch_permutation, load_dataset
from device_runtime.errors import BundleError, DataError, StateError
from device_runtime.evaluate import evaluate
from device_runtime.predict import predict_ensemble, predict_proba
from device_runtime.state import apply_global_state, check_tensors
from device_runtime.train import TrainConfig, lr_at, train
from tests._models import REPO, SST2_TRAIN, SST2_VALIDATION

pytest_plugins = ["tests._device_fixtures"]  # bundles shared by the device tests

FORBIDDEN = ("torch", "transformers", "peft", "onnx", "onnxscript", "optimum")


# ------------------------------------------------------------------------------------------ import


def test_device_runtime_never_imports_torch(tiny_bert_bundle):
    """Import every device module and run a training step in a fresh interpreter: no torch, ever."""
    code = f"""
import sys, json
import device_runtime, device_runtime.cli, device_runtime.train, device_runtime.payload, device_runtime.predict
import onnxruntime
from device_runtime.bundle.load import load_bundle
from device_runtime.data import load_dataset
from device_runtime.train import TrainConfig, train
b = load_bundle({str(tiny_bert_bundle)!r})
ds = load_dataset({str(SST2_TRAIN)!r}, b.manifest, b.tokenizer, limit=32)
r = train(b, ds, TrainConfig(steps=2, batch_size=8, progress=False))
print(json.dumps({{"loaded": sorted({{m.split('.')[0] for m in sys.modules}}), "steps": r.report["steps"],
                  "backend": type(r.backend).__name__}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["steps"] == 2 and info["backend"] == "StepBackend"
    leaked = [m for m in FORBIDDEN if m in info["loaded"]]
    assert leaked == [], f"device runtime imported {leaked}"


def test_deft_device_cli_never_imports_torch():
    code = ("import sys\nfrom deftkit.cli import main\ntry:\n    main(['device', 'train', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    assert "--bundle" in out.stdout
    for m in FORBIDDEN:
        assert f"'{m}'" not in loaded


# ------------------------------------------------------------------------------------------ bundle


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_loads_and_verifies(tiny_bert_bundle):
    b = load_bundle(tiny_bert_bundle)
    assert bundle_problems(tiny_bert_bundle) == []
    assert len(b.hash) == 64 and b.manifest.trainable_names


def test_flipped_byte_names_the_file(tiny_bert_bundle, tmp_path):
    b = _copy(tiny_bert_bundle, tmp_path)
    data = bytearray((b / "step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="step.onnx: sha256 does not match"):
        load_bundle(b)


def test_missing_file_and_broken_manifest(tiny_bert_bundle, tmp_path):
    b = _copy(tiny_bert_bundle, tmp_path)
    (b / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights.safetensors: missing"):
        load_bundle(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(b)
    (b / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(BundleError, match="does not match the bundle schema"):
        load_bundle(b)


# -------------------------------------------------------------------------------------------- data


def test_data_formats_labels_and_skipped_rows(tiny_bert_bundle, tmp_path):
    man = load_bundle(tiny_bert_bundle).manifest
    tok = tiny_bert_bundle / "tokenizer.json"
    names = man.labels
    (tmp_path / "d.tsv").write_text(f"text\tlabel\na fine film\t{names[1]}\n\t1\nbad one\t0\nodd\tmaybe\n"
                                    f"{'word ' * 200}\t1\n")
    ds = load_dataset(tmp_path / "d.tsv", man, tok)
    assert len(ds) == 3 and ds.labels.tolist() == [1, 0, 1]
    assert ds.skipped == {"empty": 1, "unknown_label": 1} and ds.truncated == 1
    assert ds.input_ids.shape[1] == man.max_length and ds.lengths.max() == man.max_length
    ds_skip = load_dataset(tmp_path / "d.tsv", man, tok, long_rows="skip")
    assert len(ds_skip) == 2 and ds_skip.skipped["too_long"] == 1

    (tmp_path / "d.csv").write_text('sentence,label\n"hello, world",1\nnope,0\n')
    csv_ds = load_dataset(tmp_path / "d.csv", man, tok)
    assert csv_ds.texts == ["hello, world", "nope"] and csv_ds.labels.tolist() == [1, 0]

    (tmp_path / "d.jsonl").write_text('{"review": "great", "y": 1}\n{broken\n{"review": "meh", "y": 0}\n')
    js = load_dataset(tmp_path / "d.jsonl", man, tok, text_column="review", label_column="y")
    assert js.labels.tolist() == [1, 0] and js.skipped == {"malformed": 1}


def test_data_bad_inputs(tiny_bert_bundle, tmp_path):
    man = load_bundle(tiny_bert_bundle).manifest
    tok = tiny_bert_bundle / "tokenizer.json"
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.tsv", man, tok)
    (tmp_path / "cols.tsv").write_text("review\tstars\ngood\t1\n")
    with pytest.raises(DataError, match="no text column .*'review', 'stars'.*--text-column"):
        load_dataset(tmp_path / "cols.tsv", man, tok)
    with pytest.raises(DataError, match="no label column"):
        load_dataset(tmp_path / "cols.tsv", man, tok, text_column="review")
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n\t1\n  \t0\nok\t7\n")
    with pytest.raises(DataError, match=r"no usable rows \(empty: 2, unknown_label: 1\)"):
        load_dataset(tmp_path / "empty.tsv", man, tok)


def test_batch_order_is_seeded_and_resumable():
    a = [batch_indices(100, 16, seed=3, step=s) for s in range(14)]
    b = [batch_indices(100, 16, seed=3, step=s) for s in range(14)]
    assert all((x == y).all() for x, y in zip(a, b, strict=False))
    epoch0 = np.concatenate(a[:7])
    assert sorted(epoch0.tolist()) == list(range(100))  # one epoch covers every row once
    assert not (epoch_permutation(100, 3, 0) == epoch_permutation(100, 3, 1)).all()
    assert not (epoch_permutation(100, 3, 0) == epoch_permutation(100, 4, 0)).all()


# ------------------------------------------------------------------------------------------- train


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, schedule="linear", warmup_steps=2)
    assert [round(lr_at(s, 6, cfg), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_at(5, 6, TrainConfig(lr=0.1, schedule="constant")) == 0.1
    assert lr_at(0, 10, TrainConfig(lr=1.0, schedule="cosine")) == pytest.approx(1.0)


def test_training_lowers_loss_and_reports(tiny_bert_bundle):
    b = load_bundle(tiny_bert_bundle)
    ds = load_dataset(SST2_TRAIN, b.manifest, b.tokenizer, limit=32)
    ev = load_dataset(SST2_VALIDATION, b.manifest, b.tokenizer, limit=64)
    before = evaluate(make_backend(b), ds)["loss"]
    r = train(b, ds, TrainConfig(epochs=10, batch_size=8, lr=5e-2, schedule="constant", eval_every=20,
                                 progress=False), ev)
    after = evaluate(r.backend, ds)["loss"]
    rep = r.report
    assert rep["steps"] == 40 and len(rep["train_loss"]) == 40 and rep["samples"] == 10 * 32
    assert after < before - 0.05, (before, after)  # a tiny random model can at least fit 32 rows
    assert [h["step"] for h in rep["eval_history"]] == [20, 40]
    assert 0.0 <= rep["eval_accuracy"] <= 1.0 and rep["median_step_s"] > 0 and rep["peak_rss_mb"] > 50
    changed = [n for n in r.tensors if not np.array_equal(r.tensors[n], r.start_tensors[n])]
    assert set(changed) == set(b.manifest.trainable_names)


def test_causal_lm_trains_on_text_only_file(tiny_gpt2_bundle, tmp_path):
    b = load_bundle(tiny_gpt2_bundle)
    lines = [line.split("\t")[0] for line in SST2_TRAIN.read_text().splitlines()[1:41]]
    (tmp_path / "lm.txt").write_text("\n".join(lines + ["", "   "]) + "\n")
    ds = load_dataset(tmp_path / "lm.txt", b.manifest, b.tokenizer)
    assert len(ds) == 40 and ds.skipped["empty"] == 2
    assert (ds.labels[ds.attention_mask == 0] == -100).all()
    r = train(b, ds, TrainConfig(epochs=4, batch_size=8, lr=1e-2, schedule="constant", progress=False), ds)
    losses = r.report["train_loss"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert 0.0 <= r.report["eval_accuracy"] <= 1.0


# ------------------------------------------------------------------------------------------- state


def test_apply_global_state_roundtrip_and_refusals(tiny_bert_bundle):
    b = load_bundle(tiny_bert_bundle)
    be = make_backend(b)
    rng = np.random.default_rng(0)
    new = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in b.manifest.trainable}
    apply_global_state(be, new)
    got = be.get_tensors()
    assert all(np.array_equal(got[n], new[n]) for n in new)

    name = b.manifest.trainable_names[0]
    wrong_shape = dict(new, **{name: np.zeros((3, 3), np.float32)})
    with pytest.raises(StateError, match="has shape \\(3, 3\\)"):
        apply_global_state(be, wrong_shape)
    nan = dict(new, **{name: np.full(new[name].shape, np.nan, np.float32)})
    with pytest.raises(StateError, match="NaN/Inf"):
        apply_global_state(be, nan)
    with pytest.raises(StateError, match="dtype float64"):
        check_tensors(b.manifest, dict(new, **{name: new[name].astype(np.float64)}))
    with pytest.raises(StateError, match="not trainable in this bundle"):
        check_tensors(b.manifest, dict(new, bogus=np.zeros(1, np.float32)))
    with pytest.raises(StateError, match="missing"):
        check_tensors(b.manifest, {name: new[name]})
    # nothing was written by the refused calls
    assert all(np.array_equal(be.get_tensors()[n], new[n]) for n in new)


# ----------------------------------------------------------------------------------------- predict


def test_prompt_ensemble_averages_probabilities(tiny_prompt_bundle):
    b = load_bundle(tiny_prompt_bundle)
    prompts = [t for t in b.manifest.trainable if t.kind == "prompt"]
    assert prompts, "the soft-prompt bundle has a prompt tensor"
    be = make_backend(b)
    texts = load_dataset(SST2_VALIDATION, b.manifest, b.tokenizer, labelled=False, limit=12)
    rng = np.random.default_rng(1)
    members = [{p.name: rng.standard_normal(p.shape).astype(np.float32) for p in prompts} for _ in range(2)]
    singles = []
    for m in members:
        apply_global_state(be, m, partial=True)
        singles.append(predict_proba(be, texts))
    assert not np.allclose(singles[0], singles[1], atol=1e-4)  # the prompt matters
    own = be.get_tensors()
    ens = predict_ensemble(be, texts, members, weights=[3.0, 1.0])
    np.testing.assert_allclose(ens, 0.75 * singles[0] + 0.25 * singles[1], atol=1e-5)
    np.testing.assert_allclose(ens.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predict_ensemble(be, texts, members, weights=[0.0, 1.0]), singles[1], atol=1e-6)
    assert all(np.array_equal(be.get_tensors()[n], own[n]) for n in own)  # own state restored

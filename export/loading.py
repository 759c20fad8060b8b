"""Load a Hugging Face model and tokenizer for export, offline, with clear errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from export.architectures import Architecture, architecture_for
from export.config import ExportConfig
from export.errors import ExportError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def source_sha256(source: str) -> str:
    """Hash of the weight files of a model directory (identifies exactly which weights were exported)."""
    p = Path(source)
    h = hashlib.sha256()
    found = False
    for name in sorted(os.listdir(p)) if p.is_dir() else []:
        if name.endswith((".safetensors", ".bin")) or name == "config.json":
            found = True
            with open(p / name, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest() if found else "unknown"


def load_config(source: str):
    from transformers import AutoConfig

    _quiet_transformers()
    p = Path(source)
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source and not p.exists()
    if looks_like_path and not p.exists():
        raise ExportError(f"model path '{source}' does not exist; give a model directory or a cached hub id")
    if p.exists() and not (p / "config.json").is_file():
        raise ExportError(f"'{source}' has no config.json; point --model at a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"cannot load model '{source}': not a local directory and not in the offline hub cache "
            f"(HF_HUB_OFFLINE=1) [{type(exc).__name__}]"
        ) from None


def load_model(source: str, cfg: ExportConfig) -> tuple[torch.nn.Module, Architecture]:
    """The task model in eval mode with eager attention (SDPA has no ONNX Runtime gradient)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(source)
    arch = architecture_for(config.model_type, cfg.task)
    torch.manual_seed(cfg.seed)  # the new head's initial weights are part of the bundle: make them reproducible
    kwargs = dict(attn_implementation="eager", torch_dtype=torch.float32)
    try:
        if cfg.task == "seq-cls":
            labels = cfg.label_names
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)}, **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            model.config.use_cache = False
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load weights of '{source}': {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, arch


def load_tokenizer_json(source: str) -> str:
    """The ``tokenizers`` JSON the device tokenizes with (no transformers on the device)."""
    p = Path(source)
    if (p / "tokenizer.json").is_file():
        return (p / "tokenizer.json").read_text()
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, use_fast=True)
        return tok.backend_tokenizer.to_str()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise ExportError(
            f"'{source}' has no usable tokenizer (tokenizer.json or a fast tokenizer is needed): "
            f"{type(exc).__name__}"
        ) from None


def pad_token_id(model: torch.nn.Module, tokenizer_json: str) -> int:
    pid = getattr(model.config, "pad_token_id", None)
    if pid is None:
        import json

        tj = json.loads(tokenizer_json)
        pad = (tj.get("padding") or {}).get("pad_id")
        pid = pad if pad is not None else (getattr(model.config, "eos_token_id", None) or 0)
        if isinstance(pid, list):
            pid = pid[0]
    return int(pid)

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


def _safetensors_index(p: Path) -> dict[str, Path] | None:
    """checkpoint tensor name -> the safetensors file holding it (single file or sharded), or None."""
    import json

    if (p / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(p / "model.safetensors"), framework="pt") as f:
            return {k: p / "model.safetensors" for k in f.keys()}  # noqa: SIM118 - no __iter__
    if (p / "model.safetensors.index.json").is_file():
        weight_map = json.loads((p / "model.safetensors.index.json").read_text()).get("weight_map", {})
        return {k: p / v for k, v in weight_map.items()}
    return None


def load_emulator_blocks(source: str, cfg: ExportConfig, layer_map: list[int]) -> torch.nn.Module | None:
    """The causal LM with only the blocks ``layer_map`` keeps (renumbered 0..k-1), read tensor by tensor
    from its safetensors, so a 1.1B model's 22 blocks are never all in memory when an emulator keeps 6.

    None when the directory cannot be read that way (no safetensors, or names that do not map one to
    one onto the smaller model): the caller then loads the whole model and drops blocks, as before.
    Only for causal LMs: a classification head is new and initialised by ``from_pretrained`` itself."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    p = Path(source)
    where = _safetensors_index(p) if cfg.task == "causal-lm" and p.is_dir() else None
    if where is None:
        return None
    config = load_config(source)
    arch = architecture_for(config.model_type, cfg.task)
    setattr(config, arch.num_layers_attr, len(layer_map))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layer_map]
    config.use_cache = False
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    prefix = arch.blocks_path + "."
    wanted = {}
    for name in model.state_dict():
        src_name = name
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix):].partition(".")
            src_name = f"{prefix}{layer_map[int(idx)]}.{rest}"
        wanted[name] = src_name
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {n for n in wanted if n not in where and n.endswith("lm_head.weight")}
    if any(src not in where for n, src in wanted.items() if n not in tied):
        return None
    own = model.state_dict()  # views of the parameters: filled in place, one tensor read at a time
    handles: dict[Path, object] = {}
    with torch.no_grad():
        for name, src in wanted.items():
            if name not in tied:
                f = handles.get(where[src]) or handles.setdefault(where[src], safe_open(str(where[src]), "pt"))
                own[name].copy_(f.get_tensor(src))
    handles.clear()
    if tied:
        model.tie_weights()
    model.eval()
    return model

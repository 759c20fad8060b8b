"""Random decoders at the sizes people fine-tune on the edge, generated from configs (no hub) and
cached as normal Hugging Face model directories: a TinyLlama-shaped 1.1B Llama and a GPT-2-small-
shaped 124M GPT-2.

The weights are written tensor by tensor in float16 without ever building the model (the module
tree is instantiated on the ``meta`` device for names and shapes only), so generating the 1.1B model
needs about 2.2 GB, not 4.4 GB. Initialisation follows GPT-2's scaled-residual rule (normal(0, 0.02);
the projections that write into the residual stream, ``o_proj`` / ``down_proj`` / ``c_proj``, get
0.02 / sqrt(2 * layers); norms 1, biases 0): with it each random block refines the residual stream
instead of overwriting it, as trained blocks do, so an emulator that drops middle blocks stays close
to the full model, which the plug-in check relies on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

#: TinyLlama-1.1B's shape (https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json)
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
#: GPT-2 small's shape (124M)
GPT2_SMALL = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)

_RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "c_proj.weight")


def cache_root() -> Path:
    return Path(os.environ.get("DEFT_SCALE_CACHE", Path.home() / ".cache" / "deftkit-test"))


def _config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "tinyllama-1.1b":
        return LlamaConfig(**TINYLLAMA)
    if kind == "gpt2-124m":
        return GPT2Config(**GPT2_SMALL)
    raise ValueError(f"unknown scale model {kind!r}; known: tinyllama-1.1b, gpt2-124m")


def _init(name: str, shape: tuple[int, ...], layers: int, gen):
    import torch

    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape, dtype=torch.float16)
    std = 0.02 / math.sqrt(2 * layers) if name.endswith(_RESIDUAL_OUT) else 0.02
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.float16)


def make_scale_model(kind: str, out: Path | None = None) -> Path:
    """The model directory of ``kind`` (config.json, model.safetensors in float16, tokenizer.json),
    generated once (seeded) and reused; written to a temporary sibling and renamed, so never half."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests._models import minilm_dir

    out = Path(out) if out is not None else cache_root() / f"{kind}-random"
    if (out / "model.safetensors").is_file():
        return out
    config = _config(kind)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    layers = config.num_hidden_layers
    gen = torch.Generator().manual_seed(1234)
    tensors = {n: _init(n, s, layers, gen) for n, s in shapes.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.torch_dtype = "float16"
    config.save_pretrained(tmp)
    # ids < 30522 < vocab: the MiniLM WordPiece tokenizer serves (no Llama tokenizer offline)
    shutil.copy(minilm_dir() / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "GENERATED.json").write_text(json.dumps({"kind": kind, "seed": 1234, "by": "tests/_scale_models.py"}))
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    import sys

    for k in sys.argv[1:] or ["tinyllama-1.1b"]:
        print(make_scale_model(k))

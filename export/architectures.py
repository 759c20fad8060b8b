"""What the exporter knows about each supported Hugging Face architecture.

Only the facts the kit needs: where the transformer blocks live (for emulators, per-block ranks and
block-wise training), which modules LoRA targets by default, and the tasks it supports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from export.errors import ExportError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    #: attribute path of the block ModuleList inside the task model (before PEFT wraps it)
    blocks_path: str
    #: config attribute holding the number of blocks
    num_layers_attr: str
    default_lora_targets: tuple[str, ...]
    tasks: frozenset[str]
    #: name of the classification head module (seq-cls)
    head: str | None = None

    def block_regex(self) -> re.Pattern[str]:
        """Matches a parameter name inside block ``i`` (group 1), with or without PEFT's prefixes."""
        return re.compile(r"(?:^|\.)" + re.escape(self.blocks_path) + r"\.(\d+)\.")


_ENCODER_TASKS = frozenset({"seq-cls"})
_DECODER_TASKS = frozenset({"causal-lm"})

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", "bert.encoder.layer", "num_hidden_layers", ("query", "value"), _ENCODER_TASKS,
                         "classifier"),
    "roberta": Architecture("roberta", "roberta.encoder.layer", "num_hidden_layers", ("query", "value"),
                            _ENCODER_TASKS, "classifier"),
    "xlm-roberta": Architecture("xlm-roberta", "roberta.encoder.layer", "num_hidden_layers", ("query", "value"),
                                _ENCODER_TASKS, "classifier"),
    "gpt2": Architecture("gpt2", "transformer.h", "n_layer", ("c_attn",), _DECODER_TASKS),
    "llama": Architecture("llama", "model.layers", "num_hidden_layers", ("q_proj", "v_proj"), _DECODER_TASKS),
    "mistral": Architecture("mistral", "model.layers", "num_hidden_layers", ("q_proj", "v_proj"), _DECODER_TASKS),
    "qwen2": Architecture("qwen2", "model.layers", "num_hidden_layers", ("q_proj", "v_proj"), _DECODER_TASKS),
}


def architecture_for(model_type: str, task: str) -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if task not in arch.tasks:
        raise ExportError(
            f"task '{task}' is not supported for '{model_type}' models; use --task {'/'.join(sorted(arch.tasks))}"
        )
    return arch


def get_module(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_module(root, path: str, value) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, attr, value)

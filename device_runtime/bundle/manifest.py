"""``manifest.json``: the schema of a device bundle.

It lives in ``device_runtime`` (the lightest part) because the writer (``export``), the device and
the edge all read it. Everything a device needs to train, and everything the edge needs to plug the
trained tensors back into the full model, is recorded here, so no party has to look into the graphs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: 2: step-graph bundles (one standard ONNX graph per training step, weights in safetensors) and the
#: optional ``ort-training`` format; 1 (ONNX Runtime training artifacts only) is refused
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
STEP_GRAPH = "step.onnx"
EVAL_GRAPH = "eval.onnx"

BundleFormat = Literal["step", "ort-training"]

#: Files every bundle of a format has (besides the manifest); ``files`` in the manifest hashes all of them.
FORMAT_FILES: dict[str, tuple[str, ...]] = {
    "step": (STEP_GRAPH, EVAL_GRAPH, WEIGHTS_FILE, "inference.onnx", "tokenizer.json"),
    "ort-training": ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                     "inference.onnx", "tokenizer.json"),
}
BUNDLE_FILES = FORMAT_FILES["step"]

Task = Literal["seq-cls", "causal-lm"]
PeftMethod = Literal["lora", "prompt", "head", "lora+prompt", "lora+head", "prompt+head", "lora+prompt+head"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One trainable tensor: its name is the PEFT/state-dict name, used in the graphs, the
    checkpoint, update payloads and the PEFT adapter file alike (with ``.default`` stripped there)."""

    name: str
    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"
    #: index of the transformer block in the *emulator* (None: not in a block, e.g. head or prompt)
    block: int | None = None
    #: role of the tensor: lora_A / lora_B / prompt / head / other
    kind: Literal["lora_A", "lora_B", "prompt", "head", "other"] = "other"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class DistillSettings(_Strict):
    """The knobs of an emulator distillation run (``export.distill.distill_middle`` takes them)."""

    steps: int
    lr: float
    batch_size: int
    max_length: int
    warmup_steps: int
    seed: int


class DistillSpec(DistillSettings):
    """How an emulator's middle blocks were distilled from the full model's (Offsite-Tuning), so a
    user can tell a distilled emulator from a layer-dropped one and repeat the run (with its settings)."""

    data: str
    data_sha256: str
    rows: int
    #: normalised KD loss on the last middle block's output, first and last logged value
    kd_loss_initial: float
    kd_loss_final: float
    #: cache key: sha256 over (model, layout, data, settings)
    key: str


class EmulatorSpec(_Strict):
    """Which original blocks the (possibly compressed) model keeps.

    ``layer_map[i]`` is the index in the full model of emulator block ``i``. Blocks in
    ``adapter_blocks`` are the trainable region (first ``l`` and last ``r``); the others are frozen
    middle blocks kept uniformly (Offsite-Tuning / FedPEAT).
    """

    num_layers_full: int
    layer_map: list[int]
    adapter_blocks: list[int]
    is_full: bool
    #: set when the middle blocks were distilled from the full model's (None: kept as they are)
    distillation: DistillSpec | None = None
    #: FFN width of the middle blocks when narrowed (``--emulator-middle-width``; None: the model's)
    middle_width: int | None = None

    @model_validator(mode="after")
    def _check(self) -> EmulatorSpec:
        if not self.layer_map:
            raise ValueError("emulator keeps no blocks")
        if any(not 0 <= i < self.num_layers_full for i in self.layer_map):
            raise ValueError("layer_map has an index outside the full model")
        if any(not 0 <= b < len(self.layer_map) for b in self.adapter_blocks):
            raise ValueError("adapter_blocks has an index outside the emulator")
        return self


class PeftSpec(_Strict):
    """The PEFT parts attached, in terms a user knows from ``peft``."""

    method: PeftMethod
    lora_target_modules: list[str] = Field(default_factory=list)
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    #: LoRA rank per emulator block (index -> rank); blocks absent have no LoRA.
    lora_ranks: dict[int, int] = Field(default_factory=dict)
    num_virtual_tokens: int = 0
    #: modules saved in full (the classification head)
    modules_to_save: list[str] = Field(default_factory=list)
    #: emulator blocks whose tensors are trainable in this bundle (None: all that have PEFT parts)
    trainable_blocks: list[int] | None = None
    #: the peft config dict for the FULL model (what adapter_config.json will say after plug-in)
    peft_config: dict = Field(default_factory=dict)


class StepSpec(_Strict):
    """The step-graph format's graphs (contract: ``device_runtime/step_contract.py``)."""

    #: one whole optimizer step: (batch, lr, step, tensors, moments) -> (loss, new tensors, new moments)
    train_graph: str = STEP_GRAPH
    #: (batch, trainable tensors) -> (loss, logits)
    eval_graph: str = EVAL_GRAPH
    #: graph file -> the frozen weights it declares external, given from ``weights.safetensors``
    external: dict[str, list[str]] = Field(default_factory=dict)
    #: K > 0: the bundle also has the prompt-ensemble step graph (``step_contract.ENSEMBLE_GRAPH``, an
    #: extra) that trains K mixing weights (+ the head) over K pool prompts given as an input
    ensemble_size: int = Field(0, ge=0)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    #: ``step`` (default: plain onnxruntime trains it) or ``ort-training`` (ONNX Runtime training artifacts)
    format: BundleFormat = "step"
    step: StepSpec | None = None
    kit_version: str
    created_utc: str
    source_model: str
    source_model_sha256: str
    architecture: str
    model_type: str
    task: Task
    labels: list[str] = Field(default_factory=list)
    max_length: int
    #: graph input names, in order, excluding the label input (e.g. input_ids, attention_mask)
    inputs: list[str]
    #: name of the label input in training/eval graphs
    label_input: str = "labels"
    #: output names of the eval graph: the loss first, then the logits
    eval_outputs: list[str]
    pad_token_id: int
    emulator: EmulatorSpec
    peft: PeftSpec
    trainable: list[TensorSpec]
    #: per emulator block: trainable parameter count in this bundle
    block_params: dict[int, int]
    params_total: int
    params_trainable: int
    opset: int
    ir_version: int
    optimizer: Literal["adamw"] = "adamw"
    #: the training graph applies the model's dropout (and LoRA dropout); the eval graph never does
    dropout: bool = False
    #: storage dtype of the frozen weights in ``weights.safetensors`` (trainable tensors are always
    #: float32); ``float16``: the graphs cast each use to float32 (``export/frozen_storage.py``)
    frozen_dtype: Literal["float32", "float16"] = "float32"
    #: initializers of ``inference.onnx`` that carry no bytes there: ONNX Runtime is given them from
    #: the checkpoint at load time (``device_runtime.inference``). Empty: the graph holds its weights
    inference_external: list[str] = Field(default_factory=list)
    #: relative file name -> sha256 hex of every file in the bundle except the manifest
    files: dict[str, str]
    #: optional extra artifacts (e.g. ``inference.int8.onnx``, ...)
    extras: list[str] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v == 1:
            raise ValueError(
                "bundle schema version 1 (ONNX Runtime training artifacts, deftkit <= 0.1) is not read by this "
                f"kit (expects {SCHEMA_VERSION}); re-export it with `deft export` (step graph), or "
                "`deft export --format ort-training` for the training-API format"
            )
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"bundle schema version {v} is not supported by this kit (expects {SCHEMA_VERSION}); "
                "re-export the bundle with a matching deftkit version"
            )
        return v

    @model_validator(mode="after")
    def _format_parts(self) -> Manifest:
        if self.format == "step" and self.step is None:
            raise ValueError("a step-graph bundle needs its step section")
        return self

    @property
    def required_files(self) -> tuple[str, ...]:
        return FORMAT_FILES[self.format]

    @property
    def trainable_names(self) -> list[str]:
        return [t.name for t in self.trainable]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.trainable:
            if t.name == name:
                return t
        raise KeyError(name)

    def bundle_hash(self) -> str:
        """A short identity of the bundle: sha256 over the sorted file hashes."""
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self.files):
            h.update(f"{k}:{self.files[k]}\n".encode())
        return h.hexdigest()

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST_NAME
        return cls.model_validate(json.loads(path.read_text()))

    def dump(self, bundle_dir: str | Path) -> None:
        (Path(bundle_dir) / MANIFEST_NAME).write_text(self.model_dump_json(indent=2))

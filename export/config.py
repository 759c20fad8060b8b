"""What to export: one pydantic model shared by the CLI and the Python API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

PeftChoice = Literal["lora", "prompt", "head", "lora+prompt"]


class EmulatorConfig(BaseModel):
    """Keep the first ``first`` and last ``last`` blocks (trainable) and ``middle`` frozen middle blocks."""

    model_config = ConfigDict(extra="forbid")
    first: int = 2
    middle: int = 0
    last: int = 2
    #: which middle blocks to keep (original depths, ``--emulator-middle``); None: uniformly spaced
    middle_blocks: list[int] | None = None
    #: FFN width of the middle blocks (``--emulator-middle-width``): the highest-norm neurons are kept
    middle_width: int | None = None


class DistillConfig(BaseModel):
    """Distil the emulator's middle blocks from the full model's on unlabelled text (``export.distill``)."""

    model_config = ConfigDict(extra="forbid")
    #: unlabelled public text: one sentence a line (.txt) or a .tsv/.csv text column; never device data
    data: str
    text_column: str | None = None
    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 32
    #: token length of distillation rows (None: the export's --max-length)
    max_length: int | None = None
    warmup_steps: int = 30
    seed: int = 0
    #: where distilled middles are cached (None: $DEFT_CACHE_DIR/distill or ~/.cache/deftkit/distill)
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        from export.errors import ExportError

        if self.steps <= 0:
            raise ExportError(f"--distill-steps must be > 0 (got {self.steps})")
        if not self.lr > 0:
            raise ExportError(f"--distill-lr must be > 0 (got {self.lr})")
        if self.batch_size <= 0:
            raise ExportError(f"--distill-batch must be > 0 (got {self.batch_size})")
        if self.max_length is not None and self.max_length <= 1:
            raise ExportError(f"--distill-max-length must be > 1 (got {self.max_length})")
        if not 0 <= self.warmup_steps < self.steps:
            raise ExportError(f"--distill-warmup must be in [0, --distill-steps) (got {self.warmup_steps})")
        return self


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    num_labels: int | None = None
    labels: list[str] | None = None
    peft: PeftChoice = "lora"
    #: train the classification head (seq-cls only)
    head: bool = True
    lora_r: int = 8
    lora_alpha: float | None = None  # default: 2 * r of the block (PEFT's common choice)
    lora_dropout: float = 0.0
    #: train with dropout: the model's own (hidden/attention, from its config) and ``lora_dropout``. The
    #: training graph is then exported in training mode (ONNX Runtime's eval graph turns it off). Off
    #: by default: a step is then a pure function of the batch and the weights, which the parity tests
    #: and the bit-exact resume after a kill rely on
    dropout: bool = False
    lora_targets: list[str] | None = None  # default: the architecture's attention query/value
    #: explicit LoRA rank per (emulator) block; 0 = no LoRA in that block
    lora_ranks: list[int] | None = None
    #: (min, max): LoRA ranks growing linearly with depth over the adapter blocks (DEFT per-block size)
    rank_schedule: tuple[int, int] | None = None
    num_virtual_tokens: int = 8
    #: K > 0 (soft prompts only): also export the prompt-ensemble step graph over K pool prompts
    prompt_pool: int = 0
    #: emulator blocks whose tensors are trainable (None = all)
    trainable_blocks: list[int] | None = None
    emulator: EmulatorConfig | None = None
    #: distil the emulator's middle blocks from the full model's (needs an emulator with middle blocks)
    distill: DistillConfig | None = None
    max_length: int = 64
    opset: int = 17
    seed: int = 0
    quantize_inference: bool = False
    #: ``step``: one standard ONNX graph per training step (plain onnxruntime trains it, the default);
    #: ``ort-training``: ONNX Runtime training artifacts, for runtimes with the training API
    format: Literal["step", "ort-training"] = "step"
    #: storage dtype of the frozen weights in ``weights.safetensors``; ``float16`` halves the bundle and
    #: the device's weight memory, computation stays float32 (``export/frozen_storage.py``)
    frozen_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("emulator", mode="before")
    @classmethod
    def _emulator_tuple(cls, v):
        """Accept ``(first, middle, last)`` as the CLI's ``--emulator 2,0,2`` does."""
        if isinstance(v, (tuple, list)):
            if len(v) != 3:
                from export.errors import ExportError

                raise ExportError(f"--emulator takes FIRST,MIDDLE,LAST (three numbers), got {list(v)}")
            return {"first": v[0], "middle": v[1], "last": v[2]}
        return v

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        from export.errors import ExportError

        if self.lora_r <= 0:
            raise ExportError(f"LoRA rank must be > 0 (got --lora-r {self.lora_r})")
        if self.lora_ranks is not None and any(r < 0 for r in self.lora_ranks):
            raise ExportError(f"per-block LoRA ranks must be >= 0 (got {self.lora_ranks})")
        if self.lora_ranks is not None and not any(self.lora_ranks) and "lora" in self.peft:
            raise ExportError("every per-block LoRA rank is 0: give at least one block a rank > 0")
        if self.rank_schedule is not None and (min(self.rank_schedule) <= 0):
            raise ExportError(f"--rank-schedule ranks must be > 0 (got {self.rank_schedule})")
        if self.rank_schedule is not None and self.lora_ranks is not None:
            raise ExportError("give either --lora-ranks or --rank-schedule, not both")
        if self.lora_dropout and not self.dropout:
            raise ExportError(f"--lora-dropout {self.lora_dropout} has no effect without --dropout (training graphs "
                              "are exported without dropout unless asked): add --dropout or drop --lora-dropout")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ExportError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.max_length <= 1:
            raise ExportError(f"--max-length must be > 1 (got {self.max_length})")
        emu = self.emulator
        if emu is not None and emu.middle_width is not None and (emu.middle == 0 or emu.middle_width <= 0):
            raise ExportError(f"--emulator-middle-width {emu.middle_width} narrows the emulator's middle blocks: give "
                              "a width > 0 and --emulator FIRST,MIDDLE,LAST with MIDDLE >= 1")
        if self.distill is not None and (self.emulator is None or self.emulator.middle == 0):
            raise ExportError("--distill-data distils an emulator's middle blocks: give --emulator FIRST,MIDDLE,LAST "
                              "with MIDDLE >= 1 (e.g. --emulator 1,2,1)")
        if self.frozen_dtype != "float32" and self.format != "step":
            raise ExportError(f"--frozen-dtype {self.frozen_dtype} needs the step format (drop --format {self.format} "
                              "or use --frozen-dtype float32)")
        if self.task == "seq-cls":
            if self.labels is not None and len(self.labels) < 2:
                raise ExportError("--labels needs at least two names, e.g. --labels negative,positive")
            if self.labels is not None and len(set(self.labels)) != len(self.labels):
                raise ExportError(f"--labels has duplicate names: {self.labels}")
            if self.labels is None and (self.num_labels is None or self.num_labels < 2):
                raise ExportError("sequence classification needs --num-labels N (N >= 2) or --labels A,B,...")
            if self.labels is not None and self.num_labels is not None and self.num_labels != len(self.labels):
                raise ExportError("--num-labels and --labels disagree; give one of them")
        if self.task == "causal-lm" and "prompt" in self.peft:
            raise ExportError("soft prompts are supported for --task seq-cls; use --peft lora for causal LMs")
        if self.num_virtual_tokens <= 0 and "prompt" in self.peft:
            raise ExportError("soft prompt tuning needs --prompt-tokens > 0")
        if self.prompt_pool < 0 or (self.prompt_pool and (self.peft != "prompt" or self.format != "step")):
            raise ExportError(f"--prompt-pool {self.prompt_pool}: a prompt ensemble needs K >= 1 pool prompts, "
                              "--peft prompt and the step format")
        return self

    @property
    def label_names(self) -> list[str]:
        if self.task != "seq-cls":
            return []
        if self.labels is not None:
            return list(self.labels)
        return [str(i) for i in range(self.num_labels or 0)]

"""A distilled emulator for export: read the data, distil (or take the cached result), load it.

Called by ``build_peft_model`` before the emulator drops blocks, while the full middle (the
teacher) is still there: the distilled weights are written into the full model's blocks that the
emulator keeps as its middle, so dropping the others leaves the distilled emulator. The first and
last (adapter) blocks, the embeddings and the head are left exactly as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from device_runtime.bundle.manifest import DistillSpec, EmulatorSpec
from export import distill_cache
from export.architectures import Architecture, get_module
from export.config import ExportConfig
from export.distill import DistillResult, DistillSettings, backbone, distill_middle, tokenize
from export.distill_data import file_sha256, read_texts
from export.emulator_width import narrow_blocks
from export.errors import ExportError


def middle_depths(cfg: ExportConfig, spec: EmulatorSpec) -> list[int]:
    """Original depths of the emulator's middle blocks."""
    assert cfg.emulator is not None
    return spec.layer_map[cfg.emulator.first: len(spec.layer_map) - cfg.emulator.last]


def distill_emulator(model: torch.nn.Module, arch: Architecture, spec: EmulatorSpec, cfg: ExportConfig,
                     tokenizer_json: str | None = None, progress: Callable[[str], None] | None = None
                     ) -> EmulatorSpec:
    """Distil the middle of ``spec`` into ``model``'s blocks (mutated); returns ``spec`` with the record."""
    d, emu = cfg.distill, cfg.emulator
    assert d is not None and emu is not None, "ExportConfig requires an emulator for distillation"
    middle = middle_depths(cfg, spec)
    texts = read_texts(d.data, d.text_column)
    settings = DistillSettings(steps=d.steps, lr=d.lr, batch_size=d.batch_size,
                               max_length=d.max_length or cfg.max_length, warmup_steps=d.warmup_steps, seed=d.seed)
    layout = {"model_type": model.config.model_type, "num_layers": spec.num_layers_full,
              "layer_map": spec.layer_map, "first": emu.first, "last": emu.last}
    if emu.middle_width is not None:  # (absent otherwise: the keys of full-width middles stay as they were)
        layout["middle_width"] = emu.middle_width
    data_sha = file_sha256(d.data)
    key = distill_cache.cache_key(
        distill_cache.tensors_sha256(list(backbone(model, arch).state_dict().items())), layout, data_sha,
        {**settings.model_dump(), "text_column": d.text_column})
    cache_dir = Path(d.cache_dir) if d.cache_dir else distill_cache.default_cache_dir()
    result = distill_cache.load(cache_dir, key)
    if result is None:
        result = _run(model, arch, emu.first, emu.last, middle, emu.middle_width, texts, settings, tokenizer_json,
                      progress)
        distill_cache.store(cache_dir, key, result)
    elif progress is not None:
        progress(f"distilled emulator from the cache ({cache_dir})")
    blocks = get_module(model, arch.blocks_path)
    narrow_blocks([blocks[i] for i in middle], arch, emu.middle_width)  # the student's shapes
    torch.nn.ModuleList([blocks[i] for i in middle]).load_state_dict(result.state)
    record = DistillSpec(data=str(d.data), data_sha256=data_sha, rows=result.rows, **settings.model_dump(),
                         kd_loss_initial=result.kd_loss_initial, kd_loss_final=result.kd_loss_final, key=key)
    return spec.model_copy(update={"distillation": record})


def _run(model, arch, first, last, middle, width, texts, settings, tokenizer_json, progress) -> DistillResult:
    from export.loading import load_tokenizer_json, pad_token_id

    if tokenizer_json is None:
        source = getattr(model.config, "_name_or_path", "")
        if not source or not Path(source).is_dir():
            raise ExportError("distilling an in-memory model needs tokenizer_json= (the tokenizer of its texts)")
        tokenizer_json = load_tokenizer_json(source)
    rows = tokenize(tokenizer_json, texts, settings.max_length)
    pad_id = pad_token_id(model, tokenizer_json)
    if progress is not None:
        def on_step(step: int, total: int, loss: float) -> None:
            if step == 1 or step % 10 == 0 or step == total:
                progress(f"distilling the emulator's middle blocks {middle}: step {step}/{total}, KD loss {loss:.4f}")

        return distill_middle(model, arch, first, last, middle, rows, pad_id, settings, on_step, width)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("distilling {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("KD loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(f"middle blocks {middle}", total=settings.steps, loss=float("nan"))
        return distill_middle(model, arch, first, last, middle, rows, pad_id, settings,
                              lambda s, _t, loss: bar.update(task, completed=s, loss=loss), width)

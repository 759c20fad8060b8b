"""``export_bundle``: Hugging Face model -> emulator -> PEFT -> ONNX step graph -> device bundle."""

from __future__ import annotations

import copy
import datetime as _dt
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file as save_safetensors

from deftkit import __version__
from device_runtime.bundle.manifest import (
    EVAL_GRAPH,
    STEP_GRAPH,
    WEIGHTS_FILE,
    EmulatorSpec,
    Manifest,
    StepSpec,
    TensorSpec,
)
from device_runtime.step_contract import ENSEMBLE_GRAPH
from device_runtime.weights import safetensors_offsets
from export import frozen_storage, onnx_graph
from export import step_graph as step_graph_mod
from export.architectures import Architecture, architecture_for, get_module
from export.bundle_writer import check_destination, finalize, staging_dir
from export.config import ExportConfig
from export.emulator import apply_emulator, full_spec, select_layers
from export.errors import ExportError
from export.loading import (
    load_config,
    load_emulator_blocks,
    load_model,
    load_tokenizer_json,
    pad_token_id,
    source_sha256,
)
from export.peft_setup import attach_peft, peft_spec, trainable_specs

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def emulator_spec(config: Any, arch: Architecture, cfg: ExportConfig) -> EmulatorSpec:
    """Which blocks the export keeps (all without ``cfg.emulator``)."""
    n_full = getattr(config, arch.num_layers_attr)
    if cfg.emulator is not None:
        return select_layers(n_full, cfg.emulator.first, cfg.emulator.last, cfg.emulator.middle,
                             cfg.emulator.middle_blocks)
    return full_spec(n_full)


def build_peft_model(model: torch.nn.Module, arch: Architecture, cfg: ExportConfig, *,
                     tokenizer_json: str | None = None, progress: Progress | None = None,
                     applied: EmulatorSpec | None = None,
                     ) -> tuple[torch.nn.Module, EmulatorSpec, list[TensorSpec], Any]:
    """Emulator + PEFT on ``model`` (mutated). Returns the PEFT model, the layer map, the trainable
    tensors and the PEFT config for the full model. Tests build their torch reference with this too.
    ``tokenizer_json`` / ``progress`` serve emulator distillation (``cfg.distill``); ``applied``: the
    emulator ``model`` already is (loaded with only its blocks, ``loading.load_emulator_blocks``)."""
    if applied is not None:
        spec = applied
    else:
        spec = emulator_spec(model.config, arch, cfg)
        if cfg.distill is not None:  # before blocks are dropped: the full middle is the teacher
            from export.distilled_emulator import distill_emulator

            spec = distill_emulator(model, arch, spec, cfg, tokenizer_json, progress)
        elif cfg.emulator is not None and cfg.emulator.middle_width is not None:
            from export.distilled_emulator import middle_depths
            from export.emulator_width import narrow_blocks

            blocks = get_module(model, arch.blocks_path)
            narrow_blocks([blocks[i] for i in middle_depths(cfg, spec)], arch, cfg.emulator.middle_width)
        if cfg.emulator is not None and cfg.emulator.middle_width is not None:
            spec = spec.model_copy(update={"middle_width": cfg.emulator.middle_width})
        apply_emulator(model, arch, spec)
    # the adapters' random initial tensors (LoRA A, prompts) are part of the bundle: drawn from cfg.seed
    # here, so they do not depend on how the model was loaded (whole, or block by block, which draws
    # nothing) or on what distillation drew before
    torch.manual_seed(cfg.seed)
    pm, full_cfg = attach_peft(model, arch, cfg, spec)
    specs = trainable_specs(pm, arch, cfg.trainable_blocks, len(spec.layer_map))
    pm.eval()
    return pm, spec, specs, full_cfg


def weight_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every float32 parameter and buffer of ``model`` by state-dict name: ``weights.safetensors``."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype == torch.float32:
            out[name] = t.detach().cpu().contiguous().numpy().copy()
    return out


def _load(source: str, cfg: ExportConfig) -> tuple[torch.nn.Module, Architecture, EmulatorSpec | None]:
    """The model to export; an emulator without distillation reads only the blocks it keeps."""
    if cfg.emulator is not None and cfg.distill is None and cfg.emulator.middle_width is None:
        arch = architecture_for(load_config(source).model_type, cfg.task)
        spec = emulator_spec(load_config(source), arch, cfg)
        partial = load_emulator_blocks(source, cfg, spec.layer_map)
        if partial is not None:
            return partial, arch, spec
    hf, arch = load_model(source, cfg)
    return hf, arch, None


def export_bundle(
    model: str | os.PathLike | torch.nn.Module,
    out: str | Path,
    config: ExportConfig | None = None,
    *,
    force: bool = False,
    tokenizer_json: str | None = None,
    source_id: str | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> Manifest:
    """Export ``model`` (a directory / cached hub id, or an in-memory ``transformers`` model, which is
    copied, not modified) to a device bundle at ``out``. Options are :class:`ExportConfig` fields."""
    say = progress or _noop
    if config is not None and options:
        raise TypeError("give either config= or keyword options, not both")
    if config is None:
        config = ExportConfig(**options)
    cfg = config
    out = Path(out)
    check_destination(out, force)

    say("loading model")
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    applied = None
    if isinstance(model, str):
        hf, arch, applied = _load(model, cfg)
        tok = load_tokenizer_json(model)
        src, src_sha = model, source_sha256(model)
    else:
        if tokenizer_json is None:
            raise ExportError("an in-memory model needs tokenizer_json= (the tokenizers JSON the device will use)")
        arch = architecture_for(model.config.model_type, cfg.task)
        hf = copy.deepcopy(model).eval()
        tok = tokenizer_json
        src, src_sha = source_id or getattr(model.config, "_name_or_path", "") or "in-memory", "in-memory"

    say("attaching emulator and PEFT")
    pm, spec, specs, full_cfg = build_peft_model(hf, arch, cfg, tokenizer_json=tok, progress=progress,
                                                 applied=applied)
    names = [s.name for s in specs]
    vocab = int(hf.config.vocab_size)
    n_virtual = cfg.num_virtual_tokens if "prompt" in cfg.peft else 0

    # the TorchScript graphs first: symbolic tracing of the step can leave traced state in PEFT's modules
    say("exporting inference graph")
    infer_graph = onnx_graph.prepare_graph(onnx_graph.export_inference_graph(pm, cfg.task, cfg.opset, vocab), names)
    # the step format takes every graph's weights from weights.safetensors: drop the bytes now (pointed at
    # the file once it is written), or each graph would hold a copy of the model until then (3 x 1.6 GB
    # for a 1.1B model's 2,2,2 emulator); int8 quantization still needs the inference graph's
    held = {n: tuple(t.shape) for n, t in [*pm.named_parameters(), *pm.named_buffers()] if t.dtype == torch.float32}
    if cfg.format == "step" and not cfg.quantize_inference:
        onnx_graph.strip_weights(infer_graph, held)
    if cfg.format == "step":
        say("exporting eval graph")
        eval_graph = onnx_graph.initializers_to_inputs(onnx_graph.prepare_graph(
            onnx_graph.export_training_graph(pm, cfg.task, n_virtual, cfg.opset, vocab), names), names)
        onnx_graph.strip_weights(eval_graph, held)
        weights = weight_arrays(pm)  # before tracing, which may leave traced tensors behind in PEFT's modules
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        frozen = frozen_storage.stored_frozen(weights, {n for n, _ in pm.named_parameters()}, names)
        weights = frozen_storage.stored_weights(weights, frozen, cfg.frozen_dtype)  # stored dtype now: half held
        say("tracing the training step (forward, backward, AdamW)")
        step_graph = step_graph_mod.export_step_graph(pm, cfg.task, n_virtual, cfg.opset, vocab, names,
                                                      dropout=cfg.dropout)
        ensemble_graph = None
        if cfg.prompt_pool:
            say(f"tracing the prompt-ensemble step ({cfg.prompt_pool} pool prompts)")
            prompt_name = next(s.name for s in specs if s.kind == "prompt")
            ensemble_graph = step_graph_mod.export_step_graph(pm, cfg.task, n_virtual, cfg.opset, vocab, names,
                                                              dropout=cfg.dropout, ensemble=cfg.prompt_pool,
                                                              prompt=prompt_name)
        ir_version, opset = int(step_graph.ir_version), max(cfg.opset, 18)
    else:
        say("exporting training graph")
        train_graph = onnx_graph.prepare_graph(
            onnx_graph.export_training_graph(pm, cfg.task, n_virtual, cfg.opset, vocab, dropout=cfg.dropout), names)
        ir_version, opset = int(train_graph.ir_version), cfg.opset

    with staging_dir(out) as tmp:
        step_spec = None
        if cfg.format == "step":
            say("writing step graph and weights")
            save_safetensors(weights, str(tmp / WEIGHTS_FILE))
            del weights
            locate = {k: (WEIGHTS_FILE, off, length)
                      for k, (off, length) in safetensors_offsets(tmp / WEIGHTS_FILE).items()}
            graphs = {STEP_GRAPH: step_graph, EVAL_GRAPH: eval_graph}
            if ensemble_graph is not None:
                graphs[ENSEMBLE_GRAPH] = ensemble_graph
            external = {name: onnx_graph.strip_weights(graph, shapes, locate) for name, graph in graphs.items()}
            step_spec = StepSpec(external=external, ensemble_size=cfg.prompt_pool)
            for name, graph in graphs.items():
                frozen_storage.cast_per_use(graph, frozen & set(external[name]), cfg.frozen_dtype)
                onnx.save(graph, str(tmp / name))
        else:
            say("generating ONNX Runtime training artifacts")
            from export import training_artifacts

            training_artifacts.generate(train_graph, names, tmp)
            shapes = training_artifacts.checkpoint_shapes(tmp / "checkpoint")
            locate = None
        (tmp / "tokenizer.json").write_text(tok)
        extras: list[str] = [ENSEMBLE_GRAPH] if cfg.format == "step" and cfg.prompt_pool else []
        if cfg.quantize_inference:
            say("quantizing inference graph to int8")
            from export.quantize import quantize_int8

            with tempfile.TemporaryDirectory() as full:  # int8 needs the float weights; they stay out of the bundle
                onnx.save(infer_graph, str(Path(full) / "inference.onnx"))
                quantize_int8(Path(full) / "inference.onnx", tmp / "inference.int8.onnx")
            extras.append("inference.int8.onnx")
        # the inference graph takes its weights from the bundle's weights at load time: shipped once, not twice
        external = onnx_graph.strip_weights(infer_graph, shapes, locate)
        if cfg.format == "step":
            frozen_storage.cast_per_use(infer_graph, frozen & set(external), cfg.frozen_dtype)
        onnx.save(infer_graph, str(tmp / "inference.onnx"))

        block_params = {i: 0 for i in range(len(spec.layer_map))}
        for s in specs:
            if s.block is not None:
                block_params[s.block] += s.numel
        total = sum(p.numel() for p in pm.parameters())

        def make_manifest(files: dict[str, str]) -> Manifest:
            return Manifest(
                kit_version=__version__,
                created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                source_model=str(src),
                source_model_sha256=src_sha,
                architecture=type(hf).__name__,
                model_type=hf.config.model_type,
                task=cfg.task,
                labels=cfg.label_names,
                max_length=cfg.max_length,
                inputs=["input_ids", "attention_mask"],
                label_input="labels",
                eval_outputs=["loss", "logits"],
                pad_token_id=pad_token_id(hf, tok),
                emulator=spec,
                peft=peft_spec(cfg, arch, spec, full_cfg),
                trainable=specs,
                block_params=block_params,
                params_total=int(total),
                params_trainable=int(sum(s.numel for s in specs)),
                opset=opset,
                ir_version=ir_version,
                format=cfg.format,
                step=step_spec,
                dropout=cfg.dropout,
                frozen_dtype=cfg.frozen_dtype,
                inference_external=external,
                files=files,
                extras=extras,
            )

        say("hashing and writing manifest")
        return finalize(tmp, out, make_manifest, force)

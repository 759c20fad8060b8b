"""``deft export``: a Hugging Face model to a device bundle."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console

from device_runtime.errors import first_error
from export.errors import ExportError


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ExportError(f"{what} takes comma-separated integers, got '{text}'") from None


def _emulator(emulator: str | None, middle: str | None, width: int | None) -> list[int] | dict | None:
    """``--emulator F,M,L`` (+ ``--emulator-middle``, ``--emulator-middle-width``) as ExportConfig takes it."""
    emu = _ints(emulator, "--emulator")
    if middle is None and width is None:
        return emu
    if emu is None or len(emu) != 3:
        given = "--emulator-middle" if middle is not None else "--emulator-middle-width"
        raise ExportError(f"{given} shapes an emulator: add --emulator FIRST,MIDDLE,LAST (e.g. --emulator 1,2,1)")
    return {"first": emu[0], "middle": emu[1], "last": emu[2], "middle_blocks": _ints(middle, "--emulator-middle"),
            "middle_width": width}


def _strs(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _schedule(text: str, n_hint: int | None = None) -> tuple[int, int]:
    try:
        kind, lo, hi = text.split(":")
        if kind != "linear":
            raise ValueError(kind)
        return int(lo), int(hi)
    except ValueError:
        raise ExportError(f"--rank-schedule takes linear:MIN:MAX (e.g. linear:4:16), got '{text}'") from None


def export_command(
    model: str = typer.Option(..., "--model", help="Model directory (or a hub id in the offline cache)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    task: str = typer.Option("seq-cls", "--task", help="seq-cls or causal-lm."),
    num_labels: int | None = typer.Option(None, "--num-labels", help="Number of classes (seq-cls)."),
    labels: str | None = typer.Option(None, "--labels", help="Class names, comma-separated (seq-cls)."),
    peft: str = typer.Option("lora", "--peft", help="lora, prompt or head."),
    head: bool = typer.Option(True, "--head/--no-head", help="Train the classification head (seq-cls)."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank (every adapter block)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 2*r)."),
    dropout: bool = typer.Option(False, "--dropout",
                                 help="Train with the model's dropout (+ --lora-dropout); evaluation runs without."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input (needs --dropout)."),
    lora_targets: str | None = typer.Option(None, "--lora-targets",
                                            help="Modules LoRA adapts (default: attention query,value)."),
    lora_ranks: str | None = typer.Option(None, "--lora-ranks",
                                          help="Rank per block, comma-separated; 0 = no LoRA in that block."),
    rank_schedule: str | None = typer.Option(None, "--rank-schedule",
                                             help="linear:MIN:MAX ranks growing with depth (per-block size)."),
    prompt_tokens: int = typer.Option(8, "--prompt-tokens", help="Soft-prompt length (--peft prompt)."),
    prompt_pool: int = typer.Option(0, "--prompt-pool", help="K > 0: also the prompt-ensemble step graph that mixes "
                                    "K pool prompts (--peft prompt)."),
    trainable_blocks: str | None = typer.Option(None, "--trainable-blocks",
                                                help="Only these (emulator) blocks are trainable, e.g. 4,5."),
    emulator: str | None = typer.Option(None, "--emulator",
                                        help="FIRST,MIDDLE,LAST: keep first/last blocks trainable and MIDDLE "
                                             "uniformly chosen frozen middle blocks (e.g. 2,0,2)."),
    emulator_middle: str | None = typer.Option(None, "--emulator-middle",
                                               help="Which middle blocks the emulator keeps (original depths, "
                                                    "e.g. 2,3; default: uniformly spaced)."),
    emulator_middle_width: int | None = typer.Option(None, "--emulator-middle-width",
                                                     help="FFN width of the emulator's middle blocks (highest-norm "
                                                          "neurons kept; BERT-family models)."),
    distill_data: Path | None = typer.Option(
        None, "--distill-data", help="Distil the emulator's middle from the full model's on this unlabelled text "
        "(one sentence a line, or a .tsv/.csv text column; public text, never device data). Cached."),
    distill_steps: int = typer.Option(300, "--distill-steps", help="Distillation optimizer steps."),
    distill_lr: float = typer.Option(5e-4, "--distill-lr", help="Distillation peak learning rate (AdamW, cosine)."),
    distill_batch: int = typer.Option(32, "--distill-batch", help="Distillation batch size."),
    distill_max_length: int | None = typer.Option(None, "--distill-max-length",
                                                  help="Distillation token length (default: --max-length)."),
    distill_warmup: int = typer.Option(30, "--distill-warmup", help="Distillation warmup steps."),
    distill_text_column: str | None = typer.Option(None, "--distill-text-column",
                                                   help="Text column of a .tsv/.csv (default: sentence or text)."),
    distill_cache: Path | None = typer.Option(None, "--distill-cache",
                                              help="Cache directory (default: ~/.cache/deftkit/distill)."),
    max_length: int = typer.Option(64, "--max-length", help="Token sequence length on the device."),
    quantize: bool = typer.Option(False, "--quantize", help="Also write an int8 inference graph."),
    fmt: str = typer.Option("step", "--format",
                            help="step (default: one standard ONNX graph per training step, plain onnxruntime "
                                 "trains it) or ort-training (ONNX Runtime training artifacts; needs "
                                 "onnxruntime-training in this environment)."),
    frozen_dtype: str = typer.Option("float32", "--frozen-dtype",
                                     help="Storage of the frozen weights: float32 or float16 (half the bundle and "
                                          "the device's weight memory; computation stays float32)."),
    seed: int = typer.Option(0, "--seed", help="Seed for new weights (head, LoRA A)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Export a Hugging Face model to a device bundle (emulator + PEFT + ONNX training step graph)."""
    con = Console(stderr=True)
    try:
        from export.api import export_bundle
        from export.config import ExportConfig

        ranks = _ints(lora_ranks, "--lora-ranks")
        emu = _emulator(emulator, emulator_middle, emulator_middle_width)
        opts = dict(task=task, num_labels=num_labels, labels=_strs(labels), peft=peft, head=head, lora_r=lora_r,
                    lora_alpha=lora_alpha, lora_targets=_strs(lora_targets), lora_ranks=ranks,
                    dropout=dropout, lora_dropout=lora_dropout,
                    num_virtual_tokens=prompt_tokens, prompt_pool=prompt_pool,
                    trainable_blocks=_ints(trainable_blocks, "--trainable-blocks"),
                    emulator=emu, max_length=max_length, quantize_inference=quantize, format=fmt,
                    seed=seed, frozen_dtype=frozen_dtype)
        if rank_schedule is not None:
            if ranks is not None:
                raise ExportError("give either --lora-ranks or --rank-schedule, not both")
            opts["rank_schedule"] = _schedule(rank_schedule)
        if distill_data is None:
            given = [f for f, v, d in (("--distill-steps", distill_steps, 300), ("--distill-lr", distill_lr, 5e-4),
                                       ("--distill-batch", distill_batch, 32), ("--distill-warmup", distill_warmup, 30),
                                       ("--distill-max-length", distill_max_length, None),
                                       ("--distill-text-column", distill_text_column, None),
                                       ("--distill-cache", distill_cache, None)) if v != d]
            if given:
                raise ExportError(f"{given[0]} applies to distillation: add --distill-data FILE or drop {given[0]}")
        else:
            opts["distill"] = {"data": str(distill_data), "steps": distill_steps, "lr": distill_lr,
                               "batch_size": distill_batch, "max_length": distill_max_length,
                               "warmup_steps": distill_warmup, "text_column": distill_text_column,
                               "cache_dir": str(distill_cache) if distill_cache is not None else None}
        try:
            cfg = ExportConfig(**opts)
        except ValidationError as exc:
            field, msg = first_error(exc, "option")
            raise ExportError(f"--{field.replace('_', '-')}: {msg}") from None
        with con.status("exporting") as status:
            manifest = export_bundle(model, out, cfg, force=force, progress=lambda s: status.update(s))
    except ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sizes = {n: (out / n).stat().st_size for n in manifest.files}
    con.print(f"wrote {out}: {manifest.architecture}, blocks {manifest.emulator.layer_map} of "
              f"{manifest.emulator.num_layers_full}, {manifest.peft.method}, "
              f"{manifest.params_trainable:,} trainable of {manifest.params_total:,} parameters, "
              f"{sum(sizes.values()) / 1e6:.1f} MB")
    if as_json:
        typer.echo(json.dumps({"ok": True, "bundle": str(out), "bundle_hash": manifest.bundle_hash(),
                               "params_trainable": manifest.params_trainable, "params_total": manifest.params_total,
                               "layer_map": manifest.emulator.layer_map, "bytes": sum(sizes.values()),
                               "distillation": manifest.emulator.distillation.model_dump()
                               if manifest.emulator.distillation else None}))

"""``deft bundle inspect|verify``: torch-free, so a device can check what it received."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from device_runtime.bundle.check import check_bundle
from device_runtime.bundle.verify import read_manifest
from device_runtime.errors import DeftError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Inspect and verify device bundles.")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(bundle: Path) -> dict:
    m = read_manifest(bundle)
    files = {name: (bundle / name).stat().st_size for name in m.files if (bundle / name).is_file()}
    return {
        "bundle": str(bundle),
        "bundle_hash": m.bundle_hash(),
        "source_model": m.source_model,
        "architecture": m.architecture,
        "task": m.task,
        "labels": m.labels,
        "max_length": m.max_length,
        "layers_full": m.emulator.num_layers_full,
        "layer_map": m.emulator.layer_map,
        "adapter_blocks": m.emulator.adapter_blocks,
        "peft": m.peft.method,
        "lora_ranks": {str(k): v for k, v in m.peft.lora_ranks.items()},
        "trainable_blocks": m.peft.trainable_blocks,
        "dropout": m.dropout,
        "params_total": m.params_total,
        "params_trainable": m.params_trainable,
        "block_params": {str(k): v for k, v in m.block_params.items()},
        "files": files,
        "bytes_total": sum(files.values()),
    }


@app.command("inspect")
def inspect_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of tables."),
) -> None:
    """Human summary: model, layers kept, trainable parameters per block, file sizes."""
    try:
        s = summary(bundle)
    except DeftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(s))
        return
    con = Console()
    con.print(f"[bold]{s['bundle']}[/]  hash {s['bundle_hash'][:16]}")
    con.print(f"model {s['source_model']} ({s['architecture']}), task {s['task']}, labels {s['labels']}, "
              f"max length {s['max_length']}")
    emu = "full model" if s["layer_map"] == list(range(s["layers_full"])) else "emulator"
    con.print(f"{emu}: keeps original blocks {s['layer_map']} of {s['layers_full']}; "
              f"adapter (trainable) blocks {s['adapter_blocks']}")
    con.print(f"PEFT {s['peft']}; trainable {s['params_trainable']:,} of {s['params_total']:,} parameters "
              f"({100 * s['params_trainable'] / max(1, s['params_total']):.2f}%); "
              f"{'trains with dropout' if s['dropout'] else 'no dropout in training'}")
    t = Table("block", "original block", "LoRA rank", "trainable params")
    for b, n in s["block_params"].items():
        t.add_row(b, str(s["layer_map"][int(b)]), str(s["lora_ranks"].get(b, "-")), f"{n:,}")
    con.print(t)
    f = Table("file", "size")
    for name, size in sorted(s["files"].items()):
        f.add_row(name, _size(size))
    f.add_row("[bold]total[/]", _size(s["bytes_total"]))
    con.print(f)


@app.command("verify")
def verify_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object as the last line."),
    quick: bool = typer.Option(False, "--quick", help="Only hashes and manifest; skip loading graphs."),
) -> None:
    """Check hashes, load every graph in ONNX Runtime, run one training step. Exit 1 if not ok."""
    manifest, problems = check_bundle(bundle, deep=not quick)
    result = {"ok": not problems, "bundle": str(bundle), "problems": problems,
              "bundle_hash": manifest.bundle_hash() if manifest else None}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        if problems:
            for p in problems:
                typer.echo(f"problem: {p}")
            typer.echo(f"{bundle}: NOT OK ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
        else:
            typer.echo(f"{bundle}: ok (hashes match, graphs load, one training step ran)")
    if problems:
        raise typer.Exit(1)

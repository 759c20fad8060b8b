"""``deft plugin``: device-trained tensors -> the full model -> a standard PEFT adapter directory.

The edge does this after every federated round (``edge_broker.coordinator.evaluation``); this
command does the same for one state file, e.g. after ``deft device train`` on an emulator bundle.
Plug-in and scoring are the coordinator's own (``export.plugin`` and ``FullModelEvaluator``), so
the accuracy printed here is the accuracy the edge would report.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import typer


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def plugin_command(
    bundle: Path = typer.Option(..., "--bundle", help="The bundle the state was trained on."),
    state: Path = typer.Option(..., "--state", help="Trained tensors: an update payload or a safetensors file."),
    out: Path = typer.Option(..., "--out",
                             help="PEFT adapter directory to write (loads with PeftModel.from_pretrained)."),
    model: str | None = typer.Option(None, "--model",
                                     help="The full model the bundle was exported from (default: the manifest's)."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Labelled data: score the full model on it."),
    batch_size: int = typer.Option(64, "--batch-size", help="Evaluation batch size."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last stdout line."),
) -> None:
    """Plug device-trained tensors into the full model and write the PEFT adapter (optionally score it)."""
    from device_runtime.errors import DeviceError
    from export.errors import ExportError

    t0 = time.perf_counter()
    try:
        report = plug(bundle, state, out, model, eval_data, batch_size, force)
    except (DeviceError, ExportError) as exc:
        _fail(str(exc))
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        acc = f", full-model accuracy {report['eval_accuracy']:.4f} on {report['eval_rows']} rows" \
            if report.get("eval_accuracy") is not None else ""
        typer.echo(f"wrote {report['adapter_dir']} ({report['tensors']} tensors into {report['model']}){acc}")


def plug(bundle: Path, state: Path, out: Path, model: str | None, eval_data: Path | None, batch_size: int = 64,
         force: bool = False) -> dict:
    """Check every input before loading the full model, plug in, write the adapter, score it."""
    from device_runtime.bundle.load import load_bundle
    from device_runtime.state import check_tensors, load_state_file
    from device_runtime.weights import initial_tensors
    from export.errors import ExportError
    from export.loading import source_sha256

    if batch_size <= 0:
        raise ExportError(f"--batch-size must be > 0 (got {batch_size})")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    if eval_data is not None and not eval_data.is_file():
        raise ExportError(f"evaluation data {eval_data} does not exist")
    b = load_bundle(bundle)
    m = b.manifest
    tensors = check_tensors(m, load_state_file(state, lambda: initial_tensors(b)))
    source = model or m.source_model
    if not Path(source).is_dir():
        raise ExportError(f"full model {source} is not a directory; pass the model the bundle was exported from "
                          "with --model")
    if m.source_model_sha256 not in ("in-memory", "unknown") and source_sha256(source) != m.source_model_sha256:
        raise ExportError(f"the model at {source} is not the one the bundle was exported from (its weights' sha256 "
                          "differs from the manifest's); pass that model with --model")
    report: dict = {"ok": True, "bundle": str(bundle), "bundle_hash": b.hash, "state": str(state), "model": source,
                    "tensors": len(tensors), "layer_map": m.emulator.layer_map,
                    "distilled": m.emulator.distillation is not None, "eval_accuracy": None}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if eval_data is not None:
        from edge_broker.coordinator.evaluation import FullModelEvaluator

        try:
            ev = FullModelEvaluator(b, eval_data, model=source, batch_size=batch_size)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        res = ev.evaluate(tensors)
        report.update(eval_accuracy=res["accuracy"], eval_loss=res["loss"], eval_rows=res["rows"])
        ev.save_adapter(tensors, tmp)
    else:
        from export.plugin import load_full_model, plug_in, save_adapter

        save_adapter(plug_in(load_full_model(m, source), m, tensors), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # never a half-written adapter under the name asked for
    report["adapter_dir"] = str(out)
    return report

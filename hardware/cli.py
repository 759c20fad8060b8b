"""``deft hw ...``: hardware profiles and the cost-table scaling rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from device_runtime.errors import DeftError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hardware profiles and cost tables.")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command("profiles")
def profiles_command(
    profile: str = typer.Argument(None, help="A profile id or .toml path to show in full; omit to list all."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (last stdout line)."),
) -> None:
    """List the built-in hardware profiles, or show one with the source of every figure."""
    from rich.console import Console
    from rich.table import Table

    from hardware.profiles import builtin_profiles, get_profile

    try:
        chosen = [get_profile(profile)] if profile else list(builtin_profiles().values())
    except DeftError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([p.model_dump() for p in chosen] if not profile else chosen[0].model_dump()))
        return
    console = Console()
    if profile:
        p = chosen[0]
        table = Table(title=f"{p.id}: {p.name}")
        table.add_column("field")
        table.add_column("value", justify="right")
        table.add_column("source")
        rows = {
            **p.model_dump(exclude={"sources", "uplink", "id", "name"}),
            **{f"uplink.{k}": v for k, v in p.uplink.model_dump().items()},
        }
        for k, v in rows.items():
            table.add_row(k, f"{v:g}" if isinstance(v, float) else str(v), p.sources.get(k, ""))
        console.print(table)
        return
    table = Table(title="hardware profiles (sustained FP32 estimates)")
    for col in ("id", "cores", "memory GiB", "CPU GFLOP/s", "GPU GFLOP/s", "mem GB/s", "uplink"):
        table.add_column(col, justify="left" if col in ("id", "uplink") else "right", no_wrap=col == "id")
    for p in chosen:
        table.add_row(
            p.id,
            str(p.cpu_cores),
            f"{p.memory_bytes / 2**30:.0f}",
            f"{p.cpu_gflops_fp32:g}",
            f"{p.gpu_gflops_fp32:g}",
            f"{p.memory_bandwidth_gbs:g}",
            f"{p.uplink.kind} {p.uplink.bandwidth_hz / 1e6:g} MHz {p.uplink.tx_power_w:g} W",
        )
    console.print(table)


@app.command("scale")
def scale_command(
    table: Path = typer.Argument(..., help="Cost table JSON measured on some profile."),
    to: str = typer.Option(..., "--to", help="Target profile id or .toml path."),
    source: str = typer.Option(
        None, "--from", help="Profile the table was measured on (default: the table's)."
    ),
    compute_fraction: float = typer.Option(0.8, help="Share of the step that is compute-bound."),
    out: Path = typer.Option(None, "--out", help="Write the predicted table here."),
    as_json: bool = typer.Option(False, "--json", help="Print the predicted table as one JSON line."),
) -> None:
    """Predict a cost table on another profile from its compute and memory figures."""
    from hardware.cost_table import CostTable
    from hardware.profiles import get_profile
    from hardware.scaling import deepest_fitting_depth, scale_cost_table

    try:
        measured = CostTable.load(table)
        src = get_profile(source or measured.profile)
        dst = get_profile(to)
        predicted = scale_cost_table(measured, src, dst, compute_fraction=compute_fraction)
    except DeftError as exc:
        _fail(exc)
    if out:
        predicted.save(out)
    if as_json:
        typer.echo(predicted.model_dump_json())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{measured.profile} -> {dst.id} (fits up to depth {deepest_fitting_depth(predicted, dst)})"
    )
    for col in ("depth", "step s (measured)", "step s (predicted)", "peak MiB", "update KiB"):
        t.add_column(col, justify="right")
    for a, b in zip(measured.entries, predicted.entries, strict=True):
        t.add_row(
            str(a.depth),
            f"{a.step_latency_s:.4g}",
            f"{b.step_latency_s:.4g}",
            f"{b.peak_memory_bytes / 2**20:.0f}",
            f"{b.update_bytes / 1024:.1f}",
        )
    Console().print(t)


@app.command("profile")
def profile_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `deft export`.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the cost table (JSON).")] = Path(
        "cost.json"
    ),
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Profile id (or .toml) that describes THIS machine; `deft hw scale` scales from it.",
        ),
    ] = "laptop-x86",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the measured steps.")] = 16,
    seq: Annotated[int, typer.Option("--seq", min=1, help="Sequence length (capped at the bundle's).")] = 64,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Timed steps per block (after --warmup).")
    ] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 2,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Measure each block this often, interleaved.")
    ] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="OMP threads for ONNX Runtime.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON report as the last stdout line.")
    ] = False,
) -> None:
    """Measure, per trainable block, the train-step latency and peak memory when it is the deepest
    trainable block, and write the cost table (ironed to be non-decreasing in depth)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hardware.profiler import ProfilerError, open_bundle, profile_bundle
    from hardware.profiles import get_profile

    try:
        prof = get_profile(profile)
        open_bundle(bundle)  # bad input fails here, before the progress bar starts
        if not out.parent.is_dir():
            raise ProfilerError(
                f"output directory {out.parent} does not exist; create it or pick another --out"
            )
        err = Console(stderr=True)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=as_json,
        ) as bar:
            task = bar.add_task("profiling", total=None)

            def on_progress(msg: str, done: int, total: int) -> None:
                bar.update(task, description=msg, completed=done, total=total)

            result = profile_bundle(
                bundle,
                profile_id=prof.id,
                batch=batch,
                seq=seq,
                steps=steps,
                warmup=warmup,
                repeats=repeats,
                threads=threads,
                on_progress=on_progress,
            )
    except DeftError as exc:
        _fail(exc)
    result.table.save(out)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "out": str(out),
                    "table": result.table.model_dump(),
                    "measured": result.measured.model_dump(),
                    "adjusted": [a.model_dump() for a in result.adjusted],
                    "measurements": [m.model_dump() for m in result.measurements],
                    "wall_s": result.wall_s,
                }
            )
        )
        return
    from rich.table import Table

    fixed = {(a.depth, a.field) for a in result.adjusted}
    t = Table(
        title=f"cost table of {bundle} on {prof.id} (batch {result.table.batch}, seq {result.table.seq})",
        caption=f"written to {out}; * = raised to keep the table non-decreasing in depth "
        f"(measured value in brackets)",
    )
    for col in ("depth", "block", "step ms", "peak RSS MiB", "update KiB"):
        t.add_column(col, justify="right")
    for e, raw, m in zip(result.table.entries, result.measured.entries, result.measurements, strict=True):
        lat = f"{e.step_latency_s * 1e3:.2f}"
        if (e.depth, "step_latency_s") in fixed:
            lat = f"*{lat} [{raw.step_latency_s * 1e3:.2f}]"
        mem = f"{e.peak_memory_bytes / 2**20:.0f}"
        if (e.depth, "peak_memory_bytes") in fixed:
            mem = f"*{mem} [{raw.peak_memory_bytes / 2**20:.0f}]"
        t.add_row(str(e.depth), str(m.block), lat, mem, f"{e.update_bytes / 1024:.1f}")
    Console().print(t)

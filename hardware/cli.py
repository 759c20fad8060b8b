"""``deft hw ...``: hardware profiles and the cost-table scaling rule."""

from __future__ import annotations

import json
from pathlib import Path

import typer

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

    from hardware.profiles import ProfileError, builtin_profiles, get_profile

    try:
        chosen = [get_profile(profile)] if profile else list(builtin_profiles().values())
    except ProfileError as exc:
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
    from hardware.cost_table import CostTable, CostTableError
    from hardware.profiles import ProfileError, get_profile
    from hardware.scaling import deepest_fitting_depth, scale_cost_table

    try:
        measured = CostTable.load(table)
        src = get_profile(source or measured.profile)
        dst = get_profile(to)
        predicted = scale_cost_table(measured, src, dst, compute_fraction=compute_fraction)
    except (CostTableError, ProfileError) as exc:
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
    for a, b in zip(measured.entries, predicted.entries):
        t.add_row(
            str(a.depth),
            f"{a.step_latency_s:.4g}",
            f"{b.step_latency_s:.4g}",
            f"{b.peak_memory_bytes / 2**20:.0f}",
            f"{b.update_bytes / 1024:.1f}",
        )
    Console().print(t)

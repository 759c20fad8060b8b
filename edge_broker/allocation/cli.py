"""``deft edge allocate INSTANCE.json --method ...``: run an allocator on an instance file.

Exit status: 0 with the allocation; 1 when no feasible allocation exists; 2 for bad input. Either
failure prints a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from device_runtime.errors import DeftError
from edge_broker.allocation.instance import Infeasible


class Method(StrEnum):
    crunch = "crunch"
    joint = "joint"
    greedy = "greedy"
    random = "random"
    equal = "equal"
    exact = "exact"
    brute = "brute"


def allocate_command(
    instance: Path = typer.Argument(
        ..., help="Instance JSON: devices, blocks, total_bandwidth, noise (SI units)."
    ),
    method: Method = typer.Option(
        Method.crunch,
        "--method",
        "-m",
        help="crunch: optimal matching at each device's own bandwidth; joint: "
        "bandwidths and blocks together; greedy/random/equal: baselines; "
        "exact/brute: references for small instances.",
    ),
    seed: int = typer.Option(0, help="Seed of the random baseline."),
    as_json: bool = typer.Option(False, "--json", help="Print the allocation as one JSON line."),
) -> None:
    """Choose which device trains which block (and the uplink split) to minimise the round latency."""
    import time

    from edge_broker.allocation import baselines, brute, crunch, joint, solve  # noqa: F401  (loaded before timing)
    from edge_broker.allocation.instance import Instance

    try:
        inst = Instance.load(instance)
        t0 = time.perf_counter()
        alloc = solve(inst, method.value, seed=seed)
        elapsed = time.perf_counter() - t0
    except Infeasible as exc:
        typer.echo(f"error: infeasible: {exc}", err=True)
        raise typer.Exit(1) from None
    except DeftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(alloc.to_json_line())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{method.value}: round latency {alloc.latency:.4g} s",
        caption=f"solved in {elapsed * 1e3:.1f} ms",
    )
    table.add_column("depth", justify="right")
    table.add_column("device")
    table.add_column("bandwidth (MHz)", justify="right")
    for depth, dev in sorted(alloc.assignment.items()):
        table.add_row(str(depth), dev, f"{alloc.bandwidth[dev] / 1e6:.3f}")
    Console().print(table)

"""``deft hw ...``: hardware profiles and the cost-table scaling rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from device_runtime.errors import DeftError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Hardware profiles, cost tables and testbeds (inventory, flash, provision, status).")


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


# ---- testbed: inventory, flashing, provisioning, status ------------------------------------------
def _inventory(path: Path):
    from hardware.inventory import InventoryError, load_inventory

    try:
        return load_inventory(path)
    except InventoryError as exc:
        _fail(exc)


InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="Fleet file (TOML), see `deft hw inventory`.")]


@app.command("inventory")
def inventory_command(
    fleet_file: Annotated[Path | None, typer.Argument(help="Fleet file (TOML) to check and show.")] = None,
    example: Annotated[
        Path | None,
        typer.Option("--example", help="Write a complete example testbed (fleet.toml, SSH key, broker accounts) here."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the validated inventory as JSON.")] = False,
) -> None:
    """Check a testbed's fleet file (boards, ids, keys, broker accounts) and show it."""
    from hardware.inventory import InventoryError, write_example

    if example is not None:
        try:
            fleet_file = write_example(example)
        except InventoryError as exc:
            _fail(exc)
        if not as_json:
            typer.echo(f"wrote {fleet_file}, {example / 'ssh'} (key pair) and {example / 'broker' / 'accounts.json'}")
    if fleet_file is None:
        _fail(ValueError("give a fleet file, or --example DIR to write one"))
    inv = _inventory(fleet_file)
    summary = inv.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fleet {inv.fleet!r}: broker {inv.spec.broker.url} ({len(inv.devices)} devices, accounts ok)")
    for col in ("id", "board", "os", "host", "user", "hostname", "data on device"):
        t.add_column(col)
    for d in inv.devices:
        t.add_row(d.id, d.board, d.os, f"{d.host}:{d.port}" if d.port != 22 else d.host, d.user, d.host_name,
                  d.data_path)
    Console().print(t)


def _progress_bar(as_json: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=as_json)


@app.command("flash")
def flash_command(
    inventory: InventoryOpt,
    device: Annotated[str, typer.Option("--device", "-d", help="Device id from the fleet file.")],
    image: Annotated[
        Path | None,
        typer.Option("--image", help="Raspberry Pi: the image file or SD card (block device) to configure."),
    ] = None,
    os_image: Annotated[
        Path | None,
        typer.Option("--os-image", help="Raspberry Pi: first write this OS image (.img or .img.xz) to --image."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write an OS image to something that is not a removable disk.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before overwriting --image.")] = False,
    wheels: Annotated[
        Path | None, typer.Option("--wheels", help="Wheel set (kit + device extra) the board installs at first boot.")
    ] = None,
    l4t: Annotated[Path | None, typer.Option("--l4t", help="Jetson: your Linux_for_Tegra directory (BSP).")] = None,
    dry_run: Annotated[
        bool | None,
        typer.Option("--dry-run/--run", help="Jetson: only print the commands (default when the BSP is absent)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report as the last stdout line.")] = False,
) -> None:
    """Prepare a board's boot media: Raspberry Pi OS first-boot files, or a Jetson rootfs overlay + flash."""
    from hardware.blockdev import BlockDeviceError, check_target, inspect_target, write_image
    from hardware.fat import FatError
    from hardware.flash_jetson import JetsonError
    from hardware.flash_jetson import flash as flash_jetson
    from hardware.flash_rpi import FlashError, configure_boot
    from hardware.inventory import InventoryError

    inv = _inventory(inventory)
    try:
        dev = inv.device(device)
        if wheels is not None and not wheels.is_dir():
            raise FlashError(f"--wheels {wheels} is not a directory")
        if dev.os == "jetpack-6":
            result = flash_jetson(inv, dev, l4t, dry_run=dry_run, wheels=wheels,
                                  log=lambda m: typer.echo(m, err=True))
            if as_json:
                typer.echo(json.dumps({"ok": True, **{k: v for k, v in result.items() if k != "password"}}))
                return
            head = "dry run: would run" if result["dry_run"] else "ran"
            typer.echo(f"{dev.id} ({dev.board}, {result['source']}): {head}, in {l4t or 'Linux_for_Tegra'}:")
            for c in result["commands"]:
                typer.echo(f"  {c}")
            if result["overlay"]:
                typer.echo(f"rootfs overlay: {len(result['overlay'])} files under {l4t}/rootfs")
                typer.echo(f"login: {dev.user} with the testbed's SSH key (password, only shown now: "
                           f"{result['password']})")
            return
        if dev.os == "debian":
            raise FlashError(f"device {dev.id} runs debian: install the OS yourself, then `deft hw provision`")
        if image is None:
            raise FlashError("give --image: the Raspberry Pi OS image file or the SD card to configure")
        written = None
        target = inspect_target(image) if image.exists() else None
        if os_image is not None or (target is not None and target.kind != "file"):
            if target is None:
                raise BlockDeviceError(f"{image} does not exist: name the SD card's device (lsblk shows it)")
            check_target(target, force=force)
            typer.echo(f"will overwrite: {target.describe()}", err=True)
            if not yes:
                import sys

                if not sys.stdin.isatty():
                    raise BlockDeviceError("not asking on a non-interactive terminal: pass --yes to overwrite")
                typer.confirm("continue?", abort=True, err=True)
        elif target is None:
            raise FlashError(f"image {image} not found")
        if os_image is not None:
            with _progress_bar(as_json) as bar:
                task = bar.add_task(f"writing {os_image.name}", total=None)

                def progress(phase: str, done: int, total: int) -> None:
                    bar.update(task, description=f"{phase} {os_image.name}", completed=done, total=total or None)

                written = write_image(os_image, image, on_progress=progress)
        files = configure_boot(inv, dev, image, wheels)
        if target is not None and target.kind == "block":
            import os

            os.sync()  # mtools wrote through the page cache; the card may be pulled right after
    except (InventoryError, FlashError, FatError, BlockDeviceError, JetsonError) as exc:
        _fail(exc)
    report = {"ok": True, "device": dev.id, "os": dev.os, "image": str(image), "written": written, "files": files}
    if as_json:
        typer.echo(json.dumps(report))
        return
    if written:
        typer.echo(f"wrote and verified {written['bytes']:,} bytes of {os_image} on {image}")
    typer.echo(f"{image}: first boot of {dev.id} ({dev.os}, hostname {dev.host_name}) configured: {', '.join(files)}")


def _wheelhouses(inv, devices, cache: Path | None, log) -> dict[str, Path]:
    from hardware.wheels import target_of, wheel_set

    sets: dict[tuple[str, str], Path] = {}
    out = {}
    for d in devices:
        key = target_of(d)
        if key not in sets:
            sets[key] = wheel_set(*key, cache=cache, log=log)
        out[d.id] = sets[key]
    return out


@app.command("provision")
def provision_command(
    inventory: InventoryOpt,
    limit: Annotated[str | None, typer.Option("--limit", help="Only these device ids (comma-separated).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Dry run: report what would change, change nothing.")] = False,
    cache: Annotated[Path | None,
                     typer.Option("--cache", help="Wheel cache (default ~/.cache/deftkit/wheels).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report as the last stdout line.")] = False,
) -> None:
    """Install the kit as a service on the boards over SSH (Ansible): venv from wheels built here,
    credentials (0600), deft-device@<id>.service enabled and started. Idempotent."""
    from hardware.inventory import InventoryError
    from hardware.provision import ProvisionError, run_playbook
    from hardware.wheels import WheelError

    inv = _inventory(inventory)
    err = typer.echo if not as_json else (lambda m: typer.echo(m, err=True))
    try:
        devices = inv.select(limit)
        houses = _wheelhouses(inv, devices, cache, lambda m: typer.echo(m, err=True))
        with _progress_bar(True) as bar:
            task = bar.add_task("provisioning", total=None)

            def on_event(host: str, name: str, status: str) -> None:
                bar.update(task, description=f"{host}: {name} [{status}]")

            results = run_playbook(inv, devices, "provision.yml", wheelhouses=houses, check=check, on_event=on_event)
    except (InventoryError, ProvisionError, WheelError) as exc:
        _fail(exc)
    ok = all(not r.failed and not r.unreachable for r in results.values())
    report = {"ok": ok, "check": check, "changed": sum(r.changed for r in results.values()),
              "hosts": {h: r.as_dict() for h, r in results.items()}}
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for h, r in results.items():
            state = "UNREACHABLE" if r.unreachable else "FAILED" if r.failed else "ok"
            err(f"{h}: {state}, {r.changed} changed, {r.ok} ok" + (f" ({'; '.join(r.messages)})" if r.messages else ""))
        err(("would change" if check else "changed") + f" {report['changed']} item(s)")
    if not ok:
        raise typer.Exit(1)


@app.command("status")
def status_command(
    inventory: InventoryOpt,
    limit: Annotated[str | None, typer.Option("--limit", help="Only these device ids (comma-separated).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (last stdout line).")] = False,
) -> None:
    """Each board: reachable over SSH, kit version, service state, online in the fleet (retained status)."""
    from hardware.inventory import InventoryError
    from hardware.provision import ProvisionError
    from hardware.status import collect

    inv = _inventory(inventory)
    try:
        rows = collect(inv, inv.select(limit))
    except (InventoryError, ProvisionError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({"fleet": inv.fleet, "devices": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fleet {inv.fleet!r} at {inv.spec.broker.url}")
    for col in ("id", "host", "reachable", "kit", "service", "fleet"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["host"], "yes" if r["reachable"] else "NO", r["kit_version"] or "-", r["service"],
                  r["fleet"])
    Console().print(t)

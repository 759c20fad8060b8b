"""``deft demo``: the README's main command (see edge_broker/demo/run.py for what it does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import typer

from device_runtime.choices import choices
from device_runtime.errors import DeftError
from device_runtime.payload import ENCODINGS
from edge_broker.broker import Kind
from edge_broker.channel import cli as ch

EncodingChoice = choices("EncodingChoice", ENCODINGS)
BrokerKind = choices("BrokerKind", get_args(Kind))
Scenario = choices("Scenario", ("rounds", "prompts"))


def demo_command(
    workdir: Path = typer.Option(Path("deft-demo"), help="Where the bundle, shards, logs, report and adapter go."),
    devices: int = typer.Option(4, min=1, help="Device processes."),
    rows: int = typer.Option(2000, min=16, help="Training rows per device (non-IID label mix)."),
    rounds: int = typer.Option(3, min=1, help="Federated rounds."),
    epochs: float = typer.Option(1.0, help="Local epochs per round."),
    lr: float = typer.Option(1e-3, help="Local learning rate."),
    encoding: EncodingChoice = typer.Option("int8", help="Update encoding."),
    strategy: str = typer.Option("fedavg", help="fedavg, fedadam, median, trimmed_mean."),
    broker: BrokerKind = typer.Option("auto", help="auto: Mosquitto if installed, else embedded."),
    emulator: bool = typer.Option(False, "--emulator", help="Devices train a 4-of-6-block emulator whose middle "
                                  "is distilled from the full model's; the report shows the emulator's and the "
                                  "plugged-in full model's accuracy."),
    skew: float = typer.Option(0.25, help="Label skew across devices (0: IID)."),
    fresh: bool = typer.Option(False, help="Re-export the bundle too."),
    web_devices: int = typer.Option(0, min=0, help="Browser devices (phones) the rounds also wait for: serves the "
                                    "page and prints each one's URL, QR code and password (Mosquitto only)."),
    web_port: int = typer.Option(8080, help="Port of the browser device page (--web-devices)."),
    channel: ch.ChannelChoice = ch.CHANNEL, snr_db: float = ch.SNR_DB, truncation: float = ch.TRUNCATION,
    subchannels: int = ch.SUBCHANNELS, cell_radius: float = ch.CELL_RADIUS, path_loss_exponent: float = ch.PATH_LOSS,
    channel_seed: int = ch.CHANNEL_SEED,
    json_out: bool = typer.Option(False, "--json", help="Last stdout line: a JSON summary."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log the coordinator's messages."),
    scenario: Scenario = typer.Option("rounds", help="rounds: federated LoRA rounds; prompts: a prompt pool and a "
                                      "newcomer comparing own, transferred and ensembled prompts."),
    seeds: int = typer.Option(3, min=1, help="--scenario prompts: newcomer comparisons (seeds) to average."),
    newcomer_rows: int = typer.Option(64, min=4, help="--scenario prompts: the newcomer's labelled rows."),
) -> None:
    """Export MiniLM, start a broker, a coordinator and device processes, run federated rounds on SST-2."""
    from rich.console import Console

    from edge_broker.demo.run import DemoOptions, quiet_logging, run_demo

    quiet_logging(verbose)
    console = Console(stderr=json_out, soft_wrap=True)  # no wrapping: the mosquitto_sub line must stay copyable
    t0 = __import__("time").perf_counter()

    def say(msg: str) -> None:
        console.print(f"[dim]{__import__('time').perf_counter() - t0:6.1f}s[/dim] {msg}")

    if scenario.value == "prompts":
        from edge_broker.demo.prompts_cli import prompts_scenario

        workdir = workdir if workdir != Path("deft-demo") else Path("deft-demo-prompts")
        prompts_scenario(console, say, json_out, workdir=workdir, seeds=seeds, newcomer_rows=newcomer_rows,
                         broker=broker.value, fresh=fresh, skew=skew)
        return

    def on_event(e: dict) -> None:
        kind = e["event"]
        if kind == "device":
            say(f"device {e['device']} joined ({e['online']} online)")
        elif kind == "bundle":
            say(f"sent the bundle to {e['device']} over MQTT ({e['bytes'] / 1e6:.1f} MB)")
        elif kind == "initial_eval":
            say(f"full model before fine-tuning: accuracy {e['accuracy']:.4f}")
        elif kind == "round_open":
            say(f"[bold]round {e['round']}[/bold]: training on {', '.join(e['devices'])}")
        elif kind == "update":
            say(f"  update from {e['device']} accepted ({e['bytes'] / 1e3:.1f} kB)")
        elif kind == "round_closed":
            emu = f", emulator {e['bundle_accuracy']:.4f}" if e.get("bundle_accuracy") is not None else ""
            say(f"[bold]round {e['round']} done[/bold]: {e['accepted']} updates, full-model accuracy "
                f"[bold green]{e['accuracy']:.4f}[/bold green]{emu}, {e['wall_s']:.0f}s")
            if e.get("channel"):
                say("  " + ch.describe_round(e["channel"]))

    try:
        opts = DemoOptions(workdir=workdir, devices=devices, rows_per_device=rows, rounds=rounds, epochs=epochs,
                           lr=lr, encoding=encoding.value, strategy=strategy, broker=broker.value, emulator=emulator,
                           skew=skew, fresh=fresh, web_devices=web_devices, web_port=web_port,
                           channel=ch.channel_config(channel, snr_db, truncation, subchannels, cell_radius,
                                                     path_loss_exponent, channel_seed))
        report = run_demo(opts, say, on_event)
    except KeyboardInterrupt:
        console.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    except (DeftError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    summary = {k: report.get(k) for k in ("accuracy", "final_accuracy", "initial_accuracy", "bytes_up", "bytes_down",
                                           "bundle_bytes", "wall_s", "broker", "adapter_dir", "report", "plot",
                                           "devices", "rows_per_device", "emulator", "encoding", "strategy")}
    if opts.channel.kind != "ideal":
        summary["channel"] = opts.channel.model_dump()
        summary["channel_rounds"] = [r.get("channel") for r in report["rounds"]]
    if emulator:
        summary["bundle_accuracy"] = [r.get("bundle_accuracy") for r in report["rounds"]]
    from rich.table import Table

    t = Table(title="deft demo: federated fine-tuning of MiniLM on SST-2 (GLUE validation, 872 sentences)")
    for c in ("round", "accuracy", "up (kB)", "down (kB)", "seconds"):
        t.add_column(c, justify="right")
    if report.get("initial_accuracy") is not None:
        t.add_row("0", f"{report['initial_accuracy']:.4f}", "", "", "")
    for r in report["rounds"]:
        t.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['bytes_up'] / 1e3:,.0f}",
                  f"{r['bytes_down'] / 1e3:,.0f}",
                  f"{r['wall_s']:.0f}")
    console.print(t)
    console.print(f"broker: {report['broker']}   wall time: {report['wall_s']:.0f}s   "
                  f"bundle sent over MQTT: {report['bundle_bytes'] / 1e6:.0f} MB (in round 1's down bytes)")
    console.print(f"PEFT adapter: {report['adapter_dir']}\nreport: {report['report']}   plot: {report['plot']}")
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")

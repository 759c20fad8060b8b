"""``deft edge serve``: run federated rounds for a fleet over an MQTT broker."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import get_args

import typer

from device_runtime.choices import choices
from device_runtime.errors import DeftError, first_error
from device_runtime.payload import ENCODINGS
from device_runtime.protocol.topics import DEFAULT_FLEET
from edge_broker.channel import cli as ch
from edge_broker.coordinator.config import AllocationMethod

EncodingChoice = choices("EncodingChoice", ENCODINGS)
Allocation = choices("Allocation", get_args(AllocationMethod))


def _password(password: str | None, accounts: Path | None, user: str) -> str | None:
    if password:  # --password or DEFT_PASSWORD
        return password
    if accounts is not None:
        from edge_broker.broker import load_accounts

        for a in load_accounts(accounts):
            if a.username == user:
                return a.password
        raise typer.BadParameter(f"no account {user!r} in {accounts}")
    return None


def serve_command(
    bundle: Path = typer.Option(..., help="The bundle devices train (a directory written by `deft export`)."),
    broker: str = typer.Option(..., help="Broker URL, e.g. mqtt://127.0.0.1:1883 (credentials may be in the URL)."),
    workdir: Path = typer.Option(Path("edge-run"), help="State (SQLite), report and adapter go here; "
                                 "starting again with the same workdir resumes the run."),
    fleet: str = typer.Option(DEFAULT_FLEET, help="Fleet name (topic tree deft/v1/<fleet>/...)."),
    username: str = typer.Option("edge", help="The edge's MQTT account."),
    password: str = typer.Option(None, envvar="DEFT_PASSWORD", help="Its password (or --accounts)."),
    accounts: Path = typer.Option(None, help="accounts.json written by `deft edge broker` (password lookup)."),
    devices: str = typer.Option("",
                                help="Comma-separated device ids of the fleet (default: any device that says hello)."),
    rounds: int = typer.Option(3, min=1, help="Number of rounds."),
    min_devices: int = typer.Option(1, min=1, help="Start once this many devices said hello."),
    wait_devices: float = typer.Option(300.0, help="Seconds to wait for them."),
    deadline: float = typer.Option(600.0, help="Seconds a round waits for updates."),
    min_updates: int = typer.Option(1, min=1, help="Updates a round needs at its deadline."),
    quorum: int = typer.Option(None, min=1, help="Close a round once this many updates are in (default: all)."),
    strategy: str = typer.Option("fedavg", help="fedavg, fedadam, median or trimmed_mean."),
    strategy_param: list[str] = typer.Option([], help="KEY=VALUE for the strategy (repeatable), e.g. trim=0.2."),
    clip_norm: float = typer.Option(None, help="Clip each update's delta to this L2 norm."),
    epochs: float = typer.Option(1.0, help="Local epochs per round."),
    batch_size: int = typer.Option(16, help="Local batch size."),
    lr: float = typer.Option(1e-3, help="Local learning rate."),
    steps: int = typer.Option(None, help="Local steps per round (overrides --epochs)."),
    encoding: EncodingChoice = typer.Option("int8", help="Update encoding."),
    max_update_bytes: int = typer.Option(64 * 1024 * 1024, help="Reject an update payload larger than this."),
    eval_data: Path = typer.Option(None, help="Labelled data to score the full model on after each round."),
    model: str = typer.Option(None, help="Full model to plug into (default: the bundle's source model)."),
    eval_bundle: bool = typer.Option(False, help="Also score the bundle (emulator) itself with ONNX Runtime."),
    allocation: Allocation = typer.Option(None, help="LoLa DEFT: crunch or joint matches devices to blocks each round "
                                   "(each device trains a bundle variant with only its blocks trainable)."),
    cost_table: Path = typer.Option(None, help="Per-block cost table from `deft hw profile` (default: an estimate)."),
    total_bandwidth: float = typer.Option(20e6, help="Uplink bandwidth the fleet shares, Hz (joint allocation)."),
    max_packet_size: int = typer.Option(None, help="The broker's packet limit if it cannot announce it (MQTT 3.1.1)."),
    controller: Path = typer.Option(None, help="FedPEAT: a PPO policy (`deft edge controller train`) picks each "
                                    "round's devices, emulator variants and local steps."),
    variant: list[str] = typer.Option([], help="LAYOUT=BUNDLE_DIR (repeatable): the emulator variant bundles the "
                                      "controller chooses among, e.g. 1,1,1=bundles/emu111."),
    channel: ch.ChannelChoice = ch.CHANNEL, snr_db: float = ch.SNR_DB, truncation: float = ch.TRUNCATION,
    subchannels: int = ch.SUBCHANNELS, cell_radius: float = ch.CELL_RADIUS, path_loss_exponent: float = ch.PATH_LOSS,
    channel_seed: int = ch.CHANNEL_SEED,
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON line at the end."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log every message."),
    web: bool = typer.Option(False, "--web", help="Also serve the browser device page (device_web/) for phones."),
    web_host: str = typer.Option("0.0.0.0", help="Address the page is served on (--web)."),
    web_port: int = typer.Option(8080, help="Port of the page (--web)."),
    ws_url: str = typer.Option(None, help="The broker's MQTT-over-WebSockets URL the page connects to "
                               "(default ws://<this host>:9001; `deft edge broker --ws-port 9001` opens it)."),
    web_cert: Path = typer.Option(None, help="Certificate (PEM) to serve the page over HTTPS (phones need it "
                                  "for WASM threads)."),
    web_key: Path = typer.Option(None, help="Its key (PEM)."),
) -> None:
    """Run the rounds: distribute the bundle, collect and validate updates, aggregate, plug in, report."""
    opts = dict(locals())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    page = None
    try:
        coord = _coordinator(opts)
        if web:
            from edge_broker.web import announce, serve_page

            page = serve_page(web_host, web_port, certfile=web_cert, keyfile=web_key,
                              bundles={coord.bundle.hash: coord.bundle.root})
            typer.echo(announce(page, web_host, ws_url, fleet), err=True)
    except DeftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        _print_report(_run(coord), json_out)
    finally:
        if page is not None:
            page.stop()


def _run(coord) -> dict:
    """Run until done; SIGTERM stops between steps (start again to resume), an error is one line, exit 2."""

    def _stop(*_):
        coord.stop_requested = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        return coord.run()
    except DeftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; start again with the same --workdir to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        coord.close()


def _coordinator(o: dict):
    """The coordinator the options describe; a bad option raises a one-line :class:`DeftError`."""
    from pydantic import ValidationError

    from edge_broker.coordinator.config import CoordinatorConfig, CoordinatorError
    from edge_broker.coordinator.coordinator import Coordinator

    params = {}
    for kv in o["strategy_param"]:
        k, _, v = kv.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    hp = {"epochs": o["epochs"], "batch_size": o["batch_size"], "lr": o["lr"]}
    if o["steps"]:
        hp["steps"] = o["steps"]
    same = ("broker", "username", "fleet", "bundle", "workdir", "rounds", "min_devices", "min_updates", "quorum",
            "strategy", "clip_norm", "max_update_bytes", "eval_data", "model", "eval_bundle", "cost_table",
            "total_bandwidth", "max_packet_size")
    variants = {}
    for kv in o["variant"]:
        layout, sep, path = kv.partition("=")
        if not sep or not path:
            raise CoordinatorError(f"--variant {kv!r}: give LAYOUT=BUNDLE_DIR, e.g. --variant 1,2,1=bundles/emu121")
        variants[layout.strip()] = Path(path)
    try:
        cfg = CoordinatorConfig(
            **{k: o[k] for k in same}, password=_password(o["password"], o["accounts"], o["username"]),
            devices=[d.strip() for d in o["devices"].split(",") if d.strip()] or None,
            wait_devices_s=o["wait_devices"], deadline_s=o["deadline"], strategy_params=params, hyperparams=hp,
            encoding=o["encoding"].value, allocation=o["allocation"].value if o["allocation"] else None,
            controller=o["controller"], controller_variants=variants,
            channel=ch.channel_config(o["channel"], o["snr_db"], o["truncation"], o["subchannels"], o["cell_radius"],
                                      o["path_loss_exponent"], o["channel_seed"]))
    except ValidationError as exc:
        raise CoordinatorError("{}: {}".format(*first_error(exc, "config"))) from None
    return Coordinator(cfg)


def _print_report(report: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(report, default=str))
        return
    for r in report["rounds"]:
        acc = f"accuracy {r['accuracy']:.4f}" if r.get("accuracy") is not None else ""
        typer.echo(f"round {r['round']}: {r['accepted']} update(s) {acc}  up {r['bytes_up']:,} B  "
                   f"down {r['bytes_down']:,} B  {r['wall_s']:.1f}s")
    typer.echo(f"report: {report['report']}  adapter: {report['adapter_dir']}")

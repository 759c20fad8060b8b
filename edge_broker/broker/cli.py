"""``deft edge broker``: run the fleet's MQTT broker with kit-written accounts and ACL."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import get_args

import typer

from device_runtime.choices import choices
from device_runtime.errors import DeftError
from device_runtime.protocol.topics import DEFAULT_FLEET, Topics, check_id
from edge_broker.broker import Kind

BrokerKind = choices("BrokerKind", get_args(Kind))


def broker_command(
    kind: BrokerKind = typer.Option("auto", help="auto: Mosquitto if installed, else embedded."),
    devices: str = typer.Option("", help="Comma-separated device ids to create accounts for (random passwords)."),
    workdir: Path = typer.Option(Path("edge-broker"), help="Where config, password file, ACL, logs and data go."),
    accounts_file: Path = typer.Option(None, "--accounts", help="Accounts JSON (default WORKDIR/accounts.json); "
                                       "existing accounts are kept, new devices added."),
    host: str = typer.Option("127.0.0.1", help="Listen address (loopback unless you mean it)."),
    port: int = typer.Option(1883, help="Plain MQTT port."),
    fleet: str = typer.Option(DEFAULT_FLEET, help="Fleet name (the topic tree is deft/v1/<fleet>/...)."),
    max_packet_size: int = typer.Option(8 * 1024 * 1024, help="Largest MQTT packet; clients chunk above it."),
    tls_cert: Path = typer.Option(None, help="Server certificate (PEM) for an mqtts:// listener (Mosquitto)."),
    tls_key: Path = typer.Option(None, help="Server key (PEM)."),
    tls_ca: Path = typer.Option(None, help="CA for client certificates."),
    tls_port: int = typer.Option(8883, help="mqtts:// port."),
    require_client_cert: bool = typer.Option(False, help="Require client certificates (CN = device id)."),
    ws_port: int = typer.Option(None, help="Also listen for MQTT over WebSockets here (browser devices, "
                                "`deft edge serve --web`); wss:// with --tls-cert/--tls-key."),
    run_for: float = typer.Option(0.0, help="Stop after this many seconds (0: until Ctrl-C)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary line instead of text."),
) -> None:
    """Start the broker and keep it running until Ctrl-C."""
    from edge_broker.broker import BrokerError, load_accounts, make_accounts, save_accounts, start_broker
    from edge_broker.broker.base import Account

    try:
        check_id(fleet, "fleet name")
        wanted = [d.strip() for d in devices.split(",") if d.strip()]
        for d in wanted:
            check_id(d)
        path = accounts_file or workdir / "accounts.json"
        accounts: list[Account] = load_accounts(path) if path.exists() else make_accounts([])
        known = {a.username for a in accounts}
        accounts += [a for a in make_accounts(wanted) if a.role == "device" and a.username not in known]
        save_accounts(path, accounts)
        tls = None
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise BrokerError("TLS needs both --tls-cert and --tls-key")
            from edge_broker.broker.mosquitto import TLSListener

            tls = TLSListener(port=tls_port, certfile=str(tls_cert.resolve()), keyfile=str(tls_key.resolve()),
                              cafile=str(tls_ca.resolve()) if tls_ca else None, require_client_cert=require_client_cert)
        ws = None
        if ws_port:
            from edge_broker.broker.mosquitto import WebSocketListener

            ws = WebSocketListener(port=ws_port, certfile=str(tls_cert.resolve()) if tls_cert else None,
                                   keyfile=str(tls_key.resolve()) if tls_key else None)
        broker = start_broker(workdir, accounts, kind=kind.value, host=host, port=port, fleets=[fleet],  # type: ignore[arg-type]
                              max_packet_size=max_packet_size, tls=tls, websockets=ws)
    except DeftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    edge = next(a for a in accounts if a.role == "edge")
    watch = (f"mosquitto_sub -h {broker.host} -p {broker.port} -u {edge.username} -P '<password>' "
             f"-t '{Topics(fleet).everything()}' -v")
    summary = {"broker": broker.kind, "url": broker.url, "accounts": str(path), "fleet": fleet,
               "devices": [a.username for a in accounts if a.role == "device"], "watch": watch}
    if ws_port:
        summary["websockets"] = f"{'wss' if tls_cert else 'ws'}://{broker.host}:{ws_port}"
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{broker.kind} broker at {broker.url} (fleet {fleet!r}); accounts in {path}")
        typer.echo(f"watch the fleet: {watch}")
        if broker.kind == "embedded":
            typer.echo(f"warning: {getattr(broker, 'limits', '')}", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait(run_for if run_for > 0 else None)
    finally:
        broker.stop()

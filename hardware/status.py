"""What every board of the testbed is doing: reachable over SSH, kit version, service state (Ansible's
read-only ``status.yml``), and whether it is online in the fleet: the retained
``deft/v1/<fleet>/device/<id>/status`` message, read with the broker's edge account."""

from __future__ import annotations

import queue
import time
import uuid

from hardware.inventory import Device, Inventory


def fleet_status(inv: Inventory, devices: list[Device], *, wait_s: float = 3.0) -> dict[str, str]:
    """device id -> "online" / "offline" (its retained status) / "unknown" (never connected, or no broker)."""
    from device_runtime.protocol import parse_body
    from device_runtime.protocol.client import DeftClient, TLSOptions
    from device_runtime.protocol.messages import Status
    from device_runtime.protocol.topics import Topics
    from edge_broker.broker.base import load_accounts

    out = {d.id: "unknown" for d in devices}
    edge = next((a for a in load_accounts(inv.spec.broker.accounts) if a.role == "edge"), None)
    if edge is None:
        return out
    kw = {}
    if inv.spec.broker.ca is not None:
        kw["tls"] = TLSOptions(ca_file=str(inv.spec.broker.ca))
    client = DeftClient.from_url(
        inv.spec.broker.url,
        client_id=f"deft-hw-status-{uuid.uuid4().hex[:8]}",
        username=edge.username,
        password=edge.password,
        persistent_session=False,
        **kw,
    )
    try:
        client.connect(timeout=wait_s)
    except Exception as exc:  # noqa: BLE001 - an unreachable broker is a status, not a crash
        return {d: f"unknown (broker: {exc})"[:80] for d in out}
    try:
        t = Topics(inv.fleet)
        q: queue.Queue = queue.Queue()
        for d in devices:
            client.subscribe(t.status(d.id), into=q)
        deadline = time.monotonic() + wait_s
        pending = set(out)
        while pending and time.monotonic() < deadline:  # retained messages arrive right after the SUBACK
            try:
                msg = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            dev = msg.envelope.header.sender
            if dev in out:
                out[dev] = parse_body(msg.envelope, Status).state
                pending.discard(dev)
    finally:
        client.close()
    return out


def collect(inv: Inventory, devices: list[Device], *, on_event=None) -> list[dict]:
    from hardware.provision import run_playbook

    results = run_playbook(inv, devices, "status.yml", on_event=on_event)
    online = fleet_status(inv, devices)
    rows = []
    for d in devices:
        r = results[d.id]
        kit = r.facts.get("kit version", {})
        svc = r.facts.get("service state", {})
        version = (kit.get("stdout") or "").strip() if kit.get("rc") == 0 else None
        if r.unreachable:
            service = "unknown"
        elif not d.systemd:
            service = "not managed"
        else:
            service = (svc.get("stdout") or "unknown").strip() or "unknown"
        rows.append(
            {
                "id": d.id,
                "host": d.host,
                "board": d.board,
                "os": d.os,
                "reachable": not r.unreachable,
                "kit_version": version,
                "service": service,
                "fleet": online[d.id],
                "problem": "; ".join(r.messages) or None,
            }
        )
    return rows

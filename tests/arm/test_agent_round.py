"""An emulated aarch64 device agent (plain onnxruntime, no torch) completes a real round: Mosquitto and
the edge coordinator run on the x86 host on 127.0.0.1, the agent runs here."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from tests.arm.conftest import REPO

SST2_TRAIN = REPO / "data" / "sst2" / "train.tsv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_emulated_agent_completes_a_round(arm_fixture, host_process, tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("needs Mosquitto on the host")
    before = set(sys.modules)
    bundle = arm_fixture("step_bundle") / "bundle"
    port = _free_port()
    broker = host_process("-m", "deftkit.cli", "edge", "broker", "--devices", "pi-1", "--fleet", "lab", "--workdir",
                          str(tmp_path / "broker"), "--port", str(port), "--json")
    line = broker.stdout.readline()
    assert line, broker.stderr.read()[-3000:]
    info = json.loads(line)
    accounts = {a["username"]: a["password"] for a in json.loads(Path(info["accounts"]).read_text())["accounts"]}
    url = f"mqtt://127.0.0.1:{port}"
    edge = host_process("-m", "deftkit.cli", "edge", "serve", "--bundle", str(bundle), "--broker", url, "--accounts",
                        info["accounts"], "--fleet", "lab", "--devices", "pi-1", "--rounds", "1", "--steps", "2",
                        "--batch-size", "4", "--deadline", "600", "--encoding", "int8", "--workdir",
                        str(tmp_path / "edge"), "--json")
    from device_runtime.agent import AgentConfig, DeviceAgent

    data = tmp_path / "rows.tsv"
    data.write_text("\n".join(SST2_TRAIN.read_text().splitlines()[:17]) + "\n")
    agent = DeviceAgent(AgentConfig(broker=url, device_id="pi-1", password=accounts["pi-1"], fleet="lab", data=data,
                                    workdir=tmp_path / "device", max_rounds=1, threads=1))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(agent.run()), daemon=True)
    t.start()
    out, err = edge.communicate(timeout=900)
    t.join(timeout=120)
    assert edge.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["rounds"][0]["accepted"] == 1 and report["rounds"][0]["devices"] == ["pi-1"]
    assert result["rounds"][0]["accepted"] is True and result["rounds"][0]["steps"] == 2
    assert result["bytes_down"] > 0  # the bundle came over MQTT
    leaked = [m for m in ("torch", "transformers", "peft", "onnx") if m in sys.modules and m not in before]
    assert leaked == [], f"the device agent imported {leaked}"

"""A device in a torch-free environment takes part in a real round: the broker and the coordinator run
in the host environment (subprocesses), the agent runs here, where torch cannot even be imported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.device_only.conftest import REPO, export_python

SST2_TRAIN = REPO / "data" / "sst2" / "train.tsv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torch_free_device_agent_completes_a_round(device_bundle, tmp_path):
    before = set(sys.modules)
    py = str(export_python())
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    port = _free_port()
    procs: list[subprocess.Popen] = []
    try:
        broker = subprocess.Popen([py, "-m", "deftkit.cli", "edge", "broker", "--devices", "pi-1", "--fleet", "lab",
                                   "--workdir", str(tmp_path / "broker"), "--port", str(port), "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        procs.append(broker)
        info = json.loads(broker.stdout.readline())
        accounts = {a["username"]: a["password"] for a in json.loads(Path(info["accounts"]).read_text())["accounts"]}
        url = f"mqtt://127.0.0.1:{port}"
        edge = subprocess.Popen([py, "-m", "deftkit.cli", "edge", "serve", "--bundle", str(device_bundle),
                                 "--broker", url,
                                 "--accounts", info["accounts"], "--fleet", "lab", "--devices", "pi-1", "--rounds", "1",
                                 "--steps", "4", "--batch-size", "8", "--deadline", "120", "--encoding", "int8",
                                 "--workdir", str(tmp_path / "edge"), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        procs.append(edge)
        from device_runtime.agent import AgentConfig, DeviceAgent

        data = tmp_path / "rows.tsv"
        data.write_text("\n".join(SST2_TRAIN.read_text().splitlines()[:65]) + "\n")
        agent = DeviceAgent(AgentConfig(broker=url, device_id="pi-1", password=accounts["pi-1"], fleet="lab", data=data,
                                        workdir=tmp_path / "device", max_rounds=1, threads=1))
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(agent.run()), daemon=True)
        t.start()
        out, err = edge.communicate(timeout=300)
        t.join(timeout=60)
        assert edge.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["rounds"][0]["accepted"] == 1 and report["rounds"][0]["devices"] == ["pi-1"]
        assert result["rounds"][0]["accepted"] is True and result["rounds"][0]["steps"] == 4
        assert result["bytes_down"] > 0  # the bundle came over MQTT
        assert (tmp_path / "device" / "bundles").is_dir()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    leaked = [m for m in ("torch", "transformers", "peft", "onnx") if m in sys.modules and m not in before]
    assert leaked == [], f"the device agent imported {leaked}"

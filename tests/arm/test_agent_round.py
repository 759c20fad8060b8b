"""An emulated aarch64 device agent (plain onnxruntime, no torch) completes a real round: Mosquitto and
the edge coordinator run on the x86 host on 127.0.0.1, the agent runs here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests._agent_round import run_one_round


def test_emulated_agent_completes_a_round(arm_fixture, host_process, tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("needs Mosquitto on the host")
    bundle = arm_fixture("step_bundle") / "bundle"
    run_one_round(host_process, bundle, tmp_path, rows=16, steps=2, batch_size=4, deadline=600, timeout=900,
                  join=120)

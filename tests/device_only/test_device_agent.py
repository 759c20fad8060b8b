"""A device in a torch-free environment takes part in a real round: the broker and the coordinator run
in the host environment (subprocesses), the agent runs here, where torch cannot even be imported."""

from __future__ import annotations

import os

from tests._agent_round import host_processes, run_one_round
from tests.device_only.conftest import REPO, export_python


def test_torch_free_device_agent_completes_a_round(device_bundle, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with host_processes(str(export_python()), REPO, env) as start:
        run_one_round(start, device_bundle, tmp_path, rows=64, steps=4, batch_size=8, deadline=120, timeout=300,
                      join=60)
    assert (tmp_path / "device" / "bundles").is_dir()

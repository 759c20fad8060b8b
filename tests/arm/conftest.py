"""Fixtures of the aarch64 proof suite.

The suite runs under aarch64 emulation (``make test-arm``: ``python -m tests.arm.emulator pytest
tests/arm``) and natively in any environment (``.venv``, ``.venv-device``). What it compares against
comes from the host: ``DEFT_ARM_FIXTURES`` names a directory written by ``tests/arm/make_fixtures.py``;
without it the fixtures are made here, in a subprocess of the host Python (``DEFT_EXPORT_PYTHON``,
default ``.venv/bin/python``), as the device-only suite makes its bundles.

An emulated test may start host (x86) programs: qemu-user hands an ``execve`` of an x86 binary to the
host kernel, which runs it natively. Use :func:`host_env` for them, never this process's environment
(its PYTHONPATH holds aarch64 wheels).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._agent_round import host_processes
from tests.device_only.conftest import export_python

REPO = Path(__file__).resolve().parents[2]
#: set by the emulator to the machine and onnxruntime version the emulated interpreter must report
EMULATED_MACHINE = os.environ.get("DEFT_ARM_MACHINE")
EMULATED_ORT = os.environ.get("DEFT_ARM_ORT_VERSION")


def host_python() -> Path:
    return export_python()


def host_env(**extra: str) -> dict[str, str]:
    """The environment for a host-side Python started from a test (emulated or not)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONNOUSERSITE") and not k.startswith(("DEFT_ARM_", "QEMU_"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="session")
def arm_fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("DEFT_ARM_FIXTURES")
    if given:
        out = Path(given)
        if not (out / "index.json").is_file():
            pytest.fail(f"DEFT_ARM_FIXTURES={given} has no index.json: run `python -m tests.arm.make_fixtures {given}`")
        return out
    py = host_python()
    if not py.exists():
        pytest.fail(f"the host Python {py} does not exist; run `make install` or set DEFT_EXPORT_PYTHON")
    out = tmp_path_factory.mktemp("arm-fixtures")
    r = subprocess.run([str(py), "-m", "tests.arm.make_fixtures", str(out)], check=False, cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=host_env())
    assert r.returncode == 0, f"making the host fixtures failed:\n{r.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def arm_fixture(arm_fixtures_dir: Path) -> Callable[[str], Path]:
    """``arm_fixture("payload")`` -> the directory the host wrote for that fixture."""
    made = json.loads((arm_fixtures_dir / "index.json").read_text())["fixtures"]

    def get(name: str) -> Path:
        if name not in made:
            pytest.fail(f"host fixture {name!r} is not in {arm_fixtures_dir} (has {made}): "
                        "register it in tests/arm/make_fixtures.py and make the fixtures again")
        return arm_fixtures_dir / name

    return get


@pytest.fixture
def host_process() -> Iterator[Callable[..., subprocess.Popen]]:
    """``host_process("-m", "deftkit.cli", "edge", "broker", ...)`` -> a host Python process (text pipes);
    every process started is terminated (then killed) at teardown."""
    with host_processes(str(host_python()), REPO, host_env()) as start:
        yield start

"""The host side of ``make test-arm`` (tests/arm/emulator.py, make_fixtures.py): which aarch64 wheels it
installs, and the one-line errors for what it cannot work with. The emulated suite itself is tests/arm."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.arm.emulator import EMULATED_ORT, aarch64_constraints, device_requirements
from tests.arm.make_fixtures import FIXTURES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject(device: list[str], **extras: list[str]) -> dict:
    return {"project": {"name": "deftkit", "dependencies": ["numpy>=1.26"],
                        "optional-dependencies": {"device": device, **extras}}}


def test_any_onnxruntime_requirement_becomes_the_emulated_pin():
    training = _pyproject(["onnxruntime-training-cpu==1.19.2; platform_machine == 'x86_64'", "paho-mqtt>=2.1,<3"])
    plain = _pyproject(["onnxruntime>=1.20", "paho-mqtt>=2.1,<3"])
    for spec in (training, plain):
        reqs = device_requirements(spec)
        assert reqs[:2] == ["numpy>=1.26", EMULATED_ORT] and "pytest" in reqs and "pytest-timeout" in reqs
        assert not any(r.startswith("onnxruntime") and r != EMULATED_ORT for r in reqs)


def test_markers_are_evaluated_for_aarch64_and_self_extras_followed():
    spec = _pyproject(["deftkit[light]", "x86only; platform_machine == 'x86_64'",
                       "armonly>=1; platform_machine == 'aarch64'"], light=["tokenizers>=0.20"])
    assert device_requirements(spec) == ["numpy>=1.26", "tokenizers>=0.20", "armonly>=1", "pytest", "pytest-timeout"]


def test_constraints_drop_onnxruntime_pins_only():
    lines = ["# comment", "numpy==2.4.6", "onnxruntime-training-cpu==1.19.2", "onnxruntime==1.32.0", "",
             "paho-mqtt==2.2.0"]
    assert aarch64_constraints(lines) == ["numpy==2.4.6", "paho-mqtt==2.2.0"]


def test_the_repositorys_device_extra_maps_cleanly():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        reqs = device_requirements(tomllib.load(f))
    assert EMULATED_ORT in reqs and not any(r.startswith(("torch", "transformers", "peft", "onnx=")) for r in reqs)


def test_missing_qemu_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=REPO, DEFT_ARM_DIR=str(tmp_path / "arm"))
    r = subprocess.run([sys.executable, "-m", "tests.arm.emulator", "setup"], check=False, capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: qemu-aarch64-static not found")
    assert "apt-get install qemu-user-static" in r.stderr
    assert not (tmp_path / "arm").exists()


def test_unknown_fixture_name_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tests.arm.make_fixtures", str(tmp_path / "fx"), "nope"], check=False,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown fixture(s) nope; known: ")
    assert all(name in r.stderr for name in FIXTURES) and not (tmp_path / "fx").exists()

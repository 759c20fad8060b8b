"""(a) where the suite runs: the emulated aarch64 CPU, no torch, the plain onnxruntime; (b) the device
runtime imports there. Under ``make test-arm`` the emulator sets what to expect; natively the
emulation-only checks skip and the rest still hold."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import platform
import sys
from pathlib import Path

import pytest

from tests.arm.conftest import EMULATED_MACHINE, EMULATED_ORT

HOST_ONLY = ("torch", "transformers", "peft", "onnx")
EM_AARCH64 = 183  # ELF e_machine


def _elf_machine(path: str | Path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


@pytest.mark.skipif(not EMULATED_MACHINE, reason="emulation only (make test-arm)")
def test_runs_on_the_emulated_cpu():
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_native

    assert platform.machine() == EMULATED_MACHINE
    assert sys.version_info[:2] == (3, 11)
    # the interpreter and onnxruntime's native library really are aarch64 code
    assert _elf_machine(os.path.realpath(sys.executable)) == EM_AARCH64
    assert _elf_machine(ort_native.__file__) == EM_AARCH64


@pytest.mark.skipif(os.environ.get("DEFT_DEVICE_ONLY") != "1", reason="only meaningful in a device-only environment")
def test_torch_is_not_there():
    assert importlib.util.find_spec("torch") is None
    with pytest.raises(ImportError):
        import torch  # noqa: F401


def test_onnxruntime_is_the_expected_package():
    import onnxruntime

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
    if EMULATED_ORT:
        assert onnxruntime.__version__ == EMULATED_ORT
        # the plain package: no training API to fall back on
        with pytest.raises(ImportError):
            import onnxruntime.training


def test_device_runtime_modules_import_without_host_packages():
    import device_runtime

    before = set(sys.modules)
    names = [m.name for m in pkgutil.walk_packages(device_runtime.__path__, "device_runtime.")]
    assert "device_runtime.protocol.client" in names and "device_runtime.payload" in names
    for name in names:
        importlib.import_module(name)
    leaked = [m for m in HOST_ONLY if m in sys.modules and m not in before]
    assert leaked == [], f"importing the device runtime pulled in {leaked}"

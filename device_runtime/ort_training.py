"""Import ``onnxruntime.training.api`` without torch.

``onnxruntime/training/__init__.py`` imports ``artifacts`` (which needs ``onnx``) and
``onnxruntime.tools`` (which imports torch when it is installed), and even ``import onnxruntime``
tries ``onnxruntime.training.ortmodule`` (torch again). The device needs none of that: only the
small ``training.api`` package, which depends on the compiled extension alone. So we register a bare
package module for ``onnxruntime.training`` whose ``__path__`` points at the real directory (its
submodules stay importable, its ``__init__`` never runs) and block ``ortmodule`` while
``onnxruntime`` itself is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from device_runtime.errors import BackendUnavailable

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


def _install_stub_package() -> None:
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without executing it
    if spec is None or spec.origin is None:
        raise BackendUnavailable(
            "ONNX Runtime is not installed; install onnxruntime-training-cpu for --format ort-training bundles, "
            "or re-export the bundle as a step graph (the default), which plain onnxruntime trains"
        )
    training_dir = os.path.join(os.path.dirname(spec.origin), "training")
    if not os.path.isdir(os.path.join(training_dir, "api")):
        raise BackendUnavailable(
            "the installed onnxruntime has no training API (plain `onnxruntime` shadows "
            "`onnxruntime-training`); pip uninstall onnxruntime and install onnxruntime-training-cpu, "
            "or re-export the bundle as a step graph (the default)"
        )
    stub = types.ModuleType(_TRAINING, "onnxruntime.training namespace (device_runtime stub, no torch)")
    stub.__path__ = [training_dir]
    stub.__package__ = _TRAINING
    stub.__file__ = os.path.join(training_dir, "__init__.py")
    sys.modules[_TRAINING] = stub


def load_training_api() -> types.ModuleType:
    """Return ``onnxruntime.training.api`` (CheckpointState, Module, Optimizer) without importing torch.

    If the real ``onnxruntime.training`` was already imported by someone else (e.g. the exporter in
    the same host process), it is reused untouched.
    """
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    if _TRAINING not in sys.modules:
        _install_stub_package()
        blocked = _ORTMODULE not in sys.modules
        if blocked:
            sys.modules[_ORTMODULE] = None  # type: ignore[assignment]  # makes ORT's probe an ImportError
        try:
            import onnxruntime
        finally:
            if blocked and sys.modules.get(_ORTMODULE, 0) is None:
                del sys.modules[_ORTMODULE]
        onnxruntime.training = sys.modules[_TRAINING]  # type: ignore[attr-defined]
    try:
        api = importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise BackendUnavailable(
            f"ONNX Runtime's training API could not be loaded ({exc}); install onnxruntime-training-cpu "
            "or re-export the bundle as a step graph (the default)"
        ) from exc
    from onnxruntime.capi import _pybind_state as capi

    if not hasattr(capi, "Module"):
        raise BackendUnavailable(
            "the installed onnxruntime is an inference-only build; install onnxruntime-training-cpu "
            "or re-export the bundle as a step graph (the default)"
        )
    return api


def set_seed(seed: int) -> None:
    """Seed ORT's random generator (dropout), so each step's randomness depends only on its index."""
    load_training_api()
    from onnxruntime.capi import _pybind_state as capi

    capi.set_seed(int(seed))


def quiet() -> None:
    """Keep ORT's C++ warnings (e.g. unused initializers) out of the user's terminal."""
    load_training_api()
    from onnxruntime.capi import _pybind_state as capi

    capi.set_default_logger_severity(3)

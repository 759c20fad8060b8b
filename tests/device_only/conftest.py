"""Fixtures for the device-only suite.

This suite runs in a virtual environment with only the ``device`` extra (no torch, transformers,
peft or onnx). Bundles are therefore made by the host exporter in a SUBPROCESS of the main
environment's Python: ``DEFT_EXPORT_PYTHON`` (default ``.venv/bin/python`` in the repository).
``DEFT_DEVICE_BUNDLE`` may point at a ready-made tiny BERT bundle instead (e.g. on a real board).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_EXPORT = """
import sys
from tests._models import DEVICE_BUNDLE_OPTIONS, cached_bundle, tiny_model_path
kind = sys.argv[1]
print(cached_bundle(tiny_model_path(kind), **DEVICE_BUNDLE_OPTIONS[kind]))
"""


def export_python() -> Path:
    p = Path(os.environ.get("DEFT_EXPORT_PYTHON", REPO / ".venv" / "bin" / "python"))
    return p if p.is_absolute() else REPO / p


def export_in_subprocess(kind: str) -> Path:
    """The tiny ``kind`` bundle from the shared test cache (``tests._models.cached_bundle``, exported there
    by the host Python on first use); read-only to the tests."""
    py = export_python()
    if not py.exists():
        pytest.fail(f"the exporter's Python {py} does not exist; run `make install` or set DEFT_EXPORT_PYTHON")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run([str(py), "-c", _EXPORT, kind], check=False, cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"export of a tiny {kind} bundle failed:\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def device_bundle() -> Path:
    given = os.environ.get("DEFT_DEVICE_BUNDLE")
    if given:
        return Path(given)
    return export_in_subprocess("bert")


@pytest.fixture(scope="session")
def device_lm_bundle() -> Path:
    return export_in_subprocess("gpt2")

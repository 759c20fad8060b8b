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
from pathlib import Path
from tests._models import make_tiny_model
from export import export_bundle
out, kind = Path(sys.argv[1]), sys.argv[2]
model = make_tiny_model(kind, out.parent / (kind + "-model"))
if kind == "gpt2":
    export_bundle(str(model), out, task="causal-lm", max_length=32)
else:
    export_bundle(str(model), out, task="seq-cls", labels=["negative", "positive"], max_length=32)
"""


def export_python() -> Path:
    p = Path(os.environ.get("DEFT_EXPORT_PYTHON", REPO / ".venv" / "bin" / "python"))
    return p if p.is_absolute() else REPO / p


def export_in_subprocess(kind: str, out: Path) -> Path:
    py = export_python()
    if not py.exists():
        pytest.fail(f"the exporter's Python {py} does not exist; run `make install` or set DEFT_EXPORT_PYTHON")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run([str(py), "-c", _EXPORT, str(out), kind], check=False, cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"export of a tiny {kind} bundle failed:\n{r.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def device_bundle(tmp_path_factory) -> Path:
    given = os.environ.get("DEFT_DEVICE_BUNDLE")
    if given:
        return Path(given)
    return export_in_subprocess("bert", tmp_path_factory.mktemp("device-bundles") / "bert")


@pytest.fixture(scope="session")
def device_lm_bundle(tmp_path_factory) -> Path:
    return export_in_subprocess("gpt2", tmp_path_factory.mktemp("device-bundles") / "gpt2")

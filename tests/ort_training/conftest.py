"""The optional ``ort-training`` format runs only in ``.venv-ort-training`` (``make test-ort-training``):
onnxruntime-training 1.19.2 replaces plain onnxruntime there (the two share a module name)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip this folder's tests (only these: the hook sees the whole session) without the training build."""
    if importlib.util.find_spec("onnxruntime.training") is None:
        skip = pytest.mark.skip(reason="needs onnxruntime-training (make test-ort-training)")
        for item in items:
            if HERE in Path(str(item.fspath)).resolve().parents:
                item.add_marker(skip)

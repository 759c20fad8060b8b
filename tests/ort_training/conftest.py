"""The optional ``ort-training`` format runs only in ``.venv-ort-training`` (``make test-ort-training``):
onnxruntime-training 1.19.2 replaces plain onnxruntime there (the two share a module name)."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("onnxruntime.training") is None:
        skip = pytest.mark.skip(reason="needs onnxruntime-training (make test-ort-training)")
        for item in items:
            item.add_marker(skip)

"""Bundles the device-runtime tests share (made once per session with the exporter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._models import DEVICE_BUNDLE_OPTIONS


@pytest.fixture(scope="session")
def tiny_gpt2_bundle(tiny_model_dir, bundle_factory) -> Path:
    return bundle_factory(tiny_model_dir("gpt2"), **DEVICE_BUNDLE_OPTIONS["gpt2"])


@pytest.fixture(scope="session")
def tiny_prompt_bundle(tiny_model_dir, bundle_factory) -> Path:
    return bundle_factory(tiny_model_dir("bert"), task="seq-cls", labels=["negative", "positive"],
                          peft="prompt", num_virtual_tokens=4, max_length=32)

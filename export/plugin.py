"""Plug trained tensors back into the full model, and write them as a standard PEFT adapter.

Tensors trained on an emulator carry emulator block indices; the manifest's layer map renames them
to the original depth (``...layer.2...`` -> ``...layer.4...``) so they land where the emulator's
block came from. The result is an ordinary ``peft.PeftModel``; ``save_adapter`` writes
``adapter_config.json`` + ``adapter_model.safetensors`` that stock ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from device_runtime.bundle.manifest import Manifest
from export.architectures import architecture_for
from export.errors import ExportError


def to_full_names(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename emulator tensors to the full model's block indices using the layer map."""
    arch = architecture_for(manifest.model_type, manifest.task)
    rx = re.compile(r"((?:^|\.)" + re.escape(arch.blocks_path) + r"\.)(\d+)(\.)")
    layer_map = manifest.emulator.layer_map
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        def repl(m: re.Match[str], name: str = name) -> str:
            i = int(m.group(2))
            if i >= len(layer_map):
                raise ExportError(f"tensor '{name}' names block {i} but the emulator has {len(layer_map)} blocks")
            return f"{m.group(1)}{layer_map[i]}{m.group(3)}"

        out[rx.sub(repl, name, count=1)] = np.asarray(arr)
    return out


def full_peft_config(manifest: Manifest):
    from peft import PeftConfig

    d = dict(manifest.peft.peft_config)
    if not d:
        return None
    d.pop("base_model_name_or_path", None)
    return PeftConfig.from_peft_type(**d)


def load_full_model(manifest: Manifest, source: str | Path | None = None) -> torch.nn.Module:
    """The full (not emulated) task model the bundle was exported from, as the exporter loaded it."""
    from export.config import ExportConfig
    from export.loading import load_model

    cfg = ExportConfig(task=manifest.task, labels=manifest.labels or None, max_length=manifest.max_length)
    model, _ = load_model(str(source or manifest.source_model), cfg)
    return model


def plug_in(full_model: torch.nn.Module, manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Return ``full_model`` (modified in place) with the bundle's PEFT parts set to ``tensors``.

    ``tensors`` uses the bundle's names (emulator indices); unknown names, wrong shapes or
    non-finite values are refused with an error naming the tensor.
    """
    from peft import get_peft_model

    arch = architecture_for(full_model.config.model_type, manifest.task)
    n = getattr(full_model.config, arch.num_layers_attr)
    if n != manifest.emulator.num_layers_full:
        raise ExportError(
            f"the full model has {n} blocks but the bundle was exported from a {manifest.emulator.num_layers_full}"
            "-block model; plug into the model the bundle came from"
        )
    cfg = full_peft_config(manifest)
    model = get_peft_model(full_model, cfg) if cfg is not None else full_model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, arr in to_full_names(manifest, tensors).items():
            if name not in params:
                raise ExportError(f"trained tensor '{name}' has no place in the full model (wrong bundle?)")
            if tuple(params[name].shape) != tuple(arr.shape):
                raise ExportError(
                    f"trained tensor '{name}' has shape {tuple(arr.shape)}, the full model expects "
                    f"{tuple(params[name].shape)}"
                )
            if not np.isfinite(arr).all():
                raise ExportError(f"trained tensor '{name}' has NaN or infinite values; refusing to plug it in")
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
    model.eval()
    return model


def save_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the standard PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ExportError("this bundle has no PEFT adapter (head-only); save the model with save_pretrained")
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    return out

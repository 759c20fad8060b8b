"""Emulator variants of one round's bundle: their layout names and the tensor-name maps between them.

Each layout's bundle names its LoRA tensors by its own block indices (``...layer.2...`` is the last
block of a 1,1,1 emulator, ``...layer.5...`` of the whole MiniLM), so a device training a variant gets the
global state renamed into its bundle's names (``Task.tensor_names``) and its update is renamed back
before aggregation. Tensors correspond when they sit in the same block of the full model (the layer
maps) and their names agree once the block index is blanked; a variant tensor without a counterpart is
refused (the variants must train the same adapters: export them with the same LoRA settings).
"""

from __future__ import annotations

import re

from device_runtime.bundle.manifest import Manifest, TensorSpec
from device_runtime.errors import DeftError

_BLOCK = re.compile(r"\.\d+\.")


class VariantError(DeftError, ValueError):
    """A variant bundle does not fit the round's bundle; the message names the tensor and the fix."""


def layout_of(manifest: Manifest) -> str:
    """``FIRST,MIDDLE,LAST`` of a bundle's emulator (the whole 6-block MiniLM with LoRA on its ends: 1,4,1)."""
    emu = manifest.emulator
    n, adapters = len(emu.layer_map), set(emu.adapter_blocks)
    first = next((i for i in range(n) if i not in adapters), n)
    last = next((i for i in range(n) if n - 1 - i not in adapters), n)
    if first + last >= n:  # every block trainable: no middle
        return f"{n},0,0"
    return f"{first},{n - first - last},{last}"


def _key(m: Manifest, t: TensorSpec) -> tuple[int | None, str]:
    if t.block is None:
        return None, t.name
    return m.emulator.layer_map[t.block], _BLOCK.sub(".#.", t.name, count=1)


def name_map(main: Manifest, variant: Manifest) -> dict[str, str]:
    """Global (``main``) tensor name -> ``variant`` tensor name, for every tensor the variant trains."""
    by_key = {_key(main, t): t.name for t in main.trainable}
    out = {}
    for t in variant.trainable:
        k = _key(variant, t)
        if k not in by_key:
            raise VariantError(f"variant tensor '{t.name}' (full-model block {k[0]}) has no counterpart in the "
                               "round's bundle; export every variant with the same LoRA settings and blocks")
        out[by_key[k]] = t.name
    return out


def rename_updates(ups: list, maps: dict[str, dict[str, str]]) -> list:
    """Updates of variant devices (``maps[device]``: global -> variant name) back in the global names."""
    from edge_broker.aggregation import ClientUpdate

    out = []
    for u in ups:
        m = maps.get(u.device)
        if m:
            back = {v: k for k, v in m.items()}
            u = ClientUpdate(u.device, {back.get(k, k): v for k, v in u.tensors.items()}, u.samples,
                             is_delta=u.is_delta)
        out.append(u)
    return out

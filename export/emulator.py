"""Emulator construction (Offsite-Tuning / FedPEAT).

A device cannot hold the whole model, so it trains a compressed *emulator*: the first ``l`` and the
last ``r`` blocks are kept as the trainable adapter region, and ``k`` of the middle blocks are kept,
uniformly spaced and frozen. The layer map (emulator block -> original block) is what lets the
edge plug the trained tensors back into the full model at the right depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from device_runtime.bundle.manifest import EmulatorSpec
from export.architectures import Architecture, get_module, set_module
from export.errors import ExportError


def select_layers(num_layers: int, keep_first: int, keep_last: int, middle: int,
                  middle_blocks: Sequence[int] | None = None) -> EmulatorSpec:
    """Which original blocks an emulator keeps.

    Middle block ``i`` of ``k`` is the one at index ``round(i * (m - 1) / (k - 1))`` within the
    ``m`` middle blocks (the centre one when ``k == 1``), unless ``middle_blocks`` names them
    (original depths, ``--emulator-middle``).
    """
    if keep_first < 0 or keep_last < 0 or middle < 0:
        raise ExportError("emulator block counts must be >= 0 (--emulator FIRST,MIDDLE,LAST)")
    if keep_first + keep_last == 0:
        raise ExportError(
            "the emulator keeps no trainable blocks: keep at least one first or last block (e.g. --emulator 2,0,2)"
        )
    if keep_first + keep_last > num_layers:
        raise ExportError(
            f"the emulator keeps {keep_first}+{keep_last} adapter blocks but the model has only {num_layers}"
        )
    first = list(range(keep_first))
    last = list(range(num_layers - keep_last, num_layers))
    mid_pool = list(range(keep_first, num_layers - keep_last))
    if middle > len(mid_pool):
        raise ExportError(
            f"the emulator asks for {middle} middle blocks but only {len(mid_pool)} lie between the kept ends"
        )
    mid: list[int]
    if middle_blocks is not None:
        mid = list(middle_blocks)
        if len(mid) != middle or sorted(set(mid)) != mid or any(i not in mid_pool for i in mid):
            raise ExportError(f"--emulator-middle {','.join(map(str, mid))}: give {middle} increasing block depths "
                              f"from the middle blocks {mid_pool}")
    elif middle == 0:
        mid = []
    elif middle == 1:
        mid = [mid_pool[round((len(mid_pool) - 1) / 2)]]
    else:
        mid = [mid_pool[round(i * (len(mid_pool) - 1) / (middle - 1))] for i in range(middle)]
    layer_map = first + mid + last
    adapter = list(range(keep_first)) + list(range(len(layer_map) - keep_last, len(layer_map)))
    return EmulatorSpec(
        num_layers_full=num_layers,
        layer_map=layer_map,
        adapter_blocks=adapter,
        is_full=layer_map == list(range(num_layers)),
    )


def full_spec(num_layers: int) -> EmulatorSpec:
    return EmulatorSpec(num_layers_full=num_layers, layer_map=list(range(num_layers)),
                        adapter_blocks=list(range(num_layers)), is_full=True)


def apply_emulator(model: torch.nn.Module, arch: Architecture, spec: EmulatorSpec) -> None:
    """Drop the blocks the emulator does not keep (in place) and fix the config to match."""
    if spec.is_full:
        return
    blocks = get_module(model, arch.blocks_path)
    kept = torch.nn.ModuleList([blocks[i] for i in spec.layer_map])
    for new_idx, block in enumerate(kept):
        # Decoder attention layers carry their index for the KV cache; keep it consistent.
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    set_module(model, arch.blocks_path, kept)
    setattr(model.config, arch.num_layers_attr, len(spec.layer_map))
    if hasattr(model.config, "layer_types") and isinstance(model.config.layer_types, list):
        model.config.layer_types = [model.config.layer_types[i] for i in spec.layer_map]

"""Attach PEFT parts with ``peft`` itself, so tensor names are PEFT's own.

Per-block parameter-size control (DEFT technique 1) is a LoRA rank per block (``rank_pattern``; a
block with rank 0 gets no LoRA via ``layers_to_transform``). Trainable-block selection freezes the
PEFT tensors of blocks a device is not assigned, which is how LoLa DEFT gives a device its share.
"""

from __future__ import annotations

import re

import torch

from device_runtime.bundle.manifest import EmulatorSpec, PeftSpec, TensorSpec
from export.architectures import Architecture
from export.config import ExportConfig
from export.errors import ExportError


def block_ranks(cfg: ExportConfig, spec: EmulatorSpec) -> dict[int, int]:
    """LoRA rank per emulator block. Frozen middle blocks of an emulator get none."""
    n = len(spec.layer_map)
    if cfg.lora_ranks is not None:
        if len(cfg.lora_ranks) != n:
            raise ExportError(
                f"--lora-ranks gives {len(cfg.lora_ranks)} ranks but the (emulator) model has {n} blocks"
            )
        ranks = {i: r for i, r in enumerate(cfg.lora_ranks) if r > 0}
        bad = sorted(set(ranks) - set(spec.adapter_blocks))
        if bad:
            raise ExportError(f"blocks {bad} are frozen emulator middle blocks and cannot take LoRA ranks")
        return ranks
    if cfg.rank_schedule is not None:
        lo, hi = cfg.rank_schedule
        blocks = sorted(spec.adapter_blocks)
        span = max(1, len(blocks) - 1)
        return {b: int(round(lo + (hi - lo) * k / span)) for k, b in enumerate(blocks)}
    return {i: cfg.lora_r for i in spec.adapter_blocks}


def _rank_pattern(arch: Architecture, ranks: dict[int, int], default: int) -> dict[str, int]:
    return {rf"{re.escape(arch.blocks_path)}\.{i}\..*": r for i, r in sorted(ranks.items()) if r != default}


def lora_config(arch: Architecture, cfg: ExportConfig, ranks: dict[int, int], task_type: str | None,
                block_index_map: dict[int, int] | None = None):
    """A ``peft.LoraConfig``. ``block_index_map`` renumbers blocks (emulator -> full model) for plug-in."""
    from peft import LoraConfig

    m = block_index_map or {i: i for i in ranks}
    mapped = {m[i]: r for i, r in ranks.items()}
    default = max(set(mapped.values()), key=list(mapped.values()).count)
    return LoraConfig(
        r=default,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets or arch.default_lora_targets),
        layers_to_transform=sorted(mapped),
        rank_pattern=_rank_pattern(arch, mapped, default),
        task_type=task_type,
        modules_to_save=[arch.head] if (cfg.head and arch.head and cfg.task == "seq-cls") else None,
    )


def prompt_config(cfg: ExportConfig, task_type: str | None):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)


def _task_type(cfg: ExportConfig) -> str:
    return "SEQ_CLS" if cfg.task == "seq-cls" else "CAUSAL_LM"


def attach_peft(model: torch.nn.Module, arch: Architecture, cfg: ExportConfig, spec: EmulatorSpec):
    """Wrap ``model`` with PEFT. Returns the PeftModel and the config for the FULL model (plug-in)."""
    from peft import get_peft_model

    task_type = _task_type(cfg)
    if cfg.peft == "lora":
        _check_targets(model, arch, cfg)
        ranks = block_ranks(cfg, spec)
        peft_cfg = lora_config(arch, cfg, ranks, task_type)
        full_cfg = lora_config(arch, cfg, ranks, task_type, dict(enumerate(spec.layer_map)))
    elif cfg.peft in ("prompt", "head"):
        ranks = {}
        if cfg.peft == "head":
            if cfg.task != "seq-cls":
                raise ExportError("--peft head needs --task seq-cls (a causal LM has no separate head)")
            # Head-only: no PEFT wrapper; the head's own parameters are the trainable tensors.
            return _head_only(model, arch), None
        peft_cfg = prompt_config(cfg, task_type)
        full_cfg = peft_cfg
    else:
        raise ExportError(f"--peft {cfg.peft} is not supported yet; use lora, prompt or head")

    try:
        pm = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "not found in the base model" in msg or "Target modules" in msg:
            targets = cfg.lora_targets or list(arch.default_lora_targets)
            raise ExportError(
                f"LoRA targets {targets} match no module of this '{arch.model_type}' model; "
                f"e.g. use --lora-targets {','.join(arch.default_lora_targets)}"
            ) from None
        raise ExportError(f"PEFT could not be attached: {msg}") from None
    if cfg.task == "seq-cls" and not cfg.head:
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.requires_grad_(False)
    return pm, full_cfg


def _check_targets(model: torch.nn.Module, arch: Architecture, cfg: ExportConfig) -> None:
    """PEFT's own message for a target that matches nothing is long and generic; name the target."""
    targets = list(cfg.lora_targets or arch.default_lora_targets)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if arch.block_regex().search(n + ".") and not list(m.children())})
        raise ExportError(
            f"LoRA targets {missing} match no module of this '{arch.model_type}' model; "
            f"modules inside its blocks: {', '.join(leaves[:12])} (default: --lora-targets "
            f"{','.join(arch.default_lora_targets)})"
        )


def _head_only(model: torch.nn.Module, arch: Architecture) -> torch.nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(arch.head + "."))
    return model


def tensor_kind(name: str) -> str:
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    if "prompt_encoder" in name:
        return "prompt"
    if "modules_to_save" in name or "classifier" in name or ".score." in name:
        return "head"
    return "other"


def trainable_specs(model: torch.nn.Module, arch: Architecture, trainable_blocks: list[int] | None,
                    num_blocks: int) -> list[TensorSpec]:
    """The trainable tensors after block selection; freezes tensors of blocks not selected."""
    if trainable_blocks is not None:
        bad = [b for b in trainable_blocks if not 0 <= b < num_blocks]
        if bad:
            raise ExportError(
                f"trainable block index {bad} out of range: the (emulator) model has blocks 0..{num_blocks - 1}"
            )
    rx = arch.block_regex()
    specs: list[TensorSpec] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = rx.search(name)
        block = int(m.group(1)) if m else None
        if trainable_blocks is not None and block is not None and block not in trainable_blocks:
            p.requires_grad_(False)
            continue
        specs.append(TensorSpec(name=name, shape=tuple(p.shape), block=block, kind=tensor_kind(name)))
    if not specs:
        raise ExportError("nothing is trainable: the chosen blocks have no PEFT tensors and the head is off")
    return specs


def peft_spec(cfg: ExportConfig, arch: Architecture, spec: EmulatorSpec, full_cfg) -> PeftSpec:
    method = cfg.peft if cfg.peft == "head" or not (cfg.head and cfg.task == "seq-cls") else f"{cfg.peft}+head"
    ranks = block_ranks(cfg, spec) if "lora" in cfg.peft else {}
    return PeftSpec(
        method=method,
        lora_target_modules=list(cfg.lora_targets or arch.default_lora_targets) if ranks else [],
        lora_alpha=(cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r) if ranks else None,
        lora_dropout=cfg.lora_dropout,
        lora_ranks=ranks,
        num_virtual_tokens=cfg.num_virtual_tokens if "prompt" in cfg.peft else 0,
        modules_to_save=[arch.head] if (cfg.head and arch.head and cfg.task == "seq-cls") else [],
        trainable_blocks=cfg.trainable_blocks,
        peft_config=jsonable_peft_config(full_cfg) if full_cfg is not None else {},
    )


def jsonable_peft_config(peft_cfg) -> dict:
    d = peft_cfg.to_dict()
    out = {}
    for k, v in d.items():
        if isinstance(v, set):
            v = sorted(v)
        if hasattr(v, "value"):  # enums
            v = v.value
        out[k] = v
    return out

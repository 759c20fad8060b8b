"""LoLa DEFT in the coordinator: each round, match devices to blocks and give each its own bundle.

The allocator (:func:`edge_broker.allocation.planner.plan_round`, CRUNCH or the joint
bandwidth-and-block solver) decides which device trains which blocks from the devices' hello
profiles and a cost table (``deft hw profile``, or an analytic estimate). A device then gets a
*variant* of the round's bundle in which only its blocks' tensors are trainable (rebuilt from the
bundle itself, :func:`hardware.depth_variants.make_variant`; cached by block set), so it pays the
compute and memory of its blocks only and uploads only their tensors. The other LoRA tensors are
frozen in the variant and set from the global state on the device each round.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from device_runtime.bundle.files import hash_tree
from device_runtime.bundle.load import Bundle, load_bundle
from device_runtime.bundle.manifest import Manifest
from edge_broker.store import DeviceRecord

log = logging.getLogger("deft.edge")


def make_block_bundle(bundle: Bundle, blocks: list[int], head: bool, root: Path) -> Bundle:
    """A verified bundle of ``bundle`` where only ``blocks`` (and the head if ``head``) are trainable."""
    from hardware.depth_variants import make_variant

    name = "blocks-" + "-".join(map(str, sorted(blocks))) + ("-head" if head else "") + "-" + bundle.hash[:12]
    out = root / name
    if out.is_dir():
        try:
            return load_bundle(out)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            shutil.rmtree(out)
    staging = root / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    variant = make_variant(bundle.root, sorted(blocks), staging, head=head)
    if not (staging / "inference.onnx").exists():  # the same file: link it rather than copy 2x the model
        try:
            os.link(bundle.inference_model, staging / "inference.onnx")
        except OSError:
            shutil.copy(bundle.inference_model, staging / "inference.onnx")
    Manifest.dump(variant.model_copy(update={"files": hash_tree(staging)}), staging)
    staging.rename(out)
    return load_bundle(out)


class BlockPlanner:
    def __init__(self, bundle: Bundle, root: Path, method: str, cost_table: Path | None, total_bandwidth: float,
                 steps: int, bytes_per_value: float) -> None:
        from hardware.cost_table import CostTable

        self.bundle = bundle
        self.root = root
        self.method = method
        self.table = CostTable.model_validate_json(Path(cost_table).read_text()) if cost_table else None
        self.total_bandwidth = total_bandwidth
        self.steps = steps
        self.bytes_per_value = bytes_per_value

    def plan(self, devices: list[DeviceRecord]):
        """(plan, {device: its variant bundle}) for this round; idle devices get no bundle."""
        from edge_broker.allocation.planner import DeviceInfo, plan_round

        infos = [DeviceInfo(id=d.id, profile=d.profile, capabilities=d.capabilities) for d in devices]
        plan = plan_round(infos, self.bundle.manifest, self.table, self.total_bandwidth, self.method,
                          steps=self.steps, bytes_per_value=self.bytes_per_value)
        heads = {t.name for t in self.bundle.manifest.trainable if t.kind == "head"}
        bundles: dict[str, Bundle] = {}
        for d in plan.devices:
            if d.idle:
                continue
            head = bool(heads & set(plan.tensor_names_for(d.id)))
            bundles[d.id] = make_block_bundle(self.bundle, d.blocks, head, self.root)
            log.info("plan: %s trains blocks %s%s (predicted %.2fs, %.2f MHz)", d.id, d.blocks,
                     " + head" if head else "", d.predicted_latency_s, d.bandwidth_hz / 1e6)
        return plan, bundles

    def round_config(self, devices: list[DeviceRecord]) -> dict[str, Any]:
        """The round's stored config for this plan: who trains (``selected``), with which variant bundle
        and blocks, and the allocator's plan (its prediction goes into the report next to what happened)."""
        plan, variants = self.plan(devices)
        busy = [d.id for d in plan.devices if not d.idle]
        if plan.idle:
            log.info("plan: %s idle this round (more devices than blocks)", ", ".join(plan.idle))
        devs = {d.id: {"blocks": d.blocks, "layers": d.layers, "bandwidth_hz": d.bandwidth_hz,
                       "predicted_latency_s": d.predicted_latency_s, "board": d.board} for d in plan.devices}
        return {"selected": busy,
                "variants": {d: str(b.root) for d, b in variants.items()},
                "blocks": {d.id: d.blocks for d in plan.devices if not d.idle},
                "plan": {"method": plan.method, "round_latency_s": plan.round_latency_s,
                         "cost_source": plan.cost_source, "idle": plan.idle, "notes": plan.notes, "devices": devs}}

"""Measure a bundle's per-block cost table on this machine (``deft hw profile``).

LoLa DEFT's allocator needs, per trainable block, what one training step costs when that block is
the deepest one backpropagation must reach: latency and peak memory both grow with the block's
distance from the output. For each trainable block of the bundle this module builds a variant with
only that block (and the head) trainable (:func:`hardware.depth_variants.make_variant`), runs real
ONNX Runtime training steps on it in a fresh process (:func:`hardware.step_probe.probe`, so the peak
RSS is that variant's alone) and records the median step time and the peak RSS.

Timing noise can make a deeper block look cheaper than a shallower one; the allocator's model
assumes non-decreasing costs, so the table is ironed with :meth:`CostTable.monotone` (running
maximum over depth) and every entry that changed is reported, with its measured value.

Depth counts from the output, as in the allocator: emulator block ``b`` of a bundle with ``L``
blocks has depth ``L - b``. The grouping of trainable tensors into blocks (:func:`block_tensors`)
lives here too, because the planner must use the same grouping for update sizes and payloads.
Only light imports at module level: the edge imports this module for :func:`block_tensors`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from device_runtime.bundle.manifest import Manifest, TensorSpec
from device_runtime.errors import DeftError
from hardware.cost_table import CostEntry, CostTable

BYTES_PER_FP32 = 4


class ProfilerError(DeftError, ValueError):
    """The bundle cannot be profiled (no trainable blocks, a failed measurement); the message says why."""


# ---- blocks of a bundle ---------------------------------------------------------------------------
def trainable_blocks(manifest: Manifest) -> list[int]:
    """Emulator block indices that have trainable tensors, in increasing order."""
    return sorted({t.block for t in manifest.trainable if t.block is not None})


def block_depth(manifest: Manifest, block: int) -> int:
    """Distance of emulator block ``block`` from the output (1 = the block next to the head)."""
    return len(manifest.emulator.layer_map) - block


def block_tensors(manifest: Manifest) -> dict[int, list[TensorSpec]]:
    """Trainable tensors grouped by the block whose trainer owns them.

    Tensors outside any block go with the block whose training already reaches them: the head (and
    any other output-side tensor) with the block nearest the output, a soft prompt (input side) with
    the block nearest the input. Raises :class:`ProfilerError` when the bundle has no trainable block.
    """
    blocks = trainable_blocks(manifest)
    if not blocks:
        raise ProfilerError(
            f"bundle of {manifest.source_model} has no trainable transformer blocks (only "
            f"{', '.join(sorted({t.kind for t in manifest.trainable})) or 'no'} tensors); "
            "export it with LoRA (deft export --peft lora) so each block has its own tensors"
        )
    groups: dict[int, list[TensorSpec]] = {b: [] for b in blocks}
    for t in manifest.trainable:
        if t.block is not None:
            groups[t.block].append(t)
        elif t.kind == "prompt":
            groups[blocks[0]].append(t)
        else:
            groups[blocks[-1]].append(t)
    return groups


def block_update_bytes(manifest: Manifest, bytes_per_value: float = BYTES_PER_FP32) -> dict[int, float]:
    """Bytes each block's trainer uploads (its tensors, see :func:`block_tensors`) at ``bytes_per_value``."""
    return {b: float(sum(t.numel for t in ts) * bytes_per_value) for b, ts in block_tensors(manifest).items()}


# ---- the profile ----------------------------------------------------------------------------------
class Adjustment(BaseModel):
    """One value :meth:`CostTable.monotone` raised to keep the table non-decreasing in depth."""

    model_config = ConfigDict(frozen=True)

    depth: int
    field: str
    measured: float
    adjusted: float


class Measurement(BaseModel):
    """What the step probe saw for one block (medians over repeats; memory: the largest)."""

    model_config = ConfigDict(frozen=True)

    block: int
    depth: int
    median_step_s: float
    step_s_per_repeat: list[float]
    peak_rss_mb: float
    baseline_rss_mb: float
    params_trainable: int


class ProfileResult(BaseModel):
    """The monotone table the allocator uses, the raw table, and which entries the ironing changed."""

    model_config = ConfigDict(frozen=True)

    table: CostTable
    measured: CostTable
    adjusted: list[Adjustment]
    measurements: list[Measurement]
    wall_s: float = Field(ge=0)


def adjustments(measured: CostTable, table: CostTable) -> list[Adjustment]:
    """Entries where ``table`` (the monotone one) differs from ``measured``."""
    out = []
    for a, b in zip(measured.entries, table.entries, strict=True):
        for field in ("step_latency_s", "peak_memory_bytes"):
            if getattr(a, field) != getattr(b, field):
                out.append(
                    Adjustment(
                        depth=a.depth, field=field, measured=getattr(a, field), adjusted=getattr(b, field)
                    )
                )
    return out


#: progress callback: (message, steps done, steps in total)
Progress = Callable[[str, int, int], None]


def open_bundle(bundle: str | Path) -> Manifest:
    """The bundle's verified manifest, refused early (before any measuring) when it has no blocks."""
    from device_runtime.bundle.verify import verify_bundle

    manifest = verify_bundle(bundle)
    block_tensors(manifest)
    return manifest


def profile_bundle(
    bundle: str | Path,
    *,
    profile_id: str = "laptop-x86",
    batch: int = 16,
    seq: int = 64,
    steps: int = 10,
    warmup: int = 2,
    repeats: int = 1,
    threads: int | None = None,
    on_progress: Progress | None = None,
) -> ProfileResult:
    """Measure ``bundle``'s cost table on this machine; ``profile_id`` names the profile it describes.

    Each block is measured ``repeats`` times, interleaved over the blocks (so a burst of load from
    another process does not hit one depth only); the median step time and the largest peak RSS are
    kept. Raises :class:`ProfilerError` or :class:`device_runtime.errors.BundleError` on bad input.
    """
    from hardware.depth_variants import make_variant
    from hardware.step_probe import probe

    for name, v in (("batch", batch), ("seq", seq), ("steps", steps), ("repeats", repeats)):
        if v < 1:
            raise ProfilerError(f"{name} must be >= 1, got {v}")
    t_start = time.perf_counter()
    root = Path(bundle)
    manifest = open_bundle(root)
    groups = block_tensors(manifest)
    blocks = sorted(groups, key=lambda b: block_depth(manifest, b))  # depth 1 first
    update = block_update_bytes(manifest)
    total = len(blocks) * (1 + repeats)
    done = 0

    def tick(msg: str) -> None:
        if on_progress:
            on_progress(msg, done, total)

    runs: dict[int, list[dict]] = {b: [] for b in blocks}
    with tempfile.TemporaryDirectory(prefix="deft-profile-") as tmp:
        variants: dict[int, Path] = {}
        for b in blocks:
            d = block_depth(manifest, b)
            tick(f"depth {d} (block {b}): building the training variant")
            try:
                make_variant(root, [b], Path(tmp) / f"block{b}", head=True)
            except ValueError as exc:
                raise ProfilerError(f"cannot build the variant for block {b}: {exc}") from None
            variants[b] = Path(tmp) / f"block{b}"
            done += 1
        for r in range(repeats):
            for b in blocks:
                d = block_depth(manifest, b)
                tick(
                    f"depth {d} (block {b}): {steps} training steps"
                    + (f", repeat {r + 1}" if repeats > 1 else "")
                )
                try:
                    runs[b].append(
                        probe(variants[b], batch=batch, seq=seq, steps=steps, warmup=warmup, threads=threads)
                    )
                except RuntimeError as exc:
                    raise ProfilerError(f"measuring depth {d} (block {b}) failed: {exc}") from None
                done += 1
    tick("done")

    measurements, entries = [], []
    for b in blocks:
        times = [x["median_step_s"] for x in runs[b]]
        peak = max(x["peak_rss_mb"] for x in runs[b])
        m = Measurement(
            block=b,
            depth=block_depth(manifest, b),
            median_step_s=statistics.median(times),
            step_s_per_repeat=times,
            peak_rss_mb=peak,
            baseline_rss_mb=min(x["baseline_rss_mb"] for x in runs[b]),
            params_trainable=sum(t.numel for t in groups[b]),
        )
        measurements.append(m)
        entries.append(
            CostEntry(
                depth=m.depth,
                step_latency_s=m.median_step_s,
                peak_memory_bytes=peak * 2**20,
                update_bytes=update[b],
            )
        )
    measured = CostTable(
        profile=profile_id,
        backend="cpu",
        source="measured",
        model=manifest.source_model,
        batch=batch,
        seq=min(seq, manifest.max_length),
        entries=entries,
    )
    table = measured.monotone()
    return ProfileResult(
        table=table,
        measured=measured,
        adjusted=adjustments(measured, table),
        measurements=measurements,
        wall_s=time.perf_counter() - t_start,
    )

"""Analytic per-depth training costs of a BERT-like encoder, for when no measured table exists.

Depth ``d`` = the deepest trainable block, counted from the output. One step runs the forward pass
through all ``L`` blocks and the backward pass through the ``d`` blocks above and including the
trainable one (frozen blocks still need activation gradients, not weight gradients):

    c_d = (L + d) * F_block + F_head + F_update(d)

with ``F_block = 2 T (4 H^2 + 2 H I) + 4 T S H`` for ``T = batch x seq`` tokens. Peak memory holds
every weight, the activations the ``d`` back-propagated blocks saved, the trainable block's optimizer
state and a fixed runtime overhead, so both ``c_d`` and ``m_d`` grow with ``d``. The update is the
trainable block's LoRA tensors (``lora``) or the whole block (``full``), so ``S_d`` follows the rank
schedule and need not be monotone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hardware.cost_table import CostEntry, CostTable
from hardware.profiles import Profile


class EncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    intermediate: int = Field(ge=1)
    heads: int = Field(ge=1)
    vocab: int = Field(ge=1)
    batch: int = Field(default=16, ge=1)
    seq: int = Field(default=128, ge=1)
    update: Literal["lora", "full"] = "lora"
    lora_rank: int | list[int] = 8  # one rank, or one per depth (depth 1 first)
    lora_targets: int = Field(default=2, ge=1, description="H x H projections with LoRA (query, value)")
    runtime_overhead_bytes: float = Field(default=300e6, ge=0)
    bytes_per_value: int = 4

    def rank(self, depth: int) -> int:
        return self.lora_rank if isinstance(self.lora_rank, int) else self.lora_rank[depth - 1]

    def block_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * h * h + 4 * h + 2 * h * i + h + i + 4 * h  # attention, FFN, biases, 2 layer norms

    def update_params(self, depth: int) -> int:
        if self.update == "full":
            return self.block_params()
        return self.lora_targets * self.rank(depth) * 2 * self.hidden


def block_costs(spec: EncoderSpec) -> list[dict]:
    """Allocator blocks (FLOPs, bytes, update bytes) for depths ``1..layers``: hardware-independent."""
    t = spec.batch * spec.seq
    h, i, s, b = spec.hidden, spec.intermediate, spec.seq, spec.bytes_per_value
    f_block = 2 * t * (4 * h * h + 2 * h * i) + 4 * t * s * h
    f_head = 2 * t * h * h * 3  # pooler + classifier, forward and backward (small)
    weights = (spec.vocab * h + spec.layers * spec.block_params()) * b
    act_block = b * t * (8 * h + 2 * i) + b * spec.batch * spec.heads * s * s * 2
    out = []
    for d in range(1, spec.layers + 1):
        p = spec.update_params(d)
        flops = (spec.layers + d) * f_block + f_head + 6 * t * p  # + weight grads of the trainable tensors
        memory = weights + d * act_block + 3 * p * b + spec.runtime_overhead_bytes  # grads + Adam moments
        out.append({"depth": d, "flops": float(flops), "memory": float(memory), "update_bytes": float(p * b)})
    return out


def analytic_cost_table(
    spec: EncoderSpec, profile: Profile, backend: Literal["cpu", "gpu", "auto"] = "auto"
) -> CostTable:
    """The analytic costs as a :class:`CostTable` on ``profile`` (latency = FLOPs / sustained FLOP/s)."""
    f = profile.flops(backend)
    entries = [
        CostEntry(
            depth=c["depth"],
            step_latency_s=c["flops"] / f,
            peak_memory_bytes=c["memory"],
            update_bytes=c["update_bytes"],
        )
        for c in block_costs(spec)
    ]
    used = profile.backend() if backend == "auto" else backend
    return CostTable(
        profile=profile.id,
        backend=used,
        source="analytic",
        model=spec.name,
        batch=spec.batch,
        seq=spec.seq,
        entries=entries,
    )


MINILM_L6 = EncoderSpec(
    name="all-MiniLM-L6-v2", layers=6, hidden=384, intermediate=1536, heads=12, vocab=30522
)
BERT_BASE = EncoderSpec(
    name="bert-base-uncased", layers=12, hidden=768, intermediate=3072, heads=12, vocab=30522
)

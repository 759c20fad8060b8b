"""Distil an emulator's middle blocks from the full model's middle (Offsite-Tuning's recipe).

A layer-dropped emulator computes something else than the full model between its adapter blocks,
so adapters trained on it fit the wrong function and lose accuracy when plugged into the full
model. Distillation makes the emulator's middle imitate the full middle: teacher = the full model's
middle blocks (frozen), student = the emulator's middle blocks (initialised as the uniformly chosen
ones), both fed the output of the frozen bottom adapter blocks; the loss compares the outputs of the
last middle block, normalised by the teacher's scale:

    loss = mean(((h_T - h_S) / sqrt(mean(h_T^2)))^2)     (over real tokens, padding masked)

AdamW, cosine schedule with linear warmup, gradient norm clipped to 1. The adapter blocks, the
embeddings and the head are never touched. The loop returns the student's state; it does not change
the model it is given.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from device_runtime.bundle.manifest import DistillSettings
from export.architectures import Architecture, get_module
from export.emulator_width import narrow_blocks

#: ``on_step(step, total_steps, kd_loss)`` after every optimizer step
StepCallback = Callable[[int, int, float], None]
#: the teacher's outputs are kept per row when they fit in this many bytes (float32)
TEACHER_CACHE_BYTES = 512 * 1024 * 1024


@dataclass
class DistillResult:
    #: the middle blocks' state, ``"{j}.{parameter}"`` for the emulator's j-th middle block
    state: dict[str, torch.Tensor]
    #: KD loss on a fixed probe set before (the layer-dropped emulator) and after distillation
    kd_loss_initial: float
    kd_loss_final: float
    #: training KD loss of every step
    history: list[float] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0


def kd_loss(h_teacher: torch.Tensor, h_student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(((h_T - h_S) / sqrt(mean(h_T^2)))^2)`` over the positions where ``mask`` is 1."""
    if mask is None:
        mask = torch.ones(h_teacher.shape[:-1], dtype=h_teacher.dtype)
    m = mask.to(h_teacher.dtype).unsqueeze(-1)
    count = m.sum() * h_teacher.shape[-1]
    scale = (h_teacher.pow(2) * m).sum() / count
    return ((h_teacher - h_student).pow(2) * m).sum() / count / scale


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Stop(Exception):
    """Ends a forward pass once the middle's input has been captured."""


def backbone(model: torch.nn.Module, arch: Architecture) -> torch.nn.Module:
    """The module holding embeddings and blocks (``bert``, ``transformer``, ``model`` ...)."""
    return get_module(model, arch.blocks_path.split(".")[0])


def middle_input(model: torch.nn.Module, arch: Architecture, first_middle: torch.nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor) -> tuple[tuple, dict]:
    """The positional and keyword arguments the backbone passes to its first middle block (the bottom
    blocks' output, the attention mask and whatever else the architecture hands every block, in its
    own format); the forward pass stops there."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    extra = {} if arch.model_type in ("bert", "roberta", "xlm-roberta") else {"use_cache": False}
    handle = first_middle.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            backbone(model, arch)(input_ids=ids, attention_mask=mask, **extra)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def run_blocks(blocks: Sequence[torch.nn.Module], args: tuple, kwargs: dict) -> torch.Tensor:
    """Apply ``blocks`` in order to the captured middle input; the last block's hidden states."""
    h, rest = args[0], args[1:]
    for block in blocks:
        out = block(h, *rest, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


def tokenize(tokenizer_json: str, texts: Sequence[str], max_length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(list(texts))]


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator,
                   window: int = 32) -> list[list[int]]:
    """One pass over the rows in batches of similar length (less padding), in random order.

    Rows are shuffled, cut into windows of ``window`` batches, sorted by length inside a window and
    batched; then the batches are shuffled.
    """
    perm = rng.permutation(len(lengths)).tolist()
    span = batch_size * window
    batches: list[list[int]] = []
    for s in range(0, len(perm), span):
        chunk = sorted(perm[s:s + span], key=lambda i: lengths[i])
        batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def layer_drop_kd(model: torch.nn.Module, arch: Architecture, first: int, last: int, middle: Sequence[int],
                  rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> float:
    """KD loss of the layer-dropped middle ``middle`` (original depths, undistilled) against the full
    middle on ``rows``, mean over batches: a cheap score of which middle blocks to keep."""
    full = list(get_module(model, arch.blocks_path))
    teacher, student = full[first: len(full) - last], [full[i] for i in middle]
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            starts = range(0, len(rows), batch_size)
            for s in starts:
                ids, mask = pad(rows[s:s + batch_size], pad_id)
                args, kwargs = middle_input(model, arch, full[first], ids, mask)
                total += float(kd_loss(run_blocks(teacher, args, kwargs), run_blocks(student, args, kwargs), mask))
    finally:
        model.train(was_training)
    return total / len(starts)


def distill_middle(model: torch.nn.Module, arch: Architecture, first: int, last: int, middle: Sequence[int],
                   rows: Sequence[Sequence[int]], pad_id: int, settings: DistillSettings,
                   on_step: StepCallback | None = None, width: int | None = None) -> DistillResult:
    """Distil copies of the full model's blocks ``middle`` (original depths) into the full middle.

    ``model`` is the full task model; it is used as it is and left as it was. ``rows`` are token ids.
    ``width``: the students' FFN width (``export.emulator_width``; None: as the model's).
    """
    t0 = time.perf_counter()
    full = list(get_module(model, arch.blocks_path))
    teacher = full[first: len(full) - last]  # the whole middle
    student = torch.nn.ModuleList([copy.deepcopy(full[i]) for i in middle])
    narrow_blocks(student, arch, width)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    student.eval()  # no dropout: the teacher's targets are deterministic, so are the student's

    rng = np.random.default_rng(settings.seed)
    lengths = [len(r) for r in rows]
    batches: list[list[int]] = []
    # the teacher's output per row, computed once (a row's real positions do not depend on its padding)
    cached: dict[int, torch.Tensor] = {}
    cacheable = sum(lengths) * model.config.hidden_size * 4 <= TEACHER_CACHE_BYTES

    def losses(idx: list[int], train: bool) -> torch.Tensor:
        ids, mask = pad([rows[i] for i in idx], pad_id)
        args, kwargs = middle_input(model, arch, full[first], ids, mask)
        if all(i in cached for i in idx):
            h_t = torch.zeros(*ids.shape, model.config.hidden_size)
            for j, i in enumerate(idx):
                h_t[j, : lengths[i]] = cached[i]
        else:
            with torch.no_grad():
                h_t = run_blocks(teacher, args, kwargs)
            if cacheable and train:
                cached.update({i: h_t[j, : lengths[i]].clone() for j, i in enumerate(idx)})
        with torch.set_grad_enabled(train):
            return kd_loss(h_t, run_blocks(student, args, kwargs), mask)

    probe = list(range(min(len(rows), 64)))
    initial = float(losses(probe, False))
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, settings.steps, settings.warmup_steps))
    history: list[float] = []
    try:
        for step in range(settings.steps):
            if not batches:
                batches = length_batches(lengths, settings.batch_size, rng)
            loss = losses(batches.pop(), True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append(round(float(loss.detach()), 6))
            if on_step is not None:
                on_step(step + 1, settings.steps, history[-1])
        final = float(losses(probe, False))
    finally:
        for p in student.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return DistillResult(state=state, kd_loss_initial=round(initial, 6), kd_loss_final=round(final, 6),
                         history=history, rows=len(rows), seconds=round(time.perf_counter() - t0, 1))

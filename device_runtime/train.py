"""The on-device training loop: steps or epochs, LR schedule, periodic evaluation, checkpoints,
a progress bar, and a JSON-ready report.

The learning rate is computed here per step (not by ORT's scheduler) because it must be a pure
function of the step index: a run resumed from a checkpoint then continues on exactly the schedule
the uninterrupted run followed.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from device_runtime.backends import make_backend
from device_runtime.bundle.load import Bundle
from device_runtime.checkpointing import CheckpointDir, run_fingerprint
from device_runtime.data import Dataset, PadPolicy, batch_indices, steps_per_epoch
from device_runtime.errors import DeviceError
from device_runtime.evaluate import evaluate
from device_runtime.resources import peak_rss_mb
from device_runtime.state import apply_global_state

Schedule = Literal["linear", "constant", "cosine"]


@dataclass
class TrainConfig:
    epochs: float | None = 1.0
    #: total optimizer steps; overrides ``epochs`` when given
    steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    schedule: Schedule = "linear"
    warmup_steps: int = 0
    seed: int = 0
    #: evaluate every N steps (0: only at the end)
    eval_every: int = 0
    eval_batch_size: int = 64
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    pad_to: PadPolicy = "longest"
    progress: bool = True
    backend: str = "ort"
    #: CPU threads for the backend (None: all cores); not part of the run's identity
    threads: int | None = None

    def total_steps(self, n_rows: int) -> int:
        spe = steps_per_epoch(n_rows, self.batch_size)
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs if self.epochs is not None else 1.0) * spe))

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise DeviceError(f"batch size {self.batch_size} must be positive")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise DeviceError(f"learning rate {self.lr} must be a positive number")
        if self.steps is not None and self.steps <= 0:
            raise DeviceError(f"steps {self.steps} must be positive")
        if self.steps is None and (self.epochs is None or self.epochs <= 0):
            raise DeviceError(f"epochs {self.epochs} must be positive")
        if self.checkpoint_every <= 0:
            raise DeviceError(f"checkpoint interval {self.checkpoint_every} must be positive")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then constant / linear decay / cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / span
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def dataset_digest(ds: Dataset) -> str:
    h = hashlib.sha256(ds.input_ids.tobytes())
    if ds.labels is not None:
        h.update(ds.labels.tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainResult:
    report: dict
    tensors: dict[str, np.ndarray]
    start_tensors: dict[str, np.ndarray]
    backend: object = field(repr=False, default=None)


def _progress(enabled: bool, total: int, done: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)
    task = prog.add_task("train", total=total, completed=done, loss="-")
    return prog, task


def train(bundle: Bundle, train_ds: Dataset, cfg: TrainConfig, eval_ds: Dataset | None = None, *,
          initial_state: dict[str, np.ndarray] | None = None,
          frozen_state: dict[str, np.ndarray] | None = None) -> TrainResult:
    """Train ``bundle`` on ``train_ds``; resume from ``cfg.checkpoint_dir`` when it holds this run."""
    cfg.validate()
    if train_ds.labels is None:
        raise DeviceError("training needs labelled data (a label column, or a causal-LM bundle)")
    total = cfg.total_steps(len(train_ds))
    fp = run_fingerprint(bundle=bundle.hash, data=dataset_digest(train_ds), total=total,
                         initial=None if initial_state is None and not frozen_state else
                         hashlib.sha256(b"".join(np.ascontiguousarray(st[k]).tobytes()
                                                 for st in (initial_state or {}, frozen_state or {})
                                                 for k in sorted(st))).hexdigest()[:16],
                         **{k: v for k, v in asdict(cfg).items()
                            if k not in ("progress", "checkpoint_dir", "checkpoint_every", "eval_every",
                                         "eval_batch_size", "threads")})
    ckdir = CheckpointDir(cfg.checkpoint_dir, fp) if cfg.checkpoint_dir else None
    progress = ckdir.load_progress() if ckdir else None

    t_start = time.perf_counter()
    if progress is not None:
        backend = make_backend(bundle, cfg.backend, checkpoint=ckdir.state_path(progress), threads=cfg.threads)
        start_tensors = ckdir.load_start() or backend.get_tensors()
        step0 = int(progress["step"])
        losses: list[float] = list(progress["train_loss"])
        samples = int(progress["samples"])
        history: list[dict] = list(progress.get("eval_history", []))
    else:
        backend = make_backend(bundle, cfg.backend, threads=cfg.threads)
        if initial_state is not None:
            apply_global_state(backend, initial_state)
        start_tensors = backend.get_tensors()
        if ckdir is not None:
            ckdir.save_start(start_tensors)
        step0, losses, samples, history = 0, [], 0, []

    if frozen_state:
        backend.set_frozen(frozen_state)

    def record() -> dict:
        return {"step": step, "train_loss": losses, "samples": samples, "eval_history": history}

    step_times: list[float] = []
    prog, task = _progress(cfg.progress, total, step0)
    step = step0
    with prog:
        while step < total:
            idx = batch_indices(len(train_ds), cfg.batch_size, cfg.seed, step)
            batch = train_ds.batch(idx, pad_to=cfg.pad_to)
            t0 = time.perf_counter()
            loss = backend.train_step(batch, lr_at(step, total, cfg), step, cfg.seed)
            step_times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise DeviceError(f"training diverged at step {step + 1} (loss {loss}); lower the learning rate")
            losses.append(loss)
            samples += len(idx)
            step += 1
            prog.update(task, advance=1, loss=f"{loss:.4f}")
            if eval_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                history.append({"step": step, **evaluate(backend, eval_ds, cfg.eval_batch_size, cfg.pad_to)})
            if ckdir is not None and (step % cfg.checkpoint_every == 0 or step == total):
                ckdir.save(backend, record())

    final_eval = evaluate(backend, eval_ds, cfg.eval_batch_size, cfg.pad_to) if eval_ds is not None else None
    if final_eval is not None:
        history.append({"step": step, **final_eval})
    report = {
        "backend": cfg.backend,
        "bundle_hash": bundle.hash,
        "task": bundle.manifest.task,
        "steps": total,
        "steps_run": total - step0,
        "resumed_from_step": step0 if progress is not None else None,
        "epochs": total / steps_per_epoch(len(train_ds), cfg.batch_size),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "seed": cfg.seed,
        "train_loss": losses,
        "samples": samples,
        "train_rows": len(train_ds),
        "skipped_rows": train_ds.skipped_rows,
        "skipped": dict(train_ds.skipped),
        "truncated_rows": train_ds.truncated,
        "eval_accuracy": final_eval["accuracy"] if final_eval else None,
        "eval_loss": final_eval["loss"] if final_eval else None,
        "eval_rows": final_eval["rows"] if final_eval else None,
        "eval_skipped_rows": eval_ds.skipped_rows if eval_ds is not None else None,
        "eval_history": history,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    return TrainResult(report=report, tensors=backend.get_tensors(), start_tensors=start_tensors, backend=backend)

"""Prompts from other devices on a newcomer: transferability scores, transfer initialisation, and
on-the-fly ensemble tuning (DEFT techniques 4 and 5). No torch: ONNX Runtime and numpy.

A *member* is a shared prompt's tensors (the soft prompt and the head trained with it). Two ways to
ensemble K frozen members while training only K mixing weights ``w``:

- **probability space** (:func:`member_log_probs` + :func:`fit_mix`): each member's class
  log-probabilities on the device's N labelled rows are computed once (K forward passes, no
  backward), then ``w`` is fitted on ``log sum_k softmax(w)_k p_k`` in numpy: tuning costs K
  forwards over N rows, whatever the number of epochs; predicting costs K forwards per row.
- **embedding space** (:func:`train_embedding_mix`, the bundle's ``prompt_ensemble.onnx`` from
  ``deft export --prompt-pool K``): one prompt ``P = sum_k softmax(w)_k P_k``, trained with the
  head through the full model (a forward and a backward per step, like prompt tuning itself);
  predicting costs one forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_runtime.bundle.load import Bundle
from device_runtime.data import Dataset, batch_indices, steps_per_epoch
from device_runtime.errors import DeviceError
from device_runtime.evaluate import evaluate
from device_runtime.step_backend import StepBackend
from device_runtime.step_contract import ENSEMBLE_GRAPH, ENSEMBLE_MIX, ENSEMBLE_POOL

Tensors = Mapping[str, np.ndarray]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def prompt_name(bundle: Bundle) -> str:
    """The soft prompt's tensor name; a DeviceError for a bundle without one."""
    names = [t.name for t in bundle.manifest.trainable if t.kind == "prompt"]
    if not names:
        raise DeviceError(f"bundle {bundle.hash[:12]} has no soft prompt: export it with --peft prompt")
    return names[0]


# ------------------------------------------------------------------------------------ scoring members


def member_log_probs(bundle: Bundle, members: Sequence[Tensors], ds: Dataset, *, batch_size: int = 16,
                     threads: int | None = None, backend: StepBackend | None = None) -> np.ndarray:
    """Class log-probabilities of each member on ``ds``: (K, rows, classes). K forward passes, no backward
    (on ``backend`` when given; its tensors change). Rows go in length order, so a batch pads to
    about its own rows' length rather than the longest row's: the scoring is mostly padding otherwise."""
    backend = backend if backend is not None else StepBackend(bundle, threads=threads)
    order = np.argsort(ds.lengths, kind="stable")
    batches = [order[s:s + batch_size] for s in range(0, len(ds), batch_size)]
    out = []
    for tensors in members:
        backend.set_tensors(tensors)
        logits = np.empty((len(ds), len(bundle.manifest.labels)), dtype=np.float64)
        for idx in batches:
            logits[idx] = backend.logits(ds.batch(idx))
        out.append(log_softmax(logits))
    return np.stack(out)


def transfer_scores(logp: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Each member's transferability on the device's rows: its mean loss and accuracy there."""
    rows = np.arange(labels.shape[0])
    return [{"loss": float(-lp[rows, labels].mean()), "accuracy": float((lp.argmax(-1) == labels).mean())}
            for lp in logp]


def mix_from_scores(scores: Sequence[Mapping[str, float]], temperature: float = 0.1) -> np.ndarray:
    """Initial mixing logits from transfer scores: lower loss, more weight (``-loss / temperature``)."""
    return np.array([-s["loss"] / temperature for s in scores], dtype=np.float32)


def weighted_members(members: Sequence[Tensors], weights: np.ndarray) -> dict[str, np.ndarray]:
    """The members' tensors averaged with ``weights`` (a transfer initialisation from several sources)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return {n: sum(wk * np.asarray(m[n], dtype=np.float64) for wk, m in zip(w, members, strict=True)).astype(
        np.float32) for n in members[0]}


# ------------------------------------------------------------------------ probability-space ensemble


def ensemble_log_probs(logp: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """``log sum_k softmax(mix)_k p_k``: (rows, classes)."""
    la = log_softmax(np.asarray(mix, dtype=np.float64))
    z = logp + la[:, None, None]
    m = z.max(axis=0)
    return m + np.log(np.exp(z - m).sum(axis=0))


def _nll_and_grad(logp: np.ndarray, labels: np.ndarray, mix: np.ndarray) -> tuple[float, np.ndarray]:
    rows = np.arange(labels.shape[0])
    a = softmax(np.asarray(mix, dtype=np.float64))
    py = np.exp(logp[:, rows, labels])  # (K, N): each member's probability of the true label
    q = a @ py  # (N,)
    loss = float(-np.log(q).mean())
    g_a = -(py / q).mean(axis=1)  # dL/da_k
    return loss, a * (g_a - a @ g_a)  # through the softmax


def fit_mix(logp: np.ndarray, labels: np.ndarray, *, init: np.ndarray | None = None, epochs: float = 10.0,
            batch_size: int = 16, lr: float = 0.05, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Fit the K mixing logits on cached member log-probabilities with Adam (the kit's betas), on the
    same batches a training run would use. Pure numpy: milliseconds. Returns (mix, loss per step)."""
    n = labels.shape[0]
    w = np.zeros(logp.shape[0]) if init is None else np.asarray(init, dtype=np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    losses = []
    steps = max(1, math.ceil(epochs * steps_per_epoch(n, batch_size)))
    for t in range(1, steps + 1):
        idx = batch_indices(n, batch_size, seed, t - 1)
        loss, g = _nll_and_grad(logp[:, idx], labels[idx], w)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-8)
        losses.append(loss)
    return w.astype(np.float32), losses


# ------------------------------------------------------------------------- embedding-space ensemble


@dataclass
class EmbeddingMixResult:
    #: a plain prompt bundle state (the mixed prompt + the tuned head): evaluate, predict or share it
    tensors: dict[str, np.ndarray]
    mix: np.ndarray
    losses: list[float]
    seconds: float


def mixed_prompt(mix: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``sum_k softmax(mix)_k pool[k]``, the same function the ensemble step graph traces."""
    return np.einsum("k,kth->th", softmax(np.asarray(mix, dtype=np.float64)), pool).astype(np.float32)


def train_embedding_mix(bundle: Bundle, members: Sequence[Tensors], ds: Dataset, *, init_mix: np.ndarray,
                        init_head: Tensors, epochs: float = 10.0, batch_size: int = 16, lr: float = 0.05,
                        seed: int = 0, threads: int | None = None) -> EmbeddingMixResult:
    """Train the K mixing logits and the head through the bundle's prompt-ensemble step graph."""
    k = bundle.manifest.step.ensemble_size if bundle.manifest.step is not None else 0
    if k != len(members):
        raise DeviceError(f"the bundle's prompt-ensemble graph mixes {k} prompts, {len(members)} were given: "
                          f"export it with --prompt-pool {len(members)}")
    if ds.labels is None:
        raise DeviceError("ensemble tuning needs labelled rows")
    pname = prompt_name(bundle)
    pool = np.stack([np.asarray(m[pname], dtype=np.float32) for m in members])
    shapes = {ENSEMBLE_MIX: (k,), **{t.name: tuple(t.shape) for t in bundle.manifest.trainable if t.name != pname}}
    backend = StepBackend(bundle, threads=threads, graph=ENSEMBLE_GRAPH, trainable=shapes,
                          fixed={ENSEMBLE_POOL: pool})
    backend.set_tensors({ENSEMBLE_MIX: init_mix, **{n: init_head[n] for n in shapes if n != ENSEMBLE_MIX}})
    t0 = time.perf_counter()
    total = max(1, math.ceil(epochs * steps_per_epoch(len(ds), batch_size)))
    losses = [backend.train_step(ds.batch(batch_indices(len(ds), batch_size, seed, s)), lr, s, seed)
              for s in range(total)]
    out = backend.get_tensors()
    mix = out.pop(ENSEMBLE_MIX)
    out[pname] = mixed_prompt(mix, pool)
    return EmbeddingMixResult(out, mix, losses, time.perf_counter() - t0)


def accuracy_of(bundle: Bundle, tensors: Tensors, ds: Dataset, threads: int | None = None) -> dict:
    """Accuracy and loss of a plain prompt state on ``ds`` (the bundle's eval graph)."""
    backend = StepBackend(bundle, threads=threads)
    backend.set_tensors(tensors)
    return evaluate(backend, ds)

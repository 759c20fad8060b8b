"""The default training backend: the bundle's step graph on the plain ``onnxruntime`` package.

One ``session.run`` is one optimizer step (forward, loss, backward, AdamW; see
``export/step_graph.py``). The trainable tensors and their AdamW moments live here as numpy arrays
that ONNX Runtime reads and writes in place through IO binding: two sets of buffers, the step reads
one and writes the other, then they swap, so the state is never copied between steps. ONNX Runtime
reads the frozen weights itself from ``weights.safetensors`` (the graphs point at each tensor's bytes
there); only weights replaced at run time (``set_frozen``) are handed over from here.

Session options, and why (bench/device_bench.py measures them side by side):
- no intra-op spinning: a device shares its few cores with the MQTT agent and the tokenizer, and
  spinning threads steal the CPU the next kernel needs (2x slower steps on a loaded 2-core machine);
- no memory-pattern planning: batches change shape (padding to the longest row), so the planned
  arena is rebuilt and kept per shape; off, the step graph's peak RSS drops (measured in the bench);
- one CPU arena for the whole process (ONNX Runtime's environment allocator), not one per session:
  the train and eval sessions then reuse the same freed activation memory, so the evaluation pass
  does not grow a second arena on top of the training step's (MiniLM, batch 16 / eval batch 64:
  peak RSS 563 -> 472 MB, README "Distilled emulators");
- bundles with float16-stored frozen weights (manifest ``frozen_dtype``) use no arena at all: their
  graphs cast each use of a weight to a short-lived float32 copy (46-262 MB each on a 1.1B model's
  emulator), and an arena keeps every freed block for reuse while plain ``malloc`` hands such blocks
  back at once (1.1B 2,2,2 emulator, batch 2 x 128: peak RSS 2012 -> 1847 MB, README "Billion-parameter
  decoders");
- everything else (graph optimisation level, threads = cores) stays at ONNX Runtime's defaults.

Checkpoints are safetensors files (parameters, moments, step), never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from device_runtime.backend import with_neutral_labels
from device_runtime.bundle.load import Bundle
from device_runtime.errors import BackendUnavailable, BundleError, StateError
from device_runtime.step_contract import ADAM_M, ADAM_V, NEW, STEP_LR, STEP_T
from device_runtime.weights import initial_tensors, weight_dtypes, weight_shapes

CHECKPOINT_FORMAT = "deftkit-step-checkpoint"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed; install the device extra "
                                 "(pip install 'deftkit[device]')") from None
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


_SHARED_ARENA: list[bool] = []


def _shared_cpu_arena(ort) -> None:
    """Register the process-wide CPU arena once (ONNX Runtime's default extend strategy)."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
        _SHARED_ARENA.append(True)


#: ONNX Runtime optimizers that would turn float16-stored frozen weights back into float32 copies at
#: session creation: constant folding of ``Cast(initializer)``, the CPU provider's fusion of a float16
#: initializer into a float32 one per consuming cast (``FusedBack_*`` initializers, one per use), and
#: common-subexpression elimination merging the per-use casts into one long-lived copy. Off for
#: bundles whose ``frozen_dtype`` is not float32 (``export/frozen_storage.py`` says why casts are per use)
FROZEN_CAST_OPTIMIZERS = ("ConstantFolding", "FuseFp16InitializerToFp32NodeTransformer",
                          "CommonSubexpressionElimination")


def float32_storage(manifest) -> bool:
    """Whether a bundle stores its frozen weights in float32 (the default; else the casts above apply)."""
    return manifest.frozen_dtype == "float32"


def session_kwargs(manifest) -> dict:
    """Extra ``InferenceSession`` arguments a bundle needs (none for float32 storage)."""
    if float32_storage(manifest):
        return {}
    return {"disabled_optimizers": list(FROZEN_CAST_OPTIMIZERS)}


def session_options(threads: int | None = None, arena: bool = True):
    """The kit's ONNX Runtime session options (see the module docstring for why); ``arena=False``
    for bundles whose frozen weights are stored in float16."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_mem_pattern = False
    if arena:
        _shared_cpu_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    else:
        opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    return opts


class StepBackend:
    """Trains a step-graph bundle; the same surface as the ORT-training backend."""

    name = "ort"

    def __init__(self, bundle: Bundle, checkpoint: str | Path | None = None, threads: int | None = None, *,
                 graph: str | None = None, trainable: Mapping[str, tuple[int, ...]] | None = None,
                 fixed: Mapping[str, np.ndarray] | None = None):
        """``graph``/``trainable``/``fixed`` train another step graph of the bundle with the same contract
        (the prompt ensemble's): its trainable tensors (name -> shape; those the bundle's weights lack
        start at zero) and inputs it takes unchanged at every step (the pool of prompts)."""
        self._ort = _onnxruntime()
        self.bundle = bundle
        self.manifest = bundle.manifest
        self._threads = threads
        self._graph = graph or self.manifest.step.train_graph
        self._shapes = dict(trainable) if trainable is not None else {
            t.name: tuple(t.shape) for t in self.manifest.trainable}
        self._fixed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (fixed or {}).items()}
        names = list(self._shapes)
        self._names = names
        weights = initial_tensors(bundle)
        #: frozen weights replaced at run time (``set_frozen``); the rest ONNX Runtime reads from the file
        self._frozen: dict[str, np.ndarray] = {}
        self._frozen_shapes = {k: v for k, v in weight_shapes(bundle).items() if k not in set(names)}
        self._frozen_dtypes = weight_dtypes(bundle)
        # two buffer sets: [params..., m..., v...]; the step reads ``cur`` and writes the other
        self._bufs = [self._zeros_state(), self._zeros_state()]
        self._cur = 0
        for n in names:
            if n in weights:
                np.copyto(self._bufs[0][n], weights[n])
        self._t = 0
        self._sessions: dict[str, object] = {}
        if checkpoint is not None:
            self._load(Path(checkpoint))

    def _zeros_state(self) -> dict[str, np.ndarray]:
        out = {}
        for prefix in ("", ADAM_M, ADAM_V):
            for n in self._names:
                out[prefix + n] = np.zeros(self._shapes[n], dtype=np.float32)
        return out

    # -- sessions ---------------------------------------------------------------------------------
    def _session(self, graph: str):
        """A session on ``graph`` with the frozen weights it declares external, created once."""
        if graph not in self._sessions:
            opts = session_options(self._threads, arena=float32_storage(self.manifest))
            path = self.bundle.path(graph)
            replaced = [n for n in self.manifest.step.external.get(graph, []) if n in self._frozen]
            if replaced:
                values = [self._ort.OrtValue.ortvalue_from_numpy(self._frozen[n]) for n in replaced]
                opts.add_external_initializers(replaced, values)
            try:
                sess = self._ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                                  **session_kwargs(self.manifest))
            except Exception as exc:  # noqa: BLE001 - ORT raises bare RuntimeErrors
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BundleError(f"ONNX Runtime could not load {path} ({first[:300]}); verify the bundle with "
                                  "`deft bundle verify` or re-export it") from None
            self._sessions[graph] = sess
        return self._sessions[graph]

    # -- training ---------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, np.ndarray], lr: float, step: int, seed: int) -> float:
        """One optimizer step; randomness (dropout) is seeded by (seed, step) so a resumed run repeats it."""
        ort = self._ort
        if self.manifest.dropout:
            ort.set_seed(int(seed * 1_000_003 + step) % (2 ** 31))
        sess = self._session(self._graph)
        cur, nxt = self._bufs[self._cur], self._bufs[1 - self._cur]
        self._t += 1
        io = sess.io_binding()
        for key in ("input_ids", "attention_mask", "labels"):
            io.bind_cpu_input(key, np.ascontiguousarray(batch[key], dtype=np.int64))
        io.bind_cpu_input(STEP_LR, np.asarray(lr, dtype=np.float32))
        io.bind_cpu_input(STEP_T, np.asarray(self._t, dtype=np.float32))
        for key, arr in (*cur.items(), *self._fixed.items()):
            io.bind_cpu_input(key, arr)
        for key, arr in nxt.items():
            io.bind_output(NEW + key, "cpu", 0, np.float32, arr.shape, arr.ctypes.data)
        io.bind_output("loss")
        sess.run_with_iobinding(io)
        self._cur = 1 - self._cur
        return float(io.get_outputs()[-1].numpy())

    def _params(self) -> dict[str, np.ndarray]:
        cur = self._bufs[self._cur]
        return {n: cur[n] for n in self._names}

    def eval_batch(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """(loss, logits) of the eval graph with the current tensors."""
        sess = self._session(self.manifest.step.eval_graph)
        feeds = {k: np.ascontiguousarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "labels")}
        feeds |= self._params()
        loss, logits = sess.run(["loss", "logits"], feeds)
        return float(loss), np.asarray(logits)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits without labels (the eval graph takes a label input: give it a neutral one)."""
        return self.eval_batch(with_neutral_labels(batch, self.manifest.task))[1]

    # -- tensors ----------------------------------------------------------------------------------
    def get_tensors(self) -> dict[str, np.ndarray]:
        """The trainable tensors, by manifest name (copies)."""
        return {n: a.copy() for n, a in self._params().items()}

    def set_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Overwrite trainable tensors in place (already validated by ``state.check_tensors``)."""
        cur = self._bufs[self._cur]
        for n, v in tensors.items():
            np.copyto(cur[n], np.asarray(v, dtype=np.float32))

    def set_frozen(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Overwrite frozen weights, e.g. the LoRA tensors of blocks another device trains this round, so
        the forward pass uses the current global state; the sessions are rebuilt with them."""
        for n, v in tensors.items():
            if n not in self._frozen_shapes:
                raise StateError(f"tensor {n!r} is not a frozen weight of this bundle; the state was made for "
                                 "another bundle")
            arr = np.ascontiguousarray(v, dtype=np.float32)
            if arr.shape != self._frozen_shapes[n]:
                raise StateError(f"tensor {n!r} has shape {tuple(arr.shape)}, the bundle expects "
                                 f"{self._frozen_shapes[n]}")
            if not np.isfinite(arr).all():
                raise StateError(f"tensor {n!r} has NaN/Inf values; refusing to load it")
            self._frozen[n] = arr.astype(self._frozen_dtypes[n])  # the graphs declare the stored dtype
        self._sessions.clear()

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, include_optimizer_state: bool = True) -> None:
        from safetensors.numpy import save_file

        cur = self._bufs[self._cur]
        keys = list(cur) if include_optimizer_state else self._names
        save_file({k: cur[k] for k in keys}, str(path), metadata={"format": CHECKPOINT_FORMAT, "step": str(self._t)})

    def _load(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CHECKPOINT_FORMAT:
                    raise BundleError(f"{path}: not a step-graph checkpoint (format {meta.get('format')!r})")
                cur = self._bufs[self._cur]
                for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if k not in cur:
                        raise BundleError(f"{path}: holds tensor {k!r} that this bundle does not train")
                    np.copyto(cur[k], f.get_tensor(k))
                self._t = int(meta.get("step", "0"))
        except SafetensorError as exc:
            raise BundleError(f"{path}: unreadable checkpoint ({exc})") from None

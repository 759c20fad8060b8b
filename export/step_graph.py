"""One whole training step as one standard ONNX graph (the default bundle format).

forward + loss + backward + AdamW update of the trainable tensors only, traced to ATen and exported
with only ``ai.onnx`` ops, so any plain ``onnxruntime`` build (aarch64, Android, iOS, web) trains it:
no training package, no contrib or training ops.

Graph contract (``STEP_*`` names below, recorded in the manifest):

- inputs: ``input_ids``, ``attention_mask``, ``labels``, ``lr`` (float32 scalar), ``step`` (float32
  scalar, the 1-based optimizer step, for AdamW's bias correction), then per trainable tensor ``n``
  (manifest order): ``n``, ``adam_m/n``, ``adam_v/n``;
- outputs: ``loss``, then per trainable tensor: ``new/n``, ``new/adam_m/n``, ``new/adam_v/n``;
- every frozen weight is an initializer without bytes (external data at ``EXTERNAL_LOCATION``), given
  to ONNX Runtime by the device from the bundle's ``weights.safetensors``, shared with the eval and
  inference graphs.

The route (measured feasible in the issue's prototype): ``make_fx`` in symbolic mode with the core ATen
decompositions over a function that calls ``torch.func.functional_call`` and ``torch.autograd.grad``
(``torch.func.grad_and_value`` bakes in the example's sizes under symbolic tracing), then the dynamo
ONNX exporter with dynamic batch and sequence. Eager attention: SDPA under symbolic tracing hits a
data-dependent guard in transformers' mask code (the loader already asks for eager).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import onnx
import torch

from device_runtime.bundle.names import WRAPPED_PREFIX
from device_runtime.step_contract import (
    ADAM_M,
    ADAM_V,
    BETA1,
    BETA2,
    ENSEMBLE_MIX,
    ENSEMBLE_POOL,
    EPS,
    NEW,
    STEP_LR,
    STEP_T,
)
from export.errors import ExportError
from export.onnx_graph import MAX_IR_VERSION, TrainingForward, sample_inputs, traceable_masks

#: graph-input name prefix of PEFT's soft-prompt token ids (``PeftModel.prompt_tokens``)
PROMPT_TOKENS = "peft_prompt_tokens."


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 lr: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW update, the kit's definition (ONNX Runtime's ``adam_mode=1``, Hugging Face's variant:
    eps added to sqrt(v) before bias correction, no weight decay). Pure: the step graph traces it and
    the eager reference calls it, so both follow the same curve."""
    m2 = BETA1 * m + (1.0 - BETA1) * g
    v2 = BETA2 * v + (1.0 - BETA2) * g * g
    step_size = lr * torch.sqrt(1.0 - torch.pow(BETA2, t)) / (1.0 - torch.pow(BETA1, t))
    return p - step_size * m2 / (torch.sqrt(v2) + EPS), m2, v2


def mix_prompts(mix: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The ensemble's prompt: ``sum_k softmax(mix)_k pool[k]`` (pool: K x tokens x hidden). Pure: the
    ensemble step graph traces it and the device recomputes it in numpy after training."""
    return torch.einsum("k,kth->th", torch.softmax(mix, dim=0), pool)


def make_step_fn(model: torch.nn.Module, task: str, num_virtual_tokens: int, trainable: Sequence[str],
                 frozen: Sequence[str], mixed_prompt: str | None = None):
    """``step(input_ids, attention_mask, labels, lr, t, *trainable, *m, *v, *frozen)`` ->
    ``(loss, *new_trainable, *new_m, *new_v)`` over the training forward of ``model``.

    With ``mixed_prompt`` (the prompt tensor's name) the first trainable tensor is the ensemble's mix
    logits and the first frozen input the pool of prompts; the prompt is :func:`mix_prompts` of them."""
    wrapper = TrainingForward(model, task, num_virtual_tokens)
    n = len(trainable)
    prefix = WRAPPED_PREFIX
    held = [k for k in frozen if k.startswith(PROMPT_TOKENS)]

    def step(input_ids, attention_mask, labels, lr, t, *tensors):
        params = tensors[:n]
        ms, vs = tensors[n:2 * n], tensors[2 * n:3 * n]
        state = {prefix + k: val for k, val in zip(trainable, params, strict=True)}
        values = dict(zip(frozen, tensors[3 * n:], strict=True))
        if mixed_prompt is not None:
            state[prefix + mixed_prompt] = mix_prompts(state.pop(prefix + ENSEMBLE_MIX), values.pop(ENSEMBLE_POOL))
        state |= {prefix + k: val for k, val in values.items() if k not in held}
        # PEFT keeps soft-prompt token ids in a plain dict, not a buffer: trace them as inputs too
        saved = dict(getattr(model, "prompt_tokens", {}))
        for k in held:
            model.prompt_tokens[k[len(PROMPT_TOKENS):]] = values[k]
        try:
            with _module_tensors_kept(model):
                loss, _ = torch.func.functional_call(wrapper, state, (input_ids, attention_mask, labels))
        finally:
            for k, v in saved.items():
                model.prompt_tokens[k] = v
        grads = torch.autograd.grad(loss, params)
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(params, grads, ms, vs, strict=True):
            a, b, c = adamw_update(p, g, m, v, lr, t)
            new_p.append(a)
            new_m.append(b)
            new_v.append(c)
        return (loss, *new_p, *new_m, *new_v)

    return step


@contextlib.contextmanager
def _module_tensors_kept(model: torch.nn.Module):
    """Put every module's own parameters and buffers back after a ``functional_call``.

    ``functional_call`` swaps a tensor once per name and restores in the same order, so a module
    reachable under two names (PEFT's ``word_embeddings`` is the base model's embedding module) gets
    its traced (fake) weight back on the second restore: the model is left holding a FakeTensor and a
    later export (the prompt-ensemble step) reads it as a frozen weight."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


def step_input_names(trainable: Sequence[str]) -> list[str]:
    return (["input_ids", "attention_mask", "labels", STEP_LR, STEP_T] + list(trainable)
            + [ADAM_M + n for n in trainable] + [ADAM_V + n for n in trainable])


def step_output_names(trainable: Sequence[str]) -> list[str]:
    return (["loss"] + [NEW + n for n in trainable] + [NEW + ADAM_M + n for n in trainable]
            + [NEW + ADAM_V + n for n in trainable])


@contextlib.contextmanager
def _quiet():
    import logging

    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def export_step_graph(model: torch.nn.Module, task: str, num_virtual_tokens: int, opset: int, vocab: int,
                      trainable: Sequence[str], dropout: bool = False, ensemble: int = 0,
                      prompt: str | None = None) -> onnx.ModelProto:
    """The step graph of ``model`` (a PEFT model); frozen weights become (full) initializers named by
    their state-dict names, ready for :func:`export.onnx_graph.strip_weights`.

    ``ensemble=K`` (with ``prompt``, the soft prompt's tensor name) makes the prompt-ensemble step
    instead: ``prompt`` is neither trained nor a weight but :func:`mix_prompts` of the trainable
    ``ENSEMBLE_MIX`` (K logits) and the graph input ``ENSEMBLE_POOL`` (K pool prompts); the other
    ``trainable`` tensors (the head) train as usual."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = [n for n in trainable if not (ensemble and n == prompt)]
    missing = [n for n in trainable if n not in params]
    if missing:
        raise ExportError(f"trainable tensor {missing[0]!r} is not a parameter of the model")
    prompt_tokens = {PROMPT_TOKENS + k: v for k, v in getattr(model, "prompt_tokens", {}).items()}
    derived = {prompt} if ensemble else set()
    frozen = ([n for n in params if n not in set(trainable) | derived] + list(buffers) + list(prompt_tokens))
    train_set = set(trainable)
    frozen_vals = {**{k: v for k, v in params.items() if k not in train_set | derived}, **buffers, **prompt_tokens}
    if ensemble:
        if prompt not in params:
            raise ExportError("a prompt ensemble needs a soft-prompt bundle (--peft prompt)")
        params = {ENSEMBLE_MIX: torch.zeros(ensemble), **params}
        trainable = [ENSEMBLE_MIX, *trainable]
        pool = params[prompt].detach().unsqueeze(0).repeat(ensemble, 1, 1)
        frozen = [ENSEMBLE_POOL, *frozen]
    fn = make_step_fn(model, task, num_virtual_tokens, trainable, frozen, mixed_prompt=prompt if ensemble else None)

    x = sample_inputs(task, batch=2, seq=8, vocab=vocab)
    tv = [params[n].detach().clone().requires_grad_(True) for n in trainable]
    example = (x["input_ids"], x["attention_mask"], x["labels"], torch.tensor(1e-3), torch.tensor(1.0),
               *tv, *[torch.zeros_like(p) for p in tv], *[torch.zeros_like(p) for p in tv],
               *([pool] if ensemble else []), *[frozen_vals[k].detach() for k in frozen[1 if ensemble else 0:]])

    was_training = model.training
    model.train(dropout)
    try:
        with _quiet(), traceable_masks(), torch.enable_grad():
            gm = make_fx(fn, tracing_mode="symbolic", decomposition_table=core_aten_decompositions())(*example)
    finally:
        model.train(was_training)

    in_names = step_input_names(trainable) + list(frozen)
    out_names = step_output_names(trainable)
    seq_axes = {0: "batch"} if task == "seq-cls" else {0: "batch", 1: "seq"}
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "labels": seq_axes}
    dynamic_shapes = tuple(dyn.get(name) for name in in_names)
    with _quiet():
        prog = torch.onnx.export(gm, example, dynamo=True, opset_version=max(opset, 18), input_names=in_names,
                                 output_names=out_names, dynamic_shapes=dynamic_shapes, optimize=True,
                                 verbose=False, report=False)
    proto = prog.model_proto
    return _frozen_inputs_to_initializers(proto, {k: frozen_vals[k] for k in frozen if k != ENSEMBLE_POOL},
                                          byteless={*params, *buffers})


def _frozen_inputs_to_initializers(proto: onnx.ModelProto, frozen: dict[str, torch.Tensor],
                                   byteless: set[str] = frozenset()) -> onnx.ModelProto:
    """Frozen weights were traced as inputs (so they keep their names); make them initializers. The
    float32 ones named in ``byteless`` (the model's parameters and buffers, which the bundle's
    weights.safetensors holds) get no bytes, only external data at ``EXTERNAL_LOCATION`` that
    ``strip_weights`` points at the file: a copy of every frozen weight in the graph would add the
    model's size to the export's peak memory (1.6 GB for a 1.1B model's 2,2,2 emulator)."""
    from onnx import numpy_helper

    from export.onnx_graph import EXTERNAL_LOCATION

    g = proto.graph
    keep = [i for i in g.input if i.name not in frozen]
    consumed = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    used = {i.name for i in g.input} & set(frozen) & consumed  # ORT drops unused ones before external data
    del g.input[:]
    g.input.extend(keep)
    for name in sorted(used):
        value = frozen[name]
        if name in byteless and value.dtype == torch.float32:
            t = g.initializer.add()
            t.name, t.data_type, t.data_location = name, onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
            t.dims.extend(value.shape)
            entry = t.external_data.add()
            entry.key, entry.value = "location", EXTERNAL_LOCATION
        else:
            g.initializer.append(numpy_helper.from_array(value.detach().cpu().numpy(), name))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto

"""Torch -> ONNX for training, and the graph preparation ONNX Runtime training needs, in one place.

The traps, each handled here once:
- constant folding renames or folds away weights (e.g. the transposed LoRA matrices): export with
  ``do_constant_folding=False`` on the TorchScript exporter;
- the TorchScript exporter de-duplicates initializers with equal values (every freshly initialised
  ``lora_B`` is all zeros) behind ``Identity`` nodes: give each parameter its own initializer again;
- LayerNormalization / Dropout need their optional outputs for ORT's gradient builder
  (onnxruntime issue 19427);
- SDPA has no ORT gradient: the model is loaded with eager attention (see ``loading``);
- the loss is written once in torch and exported with the forward (``TrainingForward``), so the ORT
  graph and the torch reference compute the same function, token-level cross-entropy with
  ignore index -100 for causal LMs included (the stock CrossEntropy block is wrong for [B,S,V]);
- onnxruntime-training 1.19 accepts IR version <= 10.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx
import torch
import torch.nn.functional as F

from device_runtime.bundle.names import WRAPPED_PREFIX as _PREFIX  # the wrappers below hold the model as ``m``
from export.errors import ExportError

MAX_IR_VERSION = 10

IGNORE_INDEX = -100


class TrainingForward(torch.nn.Module):
    """``(input_ids, attention_mask, labels) -> (loss, logits)`` around a (PEFT) model."""

    def __init__(self, model: torch.nn.Module, task: str, num_virtual_tokens: int = 0):
        super().__init__()
        self.m = model
        self.task = task
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, input_ids, attention_mask, labels):
        logits = self.m(**model_inputs(self.task, input_ids, attention_mask)).logits
        return loss_from_logits(logits, labels, self.task, self.num_virtual_tokens), logits


class InferenceForward(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.m = model
        self.task = task

    def forward(self, input_ids, attention_mask):
        return self.m(**model_inputs(self.task, input_ids, attention_mask)).logits


def model_inputs(task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Keyword inputs for the HF model that trace with dynamic batch and sequence sizes.

    Decoders build positions and the causal mask from Python ints (``torch.arange(seq)``), which the
    tracer freezes at the sample's length. Here both are computed from tensors instead: positions
    ``0..S-1`` and the same additive causal+padding mask transformers' eager path builds (a 4-D mask
    is used as given). The parity tests compare the result with the plain HF call.
    """
    if task == "seq-cls":
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    positions = torch.cumsum(torch.ones_like(input_ids), dim=-1) - 1  # [B, S]: 0..S-1
    idx = positions[0]
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [S(q), S(k)]: key position <= query position
    allowed = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
    mask4d = torch.where(allowed, zero, neg)
    return {"input_ids": input_ids, "attention_mask": mask4d, "position_ids": positions, "cache_position": idx}


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, task: str, num_virtual_tokens: int = 0):
    """The kit's training loss; the same function in the torch reference and in the ONNX graph."""
    if task == "seq-cls":
        return F.cross_entropy(logits, labels)
    if num_virtual_tokens:
        logits = logits[:, num_virtual_tokens:, :]  # soft-prompt positions predict nothing
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def sample_inputs(task: str, batch: int = 2, seq: int = 8, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0
    labels = torch.zeros(batch, dtype=torch.long) if task == "seq-cls" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@contextlib.contextmanager
def traceable_masks():
    """transformers builds decoder attention masks with ``torch.vmap`` on torch >= 2.6, which the
    TorchScript tracer cannot follow; use its broadcasting (pre-2.6) implementation while exporting.
    Both build the same mask; the parity tests check the exported graph against torch."""
    try:
        from transformers import masking_utils
    except ImportError:  # older transformers: nothing to patch
        yield
        return
    saved = masking_utils.sdpa_mask
    masking_utils.sdpa_mask = masking_utils.sdpa_mask_older_torch
    try:
        yield
    finally:
        masking_utils.sdpa_mask = saved


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_axes: dict, opset: int, training: bool = False) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), traceable_masks():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, dynamo=False, do_constant_folding=False, export_params=True,
            opset_version=opset, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes,
            training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
        )
    return onnx.load_from_string(buf.getvalue())


def export_training_graph(model: torch.nn.Module, task: str, num_virtual_tokens: int, opset: int,
                          vocab: int, dropout: bool = False) -> onnx.ModelProto:
    """The training graph; with ``dropout`` exported in training mode, so its Dropout nodes are live
    (ONNX Runtime's artifact generator turns them off in the eval graph)."""
    wrapper = TrainingForward(model, task, num_virtual_tokens).train(dropout)
    x = sample_inputs(task, vocab=vocab)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "labels": {0: "batch"} if task == "seq-cls" else {0: "batch", 1: "seq"},
            "logits": {0: "batch"} if task == "seq-cls" else {0: "batch", 1: "seq_out"}}
    try:
        return _export(wrapper, (x["input_ids"], x["attention_mask"], x["labels"]),
                       ["input_ids", "attention_mask", "labels"], ["loss", "logits"], axes, opset, training=dropout)
    finally:
        wrapper.eval()


def export_inference_graph(model: torch.nn.Module, task: str, opset: int, vocab: int) -> onnx.ModelProto:
    wrapper = InferenceForward(model, task).eval()
    x = sample_inputs(task, vocab=vocab)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch"} if task == "seq-cls" else {0: "batch", 1: "seq_out"}}
    return _export(wrapper, (x["input_ids"], x["attention_mask"]), ["input_ids", "attention_mask"],
                   ["logits"], axes, opset)


def prepare_graph(model: onnx.ModelProto, expected: list[str]) -> onnx.ModelProto:
    """Make an exported graph trainable by ORT; assert every expected trainable name survived."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    # 1. Undo initializer de-duplication: Identity(initializer) -> its own initializer.
    kept = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            kept.append(node)
    del g.node[:]
    g.node.extend(kept)

    # 2. Strip the wrapper's attribute prefix so names are PEFT's own state-dict names.
    rename = {t.name: t.name[len(_PREFIX):] for t in g.initializer if t.name.startswith(_PREFIX)}
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]

    # 3. Optional outputs the gradient builder needs.
    for node in g.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}__mean", f"{node.output[0]}__inv_std"])
        elif node.op_type == "Dropout" and len(node.output) == 1:
            node.output.append(f"{node.output[0]}__mask")

    # 4. IR version and names.
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    names = {t.name for t in g.initializer}
    missing = [n for n in expected if n not in names]
    if missing:
        raise ExportError(
            f"{len(missing)} trainable tensors did not survive ONNX export as initializers "
            f"(first: {missing[0]}); constant folding or an exporter change renamed them"
        )
    return model


#: where an ``ort-training`` bundle's weightless inference graph's initializers "live": a file that
#: never exists, so loading the graph on its own fails loudly instead of reading bytes from somewhere
#: else; the device runtime supplies these tensors from the checkpoint (``device_runtime.inference``)
EXTERNAL_LOCATION = "__weights_from_checkpoint__"


def strip_weights(model: onnx.ModelProto, available: dict[str, tuple[int, ...]],
                  locate: dict[str, tuple[str, int, int]] | None = None) -> list[str]:
    """Drop the bytes of every float32 initializer the bundle's weights hold with the same shape
    (``available``: name -> shape) and declare it external data: at ``locate[name]`` = (file, offset,
    length), the tensor's own bytes inside ``weights.safetensors``, so ONNX Runtime reads it from there;
    without ``locate`` at :data:`EXTERNAL_LOCATION` (supplied at load time).

    The bundle then carries the model's weights once, not once per graph. Returns the names stripped,
    in graph order; anything else (constants, other dtypes) keeps its bytes. Initializers no node uses
    are dropped (ONNX Runtime drops them before it looks for external initializers)."""
    stripped = []
    consumed = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in consumed]
    for t in unused:
        model.graph.initializer.remove(t)
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or available.get(t.name) != tuple(t.dims):
            continue
        # set by hand, not onnx's set_external_data (which needs the bytes): a graph stripped early, while
        # the bundle's weights are not written yet, is pointed at them here
        where, offset, length = (EXTERNAL_LOCATION, None, None) if locate is None else locate[t.name]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", where), ("offset", offset), ("length", length)):
            if value is not None:
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
        t.ClearField("raw_data")
        t.ClearField("float_data")
        stripped.append(t.name)
    return stripped


def initializers_to_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Turn the named initializers (the trainable tensors) into graph inputs, in ``names`` order, so a
    device feeds its current values to the eval graph at every call."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ExportError(f"trainable tensor {missing[0]!r} is not an initializer of the eval graph")
    wanted = set(names)
    kept = [t for t in g.initializer if t.name not in wanted]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.input.extend(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)) for n in names)
    return model

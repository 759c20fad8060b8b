"""Inference export of the fine-tuned FULL model: merge LoRA into the base weights, export with
constant folding (fine here: nothing is trained any more), optionally int8-quantize."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch

from export.onnx_graph import InferenceForward, sample_inputs, traceable_masks


def export_merged(model: torch.nn.Module, task: str, out: str | Path, quantize_int8: bool = False,
                  opset: int = 17) -> dict[str, Path]:
    """``model`` is a PEFT model after plug-in (or a plain HF model). Returns the written paths."""
    from peft import PeftModel

    merged = copy.deepcopy(model)
    if isinstance(merged, PeftModel):
        merged = merged.merge_and_unload()
    merged.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = sample_inputs(task, vocab=int(merged.config.vocab_size))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch"} if task == "seq-cls" else {0: "batch", 1: "seq_out"}}
    with warnings.catch_warnings(), torch.no_grad(), traceable_masks():
        warnings.simplefilter("ignore")
        torch.onnx.export(InferenceForward(merged, task).eval(), (x["input_ids"], x["attention_mask"]), str(out),
                          dynamo=False, do_constant_folding=True, opset_version=opset,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=axes)
    onnx.checker.check_model(str(out))
    paths = {"fp32": out}
    if quantize_int8:
        from export.quantize import quantize_int8 as q

        qpath = out.with_name(out.stem + ".int8.onnx")
        q(out, qpath)
        paths["int8"] = qpath
    return paths

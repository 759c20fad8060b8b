"""``model.pt2``: a ``torch.export`` program of the same training forward, for devices that have
PyTorch but no ONNX Runtime training build (aarch64 Jetson / Raspberry Pi). The device trains it with
plain autograd, with the manifest's trainable tensors as the only parameters that require grad; it
needs neither transformers nor peft."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from export.onnx_graph import TrainingForward, sample_inputs
from export.errors import ExportError


def save_torch_program(model: torch.nn.Module, task: str, num_virtual_tokens: int, vocab: int, path: str | Path,
                       trainable: list[str]) -> None:
    wrapper = TrainingForward(model, task, num_virtual_tokens).eval()
    x = sample_inputs(task, batch=2, seq=8, vocab=vocab)
    # AUTO lets torch.export derive the bounds (e.g. seq <= max position embeddings) itself.
    batch = seq = torch.export.Dim.AUTO
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
              "labels": {0: batch} if task == "seq-cls" else {0: batch, 1: seq}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.export.export(wrapper, (x["input_ids"], x["attention_mask"], x["labels"]),
                                       dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types
            raise ExportError(f"torch.export could not capture the model: {str(exc).splitlines()[0][:300]}") \
                from None
    names = set(prog.state_dict)
    missing = [n for n in trainable if f"m.{n}" not in names]
    if missing:
        raise ExportError(f"torch.export program lacks trainable tensor '{missing[0]}'")
    torch.export.save(prog, str(path))

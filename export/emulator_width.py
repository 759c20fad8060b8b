"""Narrower emulator middle blocks (``--emulator-middle-width``).

The hidden size is fixed by the adapter blocks around the middle, but the feed-forward width of the
frozen middle blocks is the emulator's own: a narrower FFN is fewer weights and smaller activations
on the device. The kept neurons are those with the largest ``|W_in[j, :]| * |W_out[:, j]|`` (what
neuron ``j`` can contribute to the block's output); distillation then repairs what was cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from export.architectures import Architecture, get_module, set_module
from export.errors import ExportError

#: model type -> (FFN input projection, FFN output projection) inside a block, both ``nn.Linear``
FFN_PATHS: dict[str, tuple[str, str]] = {
    "bert": ("intermediate.dense", "output.dense"),
    "roberta": ("intermediate.dense", "output.dense"),
    "xlm-roberta": ("intermediate.dense", "output.dense"),
}


def neuron_scores(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Per FFN neuron: norm of its input row times norm of its output column (``nn.Linear`` layouts)."""
    return w_in.norm(dim=1) * w_out.norm(dim=0)


def _sliced(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    w = linear.weight.detach().index_select(dim, keep)
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, keep))
    out.weight.requires_grad_(linear.weight.requires_grad)
    if out.bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


def narrow_block(block: torch.nn.Module, arch: Architecture, width: int) -> None:
    """Keep the ``width`` highest-scoring FFN neurons of ``block`` (in place, original neuron order)."""
    paths = FFN_PATHS.get(arch.model_type)
    if paths is None:
        raise ExportError(f"--emulator-middle-width is supported for {', '.join(sorted(FFN_PATHS))} models, "
                          f"not '{arch.model_type}'; drop --emulator-middle-width")
    fc_in, fc_out = get_module(block, paths[0]), get_module(block, paths[1])
    full = fc_in.weight.shape[0]
    if width > full:
        raise ExportError(f"--emulator-middle-width {width} is wider than the model's FFN ({full}): give <= {full}")
    if width == full:
        return
    keep = torch.topk(neuron_scores(fc_in.weight.detach(), fc_out.weight.detach()), width).indices.sort().values
    set_module(block, paths[0], _sliced(fc_in, keep, 0))
    set_module(block, paths[1], _sliced(fc_out, keep, 1))


def narrow_blocks(blocks: Sequence[torch.nn.Module], arch: Architecture, width: int | None) -> None:
    """:func:`narrow_block` on each of ``blocks``; nothing when ``width`` is None."""
    if width is not None:
        for block in blocks:
            narrow_block(block, arch, width)


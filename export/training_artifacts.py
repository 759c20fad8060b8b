"""ONNX Runtime on-device training artifacts (training / eval / optimizer graphs + checkpoint)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import onnx

from export.errors import ExportError


@contextlib.contextmanager
def _quiet_ort():
    """ORT's gradient builder logs every graph transformer at INFO to fd 2, whatever the Python-side
    severity; keep that out of the user's terminal (it is shown if artifact generation fails)."""
    import sys
    import tempfile

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read()[-4000:].decode(errors="replace")
            logging.getLogger(__name__).error("ONNX Runtime log tail:\n%s", tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate(model: onnx.ModelProto, trainable: list[str], out_dir: str | Path) -> None:
    """Write the four artifacts. The loss is already the graph's ``loss`` output (see ``onnx_graph``)."""
    from onnxruntime.training import artifacts

    names = [t.name for t in model.graph.initializer]
    frozen = [n for n in names if n not in set(trainable)]
    os.makedirs(out_dir, exist_ok=True)
    with _quiet_ort():
        try:
            artifacts.generate_artifacts(
                model,
                requires_grad=list(trainable),
                frozen_params=frozen,
                loss=None,
                loss_input_names=["loss"],
                additional_output_names=["logits"],
                optimizer=artifacts.OptimType.AdamW,
                artifact_directory=str(out_dir),
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises bare RuntimeErrors
            raise ExportError(f"ONNX Runtime could not build the training artifacts: {str(exc).splitlines()[0]}") \
                from exc


def checkpoint_shapes(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (trainable or frozen) in an ORT checkpoint."""
    import numpy as np
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(checkpoint))
    return {name: tuple(np.asarray(p.data).shape) for name, p in state.parameters}

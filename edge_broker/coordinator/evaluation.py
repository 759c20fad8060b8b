"""Score the global state the way users will use it, and at the end plug it in and write the report.

Each round's global state is plugged into the full model (torch + peft) and scored
(:class:`Evaluations`); after the last round :func:`plug_in_and_report` writes the PEFT adapter
directory, the global tensors, ``report.json`` and ``report.png``.

The full model is loaded and wrapped once; each round only its adapter tensors are overwritten, so
per-round evaluation costs one forward pass over the evaluation set. For an emulator bundle the
bundle itself can be scored too (ONNX Runtime eval graph), which shows the plug-in gap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from device_runtime.bundle.load import Bundle
from device_runtime.bundle.manifest import Manifest
from edge_broker.coordinator.report import write_report
from edge_broker.store import tensors_to_bytes

log = logging.getLogger("deft.edge")


class FullModelEvaluator:
    def __init__(self, bundle: Bundle, data: str | Path, model: str | None = None, batch_size: int = 64) -> None:
        from device_runtime.data import load_dataset

        self.bundle = bundle
        self.manifest = bundle.manifest
        self.source = model
        self.batch_size = batch_size
        self.ds = load_dataset(data, self.manifest, bundle.tokenizer)
        if self.ds.labels is None:
            raise ValueError(f"{data}: evaluation data needs labels")
        self._model = None

    def _plug(self, tensors: Mapping[str, np.ndarray]):
        import torch

        from export.plugin import load_full_model, plug_in, to_full_names

        if self._model is None:
            self._model = plug_in(load_full_model(self.manifest, self.source), self.manifest, tensors)
            return self._model
        params = dict(self._model.named_parameters())
        with torch.no_grad():
            for name, arr in to_full_names(self.manifest, tensors).items():
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        return self._model

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> dict:
        """Accuracy and mean loss of the full model with ``tensors`` plugged in."""
        t0 = time.perf_counter()
        res = score_model(self._plug(tensors), self.ds, self.batch_size)
        return {**res, "eval_s": round(time.perf_counter() - t0, 3)}

    def save_adapter(self, tensors: Mapping[str, np.ndarray], out_dir: str | Path) -> Path:
        from export.plugin import save_adapter

        return save_adapter(self._plug(tensors), out_dir)


class BundleEvaluator:
    """The bundle's own (emulator) accuracy with ONNX Runtime, for comparison with the plug-in."""

    def __init__(self, bundle: Bundle, data: str | Path) -> None:
        from device_runtime.backends import make_backend
        from device_runtime.data import load_dataset

        self.backend = make_backend(bundle, "ort")
        self.ds = load_dataset(data, bundle.manifest, bundle.tokenizer)

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> dict:
        from device_runtime.evaluate import evaluate
        from device_runtime.state import apply_global_state

        apply_global_state(self.backend, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
        return evaluate(self.backend, self.ds)


class Evaluations:
    """The run's evaluators, built on first use (loading the full model takes a while)."""

    def __init__(self, bundle: Bundle, data: Path, model: str | None, eval_bundle: bool) -> None:
        self.bundle, self.data, self.model, self.eval_bundle = bundle, data, model, eval_bundle
        self.full: FullModelEvaluator | None = None
        self.own: BundleEvaluator | None = None

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> dict:
        """The full model's accuracy, loss and time with ``tensors`` plugged in."""
        if self.full is None:
            self.full = FullModelEvaluator(self.bundle, self.data, self.model)
            if self.eval_bundle:
                self.own = BundleEvaluator(self.bundle, self.data)
        return self.full.evaluate(tensors)

    def round_result(self, tensors: Mapping[str, np.ndarray]) -> dict:
        """What a round's result records of its evaluation."""
        ev = self.evaluate(tensors)
        out = {"accuracy": ev["accuracy"], "eval_loss": ev["loss"], "eval_s": ev["eval_s"]}
        if self.own is not None:
            out["bundle_accuracy"] = self.own.evaluate(tensors)["accuracy"]
        return out


def plug_in_and_report(report: dict, last: tuple[int, dict[str, np.ndarray]] | None, *, manifest: Manifest,
                       model: str | None, out: Path, evaluations: Evaluations | None, t0: float) -> dict:
    """Plug the final global state into the full model, write the adapter and the report."""
    rounds = sorted(report["rounds"], key=lambda x: x["round"])
    report["rounds"] = rounds
    report["accuracy"] = [x.get("accuracy") for x in rounds]
    report["final_accuracy"] = rounds[-1].get("accuracy") if rounds else None
    report["bytes_up"] = int(sum(x.get("bytes_up", 0) for x in rounds))
    report["bytes_down"] = int(sum(x.get("bytes_down", 0) for x in rounds))
    report["wall_s"] = round(time.time() - t0, 3)
    report["adapter_dir"] = None
    if last is not None and manifest.peft.peft_config:
        try:
            if evaluations is not None and evaluations.full is not None:
                path = evaluations.full.save_adapter(last[1], out / "adapter")
            else:
                from export.plugin import load_full_model, plug_in, save_adapter

                path = save_adapter(plug_in(load_full_model(manifest, model), manifest, last[1]), out / "adapter")
            report["adapter_dir"] = str(path)
        except ImportError:
            log.warning("torch/peft are not installed here: no adapter directory written (pip install deftkit[export])")
    out.mkdir(parents=True, exist_ok=True)
    if last is not None:
        (out / "global.safetensors").write_bytes(tensors_to_bytes(last[1]))
    path, png = write_report(report, out)
    report["report"] = str(path)
    report["plot"] = str(png) if png else None
    return report


def score_model(model, ds, batch_size: int = 64) -> dict:
    """Accuracy and mean loss of a torch model on a tokenized dataset (``device_runtime.data.Dataset``):
    per row for classification, per real next token for a causal LM."""
    import torch

    correct, loss_sum, n, count = 0, 0.0, len(ds), 0
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            b = ds.batch(idx)
            out = model(input_ids=torch.from_numpy(b["input_ids"]),
                        attention_mask=torch.from_numpy(b["attention_mask"]))
            logits = out.logits.float()
            labels = torch.from_numpy(b["labels"])
            if logits.dim() == 3:  # causal LM: next-token loss and accuracy over the real tokens
                logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
                keep = labels != -100
                logits, labels = logits[keep], labels[keep]
                count += int(keep.sum())
            else:
                count += len(idx)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count), "rows": n}

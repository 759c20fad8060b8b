"""Cache of distilled emulator middles, keyed by sha256 over (model, layout, data, settings).

Distillation takes minutes; exporting the same emulator again (another LoRA rank, another head, a
re-run of the demo) must not repeat it. An entry is one safetensors file (the middle blocks'
state, never pickle) whose header carries the result's figures; it is written to a temporary
name and renamed, so a killed export leaves no half-written entry, and an unreadable entry is
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from export.distill import DistillResult

#: bump when the distillation recipe changes what a key's entry would contain
RECIPE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("DEFT_CACHE_DIR")
    return Path(root) / "distill" if root else Path.home() / ".cache" / "deftkit" / "distill"


def tensors_sha256(named: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes and float32 bytes: identifies the teacher's weights in memory."""
    h = hashlib.sha256()
    for name, t in named:
        a = t.detach().to(torch.float32).contiguous().cpu().numpy()
        h.update(f"{name}:{tuple(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(model_sha256: str, layout: dict, data_sha256: str, settings: dict) -> str:
    doc = {"recipe": RECIPE_VERSION, "model": model_sha256, "layout": layout, "data": data_sha256,
           "settings": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def load(cache_dir: Path, key: str) -> DistillResult | None:
    """The cached result for ``key``, or None when absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["result"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, KeyError, ValueError, OSError):
        return None
    return DistillResult(state=state, kd_loss_initial=meta["kd_loss_initial"], kd_loss_final=meta["kd_loss_final"],
                         history=meta["history"], rows=meta["rows"], seconds=meta["seconds"])


def store(cache_dir: Path, key: str, result: DistillResult) -> Path:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"kd_loss_initial": result.kd_loss_initial, "kd_loss_final": result.kd_loss_final,
            "history": result.history, "rows": result.rows, "seconds": result.seconds}
    path = cache_dir / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in result.state.items()}, tmp, metadata={"result": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the models it came from
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

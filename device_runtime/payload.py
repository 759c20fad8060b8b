"""Update payloads: what a device sends to the edge after training.

A payload is one safetensors blob (never pickle: the edge decodes bytes from untrusted devices)
whose ``__metadata__`` carries a JSON header (bundle hash, device id, round, samples, metrics,
encoding, full-or-delta, top-k) and a sha256 over that header and every tensor, so a truncated or
tampered blob is refused with a clear message instead of being averaged into the global model.

Encodings and their decode error (``x`` the value sent, per tensor):

- ``fp32``: exact.
- ``fp16``: relative error <= 2**-11 (values beyond fp16 range are refused, not clipped silently).
- ``int8``: symmetric, one scale per tensor, ``|err| <= max|x| / 254``.
- ``int8-row``: one scale per row (first axis), ``|err| <= max|row| / 254``; better for tensors whose
  rows differ in magnitude, at 4 bytes per row.

``topk`` (a fraction in (0, 1]) keeps only the largest-magnitude entries of each tensor, sent as
int32 flat indices + values; dropped entries decode as 0 (use it on deltas).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict

from device_runtime.errors import PayloadError, validated

#: how a payload stores its values; the one list devices, messages and the edge all use
Encoding = Literal["fp32", "fp16", "int8", "int8-row"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
#: payload bytes per value of each encoding (int8-row: about 5% more for its per-row scales)
BYTES_PER_VALUE: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-row": 1.05}
FORMAT = "deftkit-update"
FORMAT_VERSION = 1
_META_KEY = "deftkit"
_SCALES = "__scales__"
_IDX = "::idx"
_FP16_MAX = float(np.finfo(np.float16).max)
#: largest tensor a payload may declare (elements); guards the dense buffer of a top-k tensor
MAX_NUMEL = 1 << 28


class PayloadMeta(BaseModel):
    """The header of an update payload."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["deftkit-update"] = FORMAT
    version: int = FORMAT_VERSION
    bundle_hash: str
    device_id: str
    round: int
    samples: int
    metrics: dict[str, Any] = {}
    encoding: Encoding
    kind: Literal["full", "delta"]
    topk: float | None = None
    #: decoded shape of each top-k tensor (the others carry their shape in the safetensors header)
    shapes: dict[str, list[int]] = {}
    content_sha256: str = ""


@dataclass
class Update:
    meta: PayloadMeta
    #: decoded float32 tensors: the trained tensors (kind full) or their delta from the base (kind delta)
    tensors: dict[str, np.ndarray]

    def full_tensors(self, base: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The trained tensors; a delta update needs the ``base`` it was computed against."""
        if self.meta.kind == "full":
            return dict(self.tensors)
        if base is None:
            raise PayloadError("this update is a delta; give the global tensors it was computed against")
        return apply_delta(self.tensors, base)


def apply_delta(delta: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [n for n in delta if n not in base]
    if missing:
        raise PayloadError(f"delta tensor {missing[0]!r} has no base tensor; was it made for another bundle?")
    out = {n: np.asarray(base[n], dtype=np.float32).copy() for n in base}
    for n, d in delta.items():
        if tuple(out[n].shape) != tuple(d.shape):
            raise PayloadError(f"delta tensor {n!r} has shape {tuple(d.shape)}, base has {tuple(out[n].shape)}")
        out[n] = (out[n] + d).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ encode


def _rows(shape: tuple[int, ...], encoding: str) -> int:
    """Number of scales a tensor has."""
    return int(shape[0]) if encoding == "int8-row" and len(shape) >= 2 else 1


def _quantize(values: np.ndarray, row_of: np.ndarray | None, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: q = round(x / s), s = max|x| / 127 over the tensor or its row."""
    absx = np.abs(values)
    if row_of is None or n_rows == 1:
        peak = np.array([absx.max() if absx.size else 0.0], dtype=np.float32)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q = np.rint(values / scales[0])
    else:
        peak = np.zeros(n_rows, dtype=np.float32)
        np.maximum.at(peak, row_of, absx)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q = np.rint(values / scales[row_of])
    return np.clip(q, -127, 127).astype(np.int8), scales


def _content_hash(meta_json: str, tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"\n{k}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_update(
    tensors: Mapping[str, np.ndarray],
    *,
    bundle_hash: str,
    device_id: str,
    round: int = 0,  # the protocol's word (shadows the builtin here only)
    samples: int = 0,
    metrics: Mapping[str, Any] | None = None,
    encoding: str = "fp32",
    base: Mapping[str, np.ndarray] | None = None,
    topk: float | None = None,
) -> bytes:
    """Encode trained ``tensors`` (or, with ``base``, their delta from it) as an update payload."""
    from safetensors.numpy import save

    if encoding not in ENCODINGS:
        raise PayloadError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if topk is not None and not 0.0 < float(topk) <= 1.0:
        raise PayloadError(f"top-k fraction {topk} must be in (0, 1]")
    if not tensors:
        raise PayloadError("an update needs at least one tensor")
    values: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        # contiguous: safetensors writes a strided view's underlying buffer, not its elements
        x = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if base is not None:
            if name not in base:
                raise PayloadError(f"tensor {name!r} has no base tensor to compute a delta against")
            x = x - np.asarray(base[name], dtype=np.float32)
        if not np.isfinite(x).all():
            raise PayloadError(f"tensor {name!r} has NaN/Inf values; refusing to send it")
        if encoding == "fp16" and np.abs(x).max(initial=0.0) > _FP16_MAX:
            raise PayloadError(f"tensor {name!r} exceeds the fp16 range; use --encoding fp32 or int8")
        values[name] = x

    out: dict[str, np.ndarray] = {}
    scales: list[np.ndarray] = []
    shapes: dict[str, list[int]] = {}
    for name, x in values.items():
        shape = tuple(x.shape)
        flat = x.reshape(-1)
        idx: np.ndarray | None = None
        if topk is not None and topk < 1.0:
            shapes[name] = list(shape)
            k = max(1, int(flat.size * float(topk) + 0.5))
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]).astype(np.int32)
            out[name + _IDX] = idx
            vals = flat[idx]
        else:
            vals = flat
        if encoding == "fp32":
            out[name] = vals if idx is not None else x
        elif encoding == "fp16":
            enc = vals.astype(np.float16)
            out[name] = enc if idx is not None else enc.reshape(shape)
        else:
            n_rows = _rows(shape, encoding)
            row_size = flat.size // n_rows if n_rows else 1
            row_of = None
            if n_rows > 1:
                positions = idx if idx is not None else np.arange(flat.size)
                row_of = (positions // row_size).astype(np.int64)
            q, s = _quantize(vals, row_of, n_rows)
            out[name] = q if idx is not None else q.reshape(shape)
            scales.append(s)
    if scales:
        out[_SCALES] = np.concatenate(scales).astype(np.float32)

    meta = PayloadMeta(bundle_hash=bundle_hash, device_id=str(device_id), round=int(round), samples=int(samples),
                       metrics=dict(metrics or {}), encoding=encoding, kind="delta" if base is not None else "full",
                       topk=None if topk is None or topk >= 1.0 else float(topk), shapes=shapes)
    try:
        meta_json = meta.model_dump_json()
    except Exception as exc:  # noqa: BLE001 - pydantic serialisation errors
        raise PayloadError(f"metrics cannot be written as JSON ({exc})") from None
    digest = _content_hash(meta_json, out)
    header = meta.model_copy(update={"content_sha256": digest}).model_dump_json()
    return save(out, metadata={_META_KEY: header})


# ------------------------------------------------------------------------------------------ decode


def read_meta(blob: bytes) -> PayloadMeta:
    """The header alone (cheap: no tensor is decoded); raises ``PayloadError`` for a malformed blob."""
    if len(blob) < 8:
        raise PayloadError(f"payload truncated: {len(blob)} bytes, not even a safetensors header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise PayloadError(f"payload truncated: header says {n} bytes but only {len(blob) - 8} follow; "
                           "the transfer was cut off, request it again")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PayloadError("payload header is not valid JSON: corrupted or not a safetensors blob") from None
    raw = (header.get("__metadata__") or {}).get(_META_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise PayloadError("not a deftkit update payload (no 'deftkit' metadata in the safetensors header)")
    return validated(PayloadMeta, raw, PayloadError, "payload header")


def decode_update(blob: bytes, *, bundle_hash: str | None = None) -> Update:
    """Decode and check a payload: truncation, content hash, shapes; optionally the bundle it belongs to."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = read_meta(blob)
    if meta.version != FORMAT_VERSION:
        raise PayloadError(f"payload format version {meta.version} is not supported (expects {FORMAT_VERSION})")
    if bundle_hash is not None and meta.bundle_hash != bundle_hash:
        raise PayloadError(f"payload was made for bundle {meta.bundle_hash[:12]}, not {bundle_hash[:12]}")
    try:
        raw = load(bytes(blob))
    except SafetensorError as exc:
        raise PayloadError(f"payload truncated or corrupted ({exc}); request it again") from None
    check_meta = meta.model_copy(update={"content_sha256": ""}).model_dump_json()
    if _content_hash(check_meta, raw) != meta.content_sha256:
        raise PayloadError("payload content does not match its sha256 (tampered or corrupted in transit); "
                           "discard it")

    scales = raw.get(_SCALES)
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    names = sorted(k for k in raw if k != _SCALES and not k.endswith(_IDX))
    for name in names:
        if (name + _IDX in raw) != (name in meta.shapes):
            raise PayloadError(f"tensor {name!r}: top-k indices and header disagree")
        shape = tuple(meta.shapes[name]) if name in meta.shapes else tuple(raw[name].shape)
        if any(d < 0 for d in shape):
            raise PayloadError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel > MAX_NUMEL:
            raise PayloadError(f"tensor {name!r}: declared shape {list(shape)} is larger than any LoRA update")
        vals = raw[name].reshape(-1)
        idx = raw.get(name + _IDX)
        if idx is not None:
            if idx.size != vals.size or (idx.size and (idx.min() < 0 or idx.max() >= numel)):
                raise PayloadError(f"tensor {name!r}: top-k indices out of range")
            if meta.topk is None or idx.size != max(1, int(numel * meta.topk + 0.5)):
                raise PayloadError(f"tensor {name!r}: {idx.size} top-k entries do not match the header")
        elif vals.size != numel:
            raise PayloadError(f"tensor {name!r} has {vals.size} values, its shape {list(shape)} needs {numel}")
        if meta.encoding in ("int8", "int8-row"):
            n_rows = _rows(shape, meta.encoding)
            if scales is None or offset + n_rows > scales.size:
                raise PayloadError(f"tensor {name!r}: int8 scales missing from the payload")
            s = scales[offset:offset + n_rows]
            offset += n_rows
            if n_rows == 1:
                vals = vals.astype(np.float32) * s[0]
            else:
                positions = idx if idx is not None else np.arange(numel)
                vals = vals.astype(np.float32) * s[positions // (numel // n_rows)]
        else:
            vals = vals.astype(np.float32)
        if idx is not None:
            dense = np.zeros(numel, dtype=np.float32)
            dense[idx] = vals
            vals = dense
        tensors[name] = vals.reshape(shape)
    return Update(meta=meta, tensors=tensors)


def max_decode_error(x: np.ndarray, encoding: str) -> float:
    """The documented worst-case absolute decode error of ``x`` under ``encoding`` (no top-k)."""
    x = np.asarray(x, dtype=np.float32)
    if encoding == "fp32":
        return 0.0
    if encoding == "fp16":
        return float(np.abs(x).max(initial=0.0)) * 2.0 ** -11 + 6e-8
    if encoding == "int8-row" and x.ndim >= 2:
        return float(np.abs(x).reshape(x.shape[0], -1).max(axis=1).max(initial=0.0)) / 254.0 * 1.0001
    return float(np.abs(x).max(initial=0.0)) / 254.0 * 1.0001

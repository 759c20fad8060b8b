"""Validate an update before it counts: one typed reason per way an update can be wrong.

The coordinator calls :func:`validate_payload` on every received update blob (or
:func:`validate_update` on already-decoded tensors). A rejection is logged, acknowledged to the
device with its reason, stored with the update (so the report can count them) and the round goes on;
nothing rejected ever reaches aggregation. Checks run cheapest first: size before decoding, identity
before tensors, shapes before the full scan for NaN/Inf.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np


class RejectReason(StrEnum):
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"  # not decodable: truncated, tampered (content hash), not a payload
    UNKNOWN_DEVICE = "unknown_device"
    NOT_SELECTED = "not_selected"  # a registered device that was not given this round's task
    DEVICE_MISMATCH = "device_mismatch"  # payload says another device than the topic / login it came from
    WRONG_ROUND = "wrong_round"
    WRONG_BUNDLE = "wrong_bundle"
    BAD_SAMPLES = "bad_samples"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    WRONG_TASK = "wrong_task"  # a shared prompt for another task or label set than the pool's bundle


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class SpecLike(Protocol):
    name: str
    shape: Sequence[int]
    dtype: str


Spec = "SpecLike | tuple[str, Sequence[int], str]"


def _norm_spec(s: Any) -> tuple[str, tuple[int, ...], np.dtype]:
    if isinstance(s, tuple):
        name, shape, dtype = s
    else:
        name, shape, dtype = s.name, s.shape, s.dtype
    return name, tuple(int(d) for d in shape), np.dtype(dtype)


@dataclass
class UpdateRules:
    """What an update must look like in the current round.

    ``specs`` is the bundle's trainable tensor list (``Manifest.trainable``: TensorSpec or
    ``(name, shape, dtype)`` tuples). ``device_specs`` overrides it per device where devices train
    different blocks (LoLa DEFT); with ``allow_subset`` an update may carry only some of the names.
    """

    devices: Collection[str]
    round: int
    bundle_hash: str
    specs: Sequence[Any]
    device_specs: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    #: per-device bundle hash where devices train different variants of the bundle (LoLa DEFT blocks)
    device_bundles: Mapping[str, str] = field(default_factory=dict)
    #: the devices given this round's task (None: any registered device may contribute)
    selected: Collection[str] | None = None
    allow_subset: bool = False
    max_bytes: int = 64 * 1024 * 1024
    max_samples: int = 10**9

    def specs_for(self, device: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {n: (shape, dt) for n, shape, dt in map(_norm_spec, self.device_specs.get(device, self.specs))}


def validate_update(
    rules: UpdateRules,
    *,
    device: str,
    round: int,
    bundle_hash: str,
    tensors: Mapping[str, np.ndarray],
    samples: int,
    payload_bytes: int | None = None,
) -> Rejection | None:
    """None if the update may count, else the first reason it may not."""
    if payload_bytes is not None and payload_bytes > rules.max_bytes:
        return Rejection(RejectReason.TOO_LARGE, f"{payload_bytes} bytes, limit {rules.max_bytes}")
    if device not in rules.devices:
        return Rejection(RejectReason.UNKNOWN_DEVICE, f"device {device!r} is not registered in this fleet")
    if rules.selected is not None and device not in rules.selected and round == rules.round:
        return Rejection(RejectReason.NOT_SELECTED, f"device {device!r} was not selected for round {rules.round}")
    if round != rules.round:
        return Rejection(RejectReason.WRONG_ROUND, f"update is for round {round}, the current round is {rules.round}")
    want = rules.device_bundles.get(device, rules.bundle_hash)
    if bundle_hash != want:
        return Rejection(RejectReason.WRONG_BUNDLE,
                         f"update was trained on bundle {bundle_hash[:12]}, this round uses {want[:12]}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or not 0 < samples <= rules.max_samples:
        return Rejection(RejectReason.BAD_SAMPLES, f"samples={samples!r}; must be an integer in 1..{rules.max_samples}")
    return check_tensors(rules.specs_for(device), tensors, allow_subset=rules.allow_subset)


def check_tensors(expected: Mapping[str, tuple[tuple[int, ...], np.dtype]], tensors: Mapping[str, np.ndarray], *,
                  allow_subset: bool = False) -> Rejection | None:
    """Names, shapes, dtypes and finite values of ``tensors`` against ``expected`` (name -> (shape, dtype)):
    the tensor rules updates and shared prompts both follow."""
    extra = sorted(set(tensors) - set(expected))
    if extra:
        return Rejection(RejectReason.UNEXPECTED_TENSOR, f"{extra[0]!r} is not trainable in this bundle" +
                         (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(set(expected) - set(tensors))
    if missing and (not allow_subset or not tensors):
        return Rejection(RejectReason.MISSING_TENSOR, f"{missing[0]!r} is missing" +
                         (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name in sorted(tensors):
        arr = tensors[name]
        shape, dtype = expected[name]
        if tuple(arr.shape) != shape:
            return Rejection(RejectReason.WRONG_SHAPE, f"{name!r} has shape {tuple(arr.shape)}, expected {shape}")
        if np.dtype(arr.dtype) != dtype:
            return Rejection(RejectReason.WRONG_DTYPE, f"{name!r} has dtype {arr.dtype}, expected {dtype}")
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            return Rejection(RejectReason.NON_FINITE, f"{name!r} has {bad} NaN/Inf values")
    return None


def _decode_from(blob: bytes, *, sender: str, devices: Collection[str], max_bytes: int) -> tuple[Any, Rejection | None]:
    """The checks every payload from a device passes first, cheapest first: size, a registered sender,
    a decodable blob with an intact content hash, the sender named in the payload. (Update, None) or
    (None, rejection)."""
    from device_runtime.errors import PayloadError
    from device_runtime.payload import decode_update

    if len(blob) > max_bytes:
        return None, Rejection(RejectReason.TOO_LARGE, f"{len(blob)} bytes, limit {max_bytes}")
    if sender not in devices:
        return None, Rejection(RejectReason.UNKNOWN_DEVICE, f"device {sender!r} is not registered in this fleet")
    try:
        upd = decode_update(blob)
    except PayloadError as exc:
        return None, Rejection(RejectReason.MALFORMED, str(exc))
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is a malformed payload
        return None, Rejection(RejectReason.MALFORMED, f"undecodable payload ({type(exc).__name__}: {exc})")
    if upd.meta.device_id != sender:
        return None, Rejection(RejectReason.DEVICE_MISMATCH,
                               f"payload claims device {upd.meta.device_id!r} but was sent by {sender!r}")
    return upd, None


@dataclass
class CheckedUpdate:
    """A decoded update that passed validation (what the store and aggregation take)."""

    device: str
    round: int
    samples: int
    is_delta: bool
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any]


def validate_payload(
    rules: UpdateRules, blob: bytes, *, sender: str, round: int | None = None
) -> tuple[CheckedUpdate | None, Rejection | None]:
    """Decode a device's update payload (``device_runtime.payload``) and validate it.

    ``sender`` is who the broker says sent it (the topic's device id, which the ACL ties to the
    login); ``round`` the topic's round. Exactly one of the two results is None.
    """
    upd, rej = _decode_from(blob, sender=sender, devices=rules.devices, max_bytes=rules.max_bytes)
    if rej is not None:
        return None, rej
    meta = upd.meta
    if round is not None and meta.round != round:
        return None, Rejection(RejectReason.WRONG_ROUND,
                               f"payload says round {meta.round}, sent on round {round}'s topic")
    rej = validate_update(rules, device=sender, round=meta.round, bundle_hash=meta.bundle_hash,
                          tensors=upd.tensors, samples=meta.samples, payload_bytes=len(blob))
    if rej is not None:
        return None, rej
    return CheckedUpdate(sender, meta.round, meta.samples, meta.kind == "delta", upd.tensors, dict(meta.metrics)), None


@dataclass
class PromptRules:
    """What a shared soft prompt must look like to enter the edge's pool: the pool's bundle (hash,
    trainable tensors: the prompt and, where trained, the head), its task and labels, a size limit."""

    devices: Collection[str]
    bundle_hash: str
    specs: Sequence[Any]
    task: str
    labels: Sequence[str]
    max_bytes: int = 1024 * 1024
    max_samples: int = 10**9

    def expected(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {n: (shape, dt) for n, shape, dt in map(_norm_spec, self.specs)}


@dataclass
class CheckedPrompt:
    device: str
    samples: int
    info: Any  # device_runtime.protocol.PromptInfo
    tensors: dict[str, np.ndarray]


def validate_prompt(rules: PromptRules, blob: bytes, *, sender: str) -> tuple[CheckedPrompt | None, Rejection | None]:
    """Decode a shared prompt (``device_runtime.prompts``) and check it like an update (size, sender,
    content hash, bundle, tensors, finite values) plus its description (task, labels). Exactly one of
    the two results is None."""
    from device_runtime.errors import PayloadError
    from device_runtime.prompts import prompt_info

    upd, rej = _decode_from(blob, sender=sender, devices=rules.devices, max_bytes=rules.max_bytes)
    if rej is not None:
        return None, rej
    try:
        info = prompt_info(upd)
    except PayloadError as exc:
        return None, Rejection(RejectReason.MALFORMED, str(exc))
    meta = upd.meta
    if meta.bundle_hash != rules.bundle_hash:
        return None, Rejection(RejectReason.WRONG_BUNDLE, f"prompt was trained on bundle {meta.bundle_hash[:12]}, "
                                                          f"the pool holds prompts of {rules.bundle_hash[:12]}")
    if info.task != rules.task or list(info.labels) != list(rules.labels):
        return None, Rejection(RejectReason.WRONG_TASK, f"prompt is for {info.task} {list(info.labels)}, the pool "
                                                        f"is for {rules.task} {list(rules.labels)}")
    if meta.kind != "full":
        return None, Rejection(RejectReason.MALFORMED, "a shared prompt carries full tensors, not a delta")
    if isinstance(meta.samples, bool) or not 0 < meta.samples <= rules.max_samples:
        return None, Rejection(RejectReason.BAD_SAMPLES,
                               f"samples={meta.samples!r}; must be an integer in 1..{rules.max_samples}")
    rej = check_tensors(rules.expected(), upd.tensors)
    if rej is not None:
        return None, rej
    return CheckedPrompt(sender, meta.samples, info, upd.tensors), None

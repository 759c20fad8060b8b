"""The deft topic tree (protocol v1).

Every topic starts with ``deft/v1/<fleet>/`` and then says who may write it, so the broker's ACL can
be four patterns (see :func:`acl_patterns`)::

    deft/v1/<fleet>/device/<id>/hello              device -> edge   hello (hardware profile, capabilities)
    deft/v1/<fleet>/device/<id>/heartbeat          device -> edge   liveness, every few seconds
    deft/v1/<fleet>/device/<id>/status             device -> edge   retained; "offline" is the last will
    deft/v1/<fleet>/device/<id>/update/<round>     device -> edge   the trained update of one round (chunked)
    deft/v1/<fleet>/device/<id>/ack                device -> edge   application-level acknowledgements
    deft/v1/<fleet>/device/<id>/bundle-request     device -> edge   "send me bundle X / these chunks of it"
    deft/v1/<fleet>/device/<id>/prompt             device -> edge   a soft prompt for the edge's prompt pool
    deft/v1/<fleet>/device/<id>/prompt-to/<peer>   device -> peer   a soft prompt sent directly to device <peer>
    deft/v1/<fleet>/to/<id>/task/<round>           edge -> one device  a round's task for that device
    deft/v1/<fleet>/to/<id>/ack                    edge -> one device  "update <key> accepted / rejected: why"
    deft/v1/<fleet>/to/<id>/bundle/<bundle>        edge -> one device  bundle chunks resent on request
    deft/v1/<fleet>/all/task/<round>               edge -> all      a task for every selected device
    deft/v1/<fleet>/all/global                     edge -> all      retained: the current global tensors
    deft/v1/<fleet>/all/bundle/<bundle>            edge -> all      bundle chunks
    deft/v1/<fleet>/all/prompts/<id>               edge -> all      retained: device <id>'s prompt in the pool

The one topic a device reads under another device's subtree is ``device/+/prompt-to/<its id>``
(device-to-device prompt transfer over the broker): the sender can write it because it is its own
subtree, the receiver can read it because the last segment is its own id, and nobody else can read it.

Watch a whole run with ``mosquitto_sub -t 'deft/v1/<fleet>/#' -v`` (as the edge account).
Fleet and device ids are ``[A-Za-z0-9_.-]``, 1-64 characters: no ``/``, ``+`` or ``#``, so an id can
never widen an ACL pattern or escape its subtree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from device_runtime.protocol.errors import TopicError

PROTOCOL_VERSION = 1
ROOT = "deft"
VERSION_SEGMENT = f"v{PROTOCOL_VERSION}"
#: the fleet every command and config uses unless told otherwise (the demo names its own, "demo")
DEFAULT_FLEET = "default"

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# a bundle hash or transfer id: hex or an id
_TOKEN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")

Direction = Literal["device", "to", "all"]

#: kinds a device publishes under ``device/<id>/``; value: whether a round / token segment follows
DEVICE_KINDS: dict[str, bool] = {
    "hello": False,
    "heartbeat": False,
    "status": False,
    "update": True,
    "ack": False,
    "bundle-request": False,
    "prompt": False,
    "prompt-to": True,
}
#: kinds the edge publishes to one device under ``to/<id>/``
TO_DEVICE_KINDS: dict[str, bool] = {"task": True, "ack": False, "bundle": True}
#: kinds the edge publishes to all under ``all/``
ALL_KINDS: dict[str, bool] = {"task": True, "global": False, "bundle": True, "prompts": True}


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a valid fleet/device id, else raise a :class:`TopicError` saying why."""
    if not isinstance(value, str) or not _ID.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "(no '/', '+', '#' or spaces, which would break MQTT topics and ACLs)"
        )
    return value


def _check_token(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 _ . -")
    return value


def _check_round(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TopicError(f"invalid round {value!r}: rounds are integers >= 0")
    return value


def _device_topic(kind: str) -> Callable[[Topics, str], str]:
    """A :class:`Topics` method: ``deft/v1/<fleet>/device/<id>/<kind>`` for a device id."""

    def topic(self: Topics, device: str) -> str:
        return self._dev(device, kind)

    topic.__name__ = topic.__qualname__ = kind.replace("-", "_")
    topic.__doc__ = f"``deft/v1/<fleet>/device/<id>/{kind}``"
    return topic


@dataclass(frozen=True)
class Topics:
    """Topic builder for one fleet. ``Topics("lab").update("pi-1", 3)`` -> ``deft/v1/lab/device/pi-1/update/3``."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")

    @property
    def base(self) -> str:
        return f"{ROOT}/{VERSION_SEGMENT}/{self.fleet}"

    # ---- device -> edge -------------------------------------------------------------------------
    def _dev(self, device: str, kind: str) -> str:
        return f"{self.base}/device/{check_id(device)}/{kind}"

    hello = _device_topic("hello")
    heartbeat = _device_topic("heartbeat")
    status = _device_topic("status")
    device_ack = _device_topic("ack")
    bundle_request = _device_topic("bundle-request")
    prompt = _device_topic("prompt")

    def update(self, device: str, round: int) -> str:
        return f"{self._dev(device, 'update')}/{_check_round(round)}"

    def prompt_to(self, device: str, peer: str) -> str:
        """Device ``device`` sends a prompt directly to ``peer`` (who alone may read it)."""
        return f"{self._dev(device, 'prompt-to')}/{check_id(peer, 'peer device id')}"

    def prompts_for(self, device: str) -> str:
        """What ``device`` subscribes to for prompts sent to it directly, from any peer."""
        return f"{self.base}/device/+/prompt-to/{check_id(device)}"

    # ---- edge -> one device ---------------------------------------------------------------------
    def _to(self, device: str, kind: str) -> str:
        return f"{self.base}/to/{check_id(device)}/{kind}"

    def task_for(self, device: str, round: int) -> str:
        return f"{self._to(device, 'task')}/{_check_round(round)}"

    def ack_to(self, device: str) -> str:
        return self._to(device, "ack")

    def bundle_to(self, device: str, bundle: str) -> str:
        return f"{self._to(device, 'bundle')}/{_check_token(bundle, 'bundle id')}"

    # ---- edge -> all ----------------------------------------------------------------------------
    def task_all(self, round: int) -> str:
        return f"{self.base}/all/task/{_check_round(round)}"

    def global_state(self) -> str:
        return f"{self.base}/all/global"

    def bundle_all(self, bundle: str) -> str:
        return f"{self.base}/all/bundle/{_check_token(bundle, 'bundle id')}"

    def prompts_relay(self, device: str) -> str:
        return f"{self.base}/all/prompts/{check_id(device)}"

    def prompt_pool(self) -> str:
        """Every prompt in the edge's pool (retained: a device that subscribes later gets them all)."""
        return f"{self.base}/all/prompts/+"

    # ---- subscription patterns ------------------------------------------------------------------
    def everything(self) -> str:
        """What ``mosquitto_sub`` (and the edge) subscribes to, to see a whole run."""
        return f"{self.base}/#"

    def from_devices(self, kind: str = "#") -> str:
        """Edge subscription: ``device/+/<kind>`` (``#``: all kinds); ``update`` covers every round."""
        if kind == "#":
            return f"{self.base}/device/+/#"
        if kind not in DEVICE_KINDS:
            raise TopicError(f"unknown device topic kind {kind!r}; known: {', '.join(DEVICE_KINDS)}")
        return f"{self.base}/device/+/{kind}" + ("/+" if DEVICE_KINDS[kind] else "")

    def device_inbox(self, device: str) -> list[str]:
        """Device subscriptions: everything addressed to it and everything addressed to all (prompts sent
        to it by peers: :meth:`prompts_for`)."""
        return [f"{self.base}/to/{check_id(device)}/#", f"{self.base}/all/#"]


def acl_patterns(fleet: str, user_token: str = "%u") -> dict[str, list[str]]:
    """The device ACL as MQTT filters: ``{"write": [...], "read": [...]}``.

    ``user_token`` is substituted for the device id: Mosquitto's ``%u`` pattern, or a concrete id for
    brokers whose ACLs are per-user lists (amqtt).
    """
    base = f"{ROOT}/{VERSION_SEGMENT}/{check_id(fleet, 'fleet name')}"
    return {
        "write": [f"{base}/device/{user_token}/#"],
        "read": [f"{base}/to/{user_token}/#", f"{base}/all/#", f"{base}/device/+/prompt-to/{user_token}"],
    }


@dataclass(frozen=True)
class TopicInfo:
    """A parsed topic. ``round`` is set for update/task topics, ``token`` for bundle topics and for the
    peer of a ``prompt-to`` topic; ``device`` is the sender (device/...), the addressee (to/...) or, for
    ``all/prompts/<id>``, the device whose prompt it is."""

    fleet: str
    direction: Direction
    kind: str
    device: str | None = None
    round: int | None = None
    token: str | None = None


def parse_topic(topic: str) -> TopicInfo:
    """Parse a deft topic; raise :class:`TopicError` naming what is wrong for anything else."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != ROOT:
        raise TopicError(f"not a deft topic: {topic!r} (expected {ROOT}/{VERSION_SEGMENT}/<fleet>/...)")
    if parts[1] != VERSION_SEGMENT:
        raise TopicError(
            f"topic {topic!r} is protocol {parts[1]!r}; this kit speaks {VERSION_SEGMENT}: upgrade the older side"
        )
    fleet = check_id(parts[2], "fleet name")
    direction = parts[3]
    rest = parts[4:]
    if direction in ("device", "to"):
        if len(rest) < 2:
            raise TopicError(f"topic {topic!r} lacks a kind after the device id")
        device = check_id(rest[0])
        kind, tail = rest[1], rest[2:]
        kinds = DEVICE_KINDS if direction == "device" else TO_DEVICE_KINDS
    elif direction == "all":
        device = None
        kind, tail = rest[0], rest[1:]
        kinds = ALL_KINDS
    else:
        raise TopicError(f"topic {topic!r}: unknown direction {direction!r} (device, to or all)")
    if kind not in kinds:
        raise TopicError(f"topic {topic!r}: unknown kind {kind!r} for {direction}/ (known: {', '.join(kinds)})")
    if len(tail) != int(kinds[kind]):
        raise TopicError(f"topic {topic!r}: wrong number of segments after {kind!r}")
    round_: int | None = None
    token: str | None = None
    if tail:
        if kind in ("update", "task"):
            if not tail[0].isdigit():
                raise TopicError(f"topic {topic!r}: round {tail[0]!r} is not an integer")
            round_ = int(tail[0])
        elif kind == "prompts":
            device = check_id(tail[0])
        elif kind == "prompt-to":
            token = check_id(tail[0], "peer device id")
        else:
            token = _check_token(tail[0], "bundle id")
    return TopicInfo(fleet=fleet, direction=direction, kind=kind, device=device, round=round_, token=token)  # type: ignore[arg-type]

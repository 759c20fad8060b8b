"""A paho-mqtt 2.x client with the protocol's rules built in.

Why a wrapper: every deft client must (1) speak MQTT 5 where the broker does and 3.1.1 elsewhere,
(2) set TCP_NODELAY (small acks and headers otherwise wait for Nagle), (3) publish with QoS 1 and
wait for the broker's acknowledgement, (4) never hand the broker a packet over its maximum size
(Mosquitto drops the connection, paho reconnects and resends the same packet forever), so payloads
are checked and chunked or refused with a clear error, (5) reconnect with backoff and re-subscribe,
and (6) deliver decoded, verified, reassembled envelopes to the application through thread-safe
queues, keeping paho's network thread free of application code.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field

from device_runtime.protocol.chunking import Reassembler, payload_budget, split
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import (
    AuthRefused,
    ConnectError,
    PayloadTooLarge,
    ProtocolError,
    PublishRefused,
    PublishTimeout,
    SubscribeRefused,
)
from device_runtime.protocol.topics import TopicInfo, parse_topic
from device_runtime.protocol.url import parse_broker_url

log = logging.getLogger("deft.mqtt")

#: used when the broker does not announce a maximum packet size (MQTT 3.1.1, or MQTT 5 without the
#: property) and the caller gives none: small enough for every broker we know of.
DEFAULT_MAX_PACKET_SIZE = 256 * 1024

Protocol = Literal["auto", "5", "3.1.1"]

_AUTH_CODES = {134, 135, 140}  # bad user name or password, not authorized, bad authentication method
_UNSUPPORTED_PROTOCOL = 132


class TLSOptions(BaseModel):
    """TLS for mqtts://: the CA that signed the broker's certificate, and an optional client certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: str | None = Field(None, description="PEM CA bundle (default: the system's)")
    cert_file: str | None = Field(None, description="PEM client certificate (its CN is the MQTT user name)")
    key_file: str | None = Field(None, description="PEM private key of the client certificate")


@dataclass(frozen=True)
class Received:
    """A complete, verified message."""

    topic: str
    envelope: Envelope
    retained: bool
    info: TopicInfo | None


@dataclass(frozen=True)
class BadMessage:
    """A message that failed to decode or verify (truncated, tampered, foreign); ``info`` names the sender's topic."""

    topic: str
    error: ProtocolError
    info: TopicInfo | None


@dataclass
class ClientStats:
    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    connects: int = 0


@dataclass
class _Sub:
    filter: str
    qos: int
    queue: queue.Queue[Received]


@dataclass
class _Waiters:
    """mid -> result, filled by paho callbacks, awaited by callers; abandoned mids are dropped."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    results: dict[int, object] = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)

    def done(self, mid: int, result: object) -> None:
        with self.cond:
            if mid in self.abandoned:
                self.abandoned.discard(mid)
                return
            self.results[mid] = result
            self.cond.notify_all()

    def wait(self, mid: int, timeout: float) -> object | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while mid not in self.results:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.abandoned.add(mid)
                    return None
                self.cond.wait(left)
            return self.results.pop(mid)

    def abandon(self, mid: int) -> None:
        with self.cond:
            if self.results.pop(mid, None) is None:
                self.abandoned.add(mid)


class DeftClient:
    """One MQTT connection for a device or the edge. Use as a context manager, or ``connect()``/``close()``.

    Incoming messages on a subscription go to that subscription's queue (``subscribe`` returns it),
    undecodable ones to ``errors``. ``publish`` blocks until the broker acknowledged every packet.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        protocol: Protocol = "auto",
        max_packet_size: int | None = None,
        tls: TLSOptions | None = None,
        keepalive: int = 30,
        persistent_session: bool = True,
        session_expiry_s: int = 3600,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        will: tuple[str, Envelope] | None = None,
        spool_dir: str | None = None,
        max_transfer_bytes: int = 2 * 1024**3,
        v5_probe_s: float = 2.0,
    ) -> None:
        if protocol not in ("auto", "5", "3.1.1"):
            raise ProtocolError(f"unknown MQTT protocol {protocol!r}: use auto, 5 or 3.1.1")
        self.host, self.port = host, port
        self.client_id = client_id
        self.username, self.password = username, password
        self.requested_protocol: Protocol = protocol
        self._user_max_packet = max_packet_size
        self.tls = tls
        self.keepalive = keepalive
        self.persistent_session = persistent_session
        self.session_expiry_s = session_expiry_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.will = will
        #: with protocol "auto": seconds to wait for an MQTT 5 CONNACK before trying 3.1.1
        self.v5_probe_s = v5_probe_s
        self.protocol_version: str | None = None  # "5" or "3.1.1" once connected
        self.broker_max_packet: int | None = None
        self.stats = ClientStats()
        self.errors: queue.Queue[BadMessage] = queue.Queue()
        self.inbox: queue.Queue[Received] = queue.Queue()  # messages no subscription queue claims
        self.nodelay = False
        self._reassembler = Reassembler(spool_dir=spool_dir, max_transfer_bytes=max_transfer_bytes)
        self._subs: list[_Sub] = []
        self._subs_lock = threading.Lock()
        self._pub = _Waiters()
        self._suback = _Waiters()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        self._socket_opened = False
        self._sock_live = False
        self._sock_opened_at: float | None = None
        self._early_disconnects = 0
        self._paho: mqtt.Client | None = None
        self._closed = False
        self._stopping = False

    @classmethod
    def from_url(cls, url: str, *, client_id: str, **kw: object) -> DeftClient:
        """``mqtt://user:pass@host:port`` or ``mqtts://...``; credentials in ``kw`` win over the URL's."""
        u = parse_broker_url(url)
        kw.setdefault("username", u.username)
        kw.setdefault("password", u.password)
        if u.tls and kw.get("tls") is None:
            kw["tls"] = TLSOptions()
        return cls(u.host, u.port, client_id=client_id, **kw)  # type: ignore[arg-type]

    # ---- connection -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def max_packet_size(self) -> int:
        """The packet limit publishes are checked against: the smaller of the caller's and the broker's."""
        limits = [x for x in (self._user_max_packet, self.broker_max_packet) if x]
        return min(limits) if limits else DEFAULT_MAX_PACKET_SIZE

    def connect(self, timeout: float = 10.0) -> DeftClient:
        """Connect (retrying while the broker is not up yet) or raise AuthRefused / ConnectError."""
        versions = ["5", "3.1.1"] if self.requested_protocol == "auto" else [self.requested_protocol]
        deadline = time.monotonic() + timeout
        for i, version in enumerate(versions):
            last = i == len(versions) - 1
            outcome = self._try_connect(version, max(0.5, deadline - time.monotonic()))
            if outcome == "ok":
                return self
            self._stop_paho()
            if outcome == "auth":
                raise AuthRefused(
                    f"broker {self.host}:{self.port} refused user {self.username!r} ({self._connack}): "
                    "check the device's password or certificate (deft edge broker writes the accounts file)"
                )
            if outcome == "unsupported" and not last:
                log.info("broker %s:%s does not speak MQTT 5; falling back to 3.1.1", self.host, self.port)
                continue
            if outcome == "timeout":
                why = (
                    f"the broker refused the connection ({self._connack})" if self._connack is not None
                    else "no answer" if self._socket_opened else "nothing accepts connections there"
                )
                raise ConnectError(
                    f"could not connect to the MQTT broker at {self.host}:{self.port} within {timeout:.0f}s ({why}): "
                    "is the broker running and the URL right?"
                )
            raise ConnectError(f"broker {self.host}:{self.port} refused the connection: {self._connack}")
        raise ConnectError(f"could not connect to {self.host}:{self.port}")  # pragma: no cover

    def _make_paho(self, version: str) -> mqtt.Client:
        proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
        kw: dict[str, object] = {}
        if proto == mqtt.MQTTv311:
            kw["clean_session"] = not self.persistent_session
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto, **kw)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.tls is not None:
            c.tls_set(ca_certs=self.tls.ca_file, certfile=self.tls.cert_file, keyfile=self.tls.key_file)
        if self.will is not None:
            topic, env = self.will
            c.will_set(topic, env.encode(), qos=1, retain=True)
        c.reconnect_delay_set(self.reconnect_min_s, self.reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(32)
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def _try_connect(self, version: str, timeout: float) -> str:
        self._connack = None
        self._connack_event.clear()
        self._early_disconnects = 0
        self._socket_opened = False
        self._sock_live = False
        self._sock_opened_at = None
        c = self._paho = self._make_paho(version)
        self.protocol_version = version
        props = None
        clean: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if version == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.persistent_session:
                props.SessionExpiryInterval = self.session_expiry_s
                clean = False
            else:
                clean = True
        try:
            c.connect_async(self.host, self.port, self.keepalive, clean_start=clean, properties=props)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        c.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connack_event.wait(0.05):
                rc = self._connack
                if rc is not None and not rc.is_failure:
                    return "ok"
                if rc is not None and rc.value in _AUTH_CODES:
                    return "auth"
                if rc is not None and rc.value == _UNSUPPORTED_PROTOCOL:
                    return "unsupported"
                self._connack_event.clear()
            if version == "5" and self._connack is None and self.requested_protocol == "auto":
                # A 3.1.1-only broker either closes the socket without a CONNACK or (amqtt) misreads the
                # MQTT 5 CONNECT and waits for bytes that never come: either way, try 3.1.1.
                if self._early_disconnects >= 1:
                    return "unsupported"
                if self._sock_opened_at and time.monotonic() - self._sock_opened_at > self.v5_probe_s:
                    return "unsupported"
        return "timeout"

    def _stop_paho(self) -> None:
        c = self._paho
        if c is None:
            return
        self._stopping = True
        with contextlib.suppress(Exception):  # best effort on the way out
            c.disconnect()
        c.loop_stop()
        self._paho = None
        self._connected.clear()
        self._stopping = False

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._closed = True
        self._stop_paho()

    def __enter__(self) -> DeftClient:
        if self._paho is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reassembler(self) -> Reassembler:
        """Incomplete transfers: ``client.reassembler.missing(bundle_hash)`` is what a bundle request asks for."""
        return self._reassembler

    def socket(self) -> socket.socket | None:
        c = self._paho
        return None if c is None else c.socket()  # type: ignore[return-value]

    # ---- paho callbacks (network thread: keep short, never raise) --------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        self._socket_opened = True
        self._sock_live = True
        if self._sock_opened_at is None:
            self._sock_opened_at = time.monotonic()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
            self.nodelay = True
        except (OSError, AttributeError) as exc:  # e.g. a websocket wrapper
            log.warning("could not set TCP_NODELAY: %s", exc)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object) -> None:
        self._connack = rc
        if not rc.is_failure:
            self.stats.connects += 1
            mps = getattr(props, "MaximumPacketSize", None) if props is not None else None
            self.broker_max_packet = int(mps) if mps else None
            with self._subs_lock:
                subs = list(self._subs)
            for s in subs:  # the broker may have lost the session (restart without persistence)
                client.subscribe(s.filter, qos=s.qos)
            self._connected.set()
        self._connack_event.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if not self._connected.is_set() and self._sock_live:
            self._early_disconnects += 1
        self._sock_live = False
        self._connected.clear()
        if not self._closed and not self._stopping:
            log.info("disconnected from %s:%s (%s); reconnecting with backoff", self.host, self.port, rc)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object) -> None:
        self._pub.done(mid, rc)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: list[ReasonCode],
                      props: object) -> None:
        self._suback.done(mid, rcs)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.stats.bytes_down += len(msg.payload)
        self.stats.messages_down += 1
        topic = msg.topic
        try:
            info: TopicInfo | None = parse_topic(topic)
        except ProtocolError:
            info = None
        try:
            env = self._reassembler.add(Envelope.decode(msg.payload))
        except ProtocolError as exc:
            log.warning("bad message on %s: %s", topic, exc)
            self.errors.put(BadMessage(topic, exc, info))
            return
        except Exception as exc:  # noqa: BLE001 - never let a bad payload kill the network thread
            self.errors.put(BadMessage(topic, ProtocolError(f"undecodable message: {exc}"), info))
            return
        if env is None:
            return  # a chunk of an incomplete transfer
        item = Received(topic, env, bool(msg.retain), info)
        with self._subs_lock:
            for s in self._subs:
                if mqtt.topic_matches_sub(s.filter, topic):
                    s.queue.put(item)
                    return
        self.inbox.put(item)

    # ---- subscribe / publish --------------------------------------------------------------------
    def subscribe(
        self, filter_: str, *, qos: int = 1, into: queue.Queue[Received] | None = None, timeout: float = 10.0
    ) -> queue.Queue[Received]:
        """Subscribe and wait for the broker's SUBACK; return the queue matching messages go to."""
        c = self._require()
        q: queue.Queue[Received] = into if into is not None else queue.Queue()
        with self._subs_lock:
            self._subs.append(_Sub(filter_, qos, q))
        rc, mid = c.subscribe(filter_, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectError(f"subscribe to {filter_!r} failed: {mqtt.error_string(rc)} (not connected?)")
        result = self._suback.wait(mid, timeout)
        if result is None:
            raise PublishTimeout(f"the broker did not acknowledge the subscription to {filter_!r} within {timeout}s")
        codes = result  # type: ignore[assignment]
        if any(code.is_failure for code in codes):  # type: ignore[attr-defined]
            with self._subs_lock:
                self._subs = [s for s in self._subs if s.queue is not q or s.filter != filter_]
            raise SubscribeRefused(
                f"the broker refused the subscription to {filter_!r} for user {self.username!r} ({codes[0]}): "  # type: ignore[index]
                "the ACL does not allow reading it"
            )
        return q

    def publish(
        self,
        topic: str,
        message: Envelope | bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        chunk: bool = True,
        chunk_size: int | None = None,
        transfer: str | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> int:
        """Publish ``message``; return the number of MQTT packets sent.

        Envelopes above the packet budget (or ``chunk_size``) are chunked unless ``chunk=False`` or
        ``retain=True`` (a retained topic keeps only its last packet), which raise PayloadTooLarge.
        With ``wait`` the call returns once the broker acknowledged every packet (even across a
        reconnect), and raises PublishRefused if it refused one (MQTT 5 reason codes only).
        """
        packets, mids = self._send(topic, message, qos=qos, retain=retain, chunk=chunk, chunk_size=chunk_size,
                                   transfer=transfer)
        self._await([(topic, mid) for mid in mids], wait=wait, timeout=timeout)
        return packets

    def publish_many(self, items: Sequence[tuple[str, Envelope | bytes]], *, qos: int = 1,
                     timeout: float = 30.0) -> int:
        """Publish several messages back to back, then wait once for all their acknowledgements.

        What a coordinator sends to many devices at once (a round's tasks): one broker round trip for
        the lot instead of one per message. Same checks and errors as :meth:`publish`; returns the
        number of MQTT packets sent."""
        pending: list[tuple[str, int]] = []
        packets = 0
        for topic, message in items:
            n, mids = self._send(topic, message, qos=qos)
            pending.extend((topic, mid) for mid in mids)
            packets += n
        self._await(pending, wait=True, timeout=timeout)
        return packets

    def _send(self, topic: str, message: Envelope | bytes, *, qos: int = 1, retain: bool = False,
              chunk: bool = True, chunk_size: int | None = None, transfer: str | None = None
              ) -> tuple[int, list[int]]:
        """Hand ``message`` (chunked if needed) to paho; return the packet count and the ids to wait for."""
        c = self._require()
        budget = payload_budget(self.max_packet_size, topic)
        limit = min(budget, chunk_size) if chunk_size else budget
        if isinstance(message, Envelope):
            size = message.encoded_size
            if size > limit and (not chunk or retain):
                why = "retained messages cannot be chunked" if retain else "chunking is off"
                raise PayloadTooLarge(
                    f"{message.header.type} message of {size} bytes exceeds the {budget}-byte payload budget of "
                    f"{topic!r} (broker max packet size {self.max_packet_size}) and {why}: raise the broker's "
                    "max_packet_size or shrink the payload (e.g. int8 encoding)"
                )
            parts = [p.encode() for p in split(message, limit, transfer=transfer)]
        else:
            if len(message) > budget:
                raise PayloadTooLarge(
                    f"raw payload of {len(message)} bytes exceeds the {budget}-byte budget of {topic!r} "
                    f"(broker max packet size {self.max_packet_size}); wrap it in an Envelope to have it chunked"
                )
            parts = [bytes(message)]
        mids: list[int] = []
        for payload in parts:
            info = c.publish(topic, payload, qos=qos, retain=retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise ProtocolError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
            self.stats.bytes_up += len(payload)
            self.stats.messages_up += 1
            if qos > 0:
                mids.append(info.mid)
        return len(parts), mids

    def _await(self, pending: list[tuple[str, int]], *, wait: bool, timeout: float) -> None:
        """Wait for the broker's acknowledgement of each (topic, packet id), or abandon them (``wait=False``)."""
        deadline = time.monotonic() + timeout
        for i, (topic, mid) in enumerate(pending):
            if not wait:
                self._pub.abandon(mid)
                continue
            rc = self._pub.wait(mid, max(0.0, deadline - time.monotonic()))
            if rc is None:
                for _, rest in pending[i + 1 :]:
                    self._pub.abandon(rest)
                raise PublishTimeout(
                    f"the broker did not acknowledge a publish to {topic!r} within {timeout:.0f}s "
                    f"({'connected' if self.connected else 'disconnected, still retrying'})"
                )
            if isinstance(rc, ReasonCode) and rc.is_failure:
                for _, rest in pending[i + 1 :]:
                    self._pub.abandon(rest)
                raise PublishRefused(
                    f"the broker refused a publish to {topic!r} by user {self.username!r} ({rc}): "
                    "the ACL lets a device write only under its own device/<id>/ topics"
                )

    def _require(self) -> mqtt.Client:
        if self._paho is None:
            raise ConnectError("the client is not connected: call connect() first")
        return self._paho

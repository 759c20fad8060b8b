"""MQTT broker fixtures (Mosquitto on a random loopback port per session; embedded fallback).

Real brokers only: ``mosquitto_broker`` runs the kit-written Mosquitto config (password file + ACL),
``embedded_broker`` the amqtt fallback. Tests get connected clients from ``mqtt_client``; every
client and broker is stopped at teardown. Mosquitto tests skip with a clear reason when the binary
is absent (``apt install mosquitto``).
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from device_runtime.protocol.topics import Topics

FLEET = "test"


def wait_until(condition: Callable[[], object], timeout: float, what: str = "the condition") -> None:
    """Poll ``condition`` until it is true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.02)
DEVICES = ("dev1", "dev2", "dev3", "dev4", "dev5")
PASSWORDS = {"edge": "edge-secret", **{d: f"{d}-secret" for d in DEVICES}}
#: small, so chunking and oversize tests move kilobytes, not megabytes
TEST_MAX_PACKET = 64 * 1024

__all__ = [
    "DEVICES",
    "FLEET",
    "PASSWORDS",
    "TEST_MAX_PACKET",
    "BrokerUnderTest",
    "embedded_broker",
    "fresh_mosquitto",
    "mosquitto_binary",
    "mosquitto_broker",
    "mqtt_client",
]


@dataclass
class BrokerUnderTest:
    broker: object  # edge_broker.broker.Broker
    fleet: str = FLEET
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet)

    @property
    def kind(self) -> str:
        return self.broker.kind  # type: ignore[attr-defined]


def _accounts():
    from edge_broker.broker import make_accounts

    return make_accounts(list(DEVICES), passwords=PASSWORDS)


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    from edge_broker.broker.mosquitto import find_mosquitto

    binary = find_mosquitto()
    if not binary:
        pytest.skip("mosquitto binary not found (apt install mosquitto): skipping real-Mosquitto tests")
    return binary


def _start_mosquitto(workdir: Path, binary: str, **cfg: object):
    from edge_broker.broker.base import free_port
    from edge_broker.broker.mosquitto import MosquittoBroker, MosquittoConfig

    cfg.setdefault("max_packet_size", TEST_MAX_PACKET)
    config = MosquittoConfig(port=free_port(), fleets=[FLEET], **cfg)  # type: ignore[arg-type]
    b = MosquittoBroker(workdir, _accounts(), config, binary=binary)
    b.write_files()
    return b.start()


@pytest.fixture(scope="session")
def mosquitto_broker(mosquitto_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerUnderTest]:
    """One kit-configured Mosquitto for the session. Do not restart it: use ``fresh_mosquitto``."""
    b = _start_mosquitto(tmp_path_factory.mktemp("mosquitto"), mosquitto_binary)
    yield BrokerUnderTest(b)
    b.stop()


@pytest.fixture
def fresh_mosquitto(mosquitto_binary: str, tmp_path: Path) -> Iterator[Callable[..., BrokerUnderTest]]:
    """Factory for a private Mosquitto a test may restart or kill (~50 ms to start)."""
    started = []

    def make(**cfg: object) -> BrokerUnderTest:
        b = _start_mosquitto(tmp_path / f"mosq{len(started)}", mosquitto_binary, **cfg)
        started.append(b)
        return BrokerUnderTest(b)

    yield make
    for b in started:
        b.stop()


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerUnderTest]:
    from edge_broker.broker.base import free_port
    from edge_broker.broker.embedded import EmbeddedBroker, EmbeddedBrokerWarning

    b = EmbeddedBroker(tmp_path_factory.mktemp("amqtt"), _accounts(), port=free_port(), fleets=[FLEET])
    b.write_files()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedBrokerWarning)
        b.start()
    yield BrokerUnderTest(b)
    b.stop()


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., object]]:
    """``mqtt_client(but, "dev1", **kw)`` -> a connected DeftClient for that account, closed at teardown."""
    from device_runtime.protocol.client import DeftClient

    clients: list[DeftClient] = []

    def make(but: BrokerUnderTest, user: str, *, password: str | None = None, connect: bool = True,
             **kw: object) -> DeftClient:
        # unique ids and clean sessions by default: the session broker must not carry messages between tests
        client_id = str(kw.pop("client_id", f"{user}-{uuid.uuid4().hex[:8]}"))
        kw.setdefault("persistent_session", False)
        opts = {**but.broker.client_options(), **kw}  # type: ignore[attr-defined]
        c = DeftClient(but.broker.host, but.broker.port, client_id=client_id, username=user,  # type: ignore[attr-defined]
                       password=password if password is not None else but.passwords[user], **opts)
        clients.append(c)
        return c.connect(timeout=10) if connect else c

    yield make
    for c in clients:
        c.close()

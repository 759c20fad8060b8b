"""Client behaviour that needs no broker, and the device-side import weight of the protocol."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from device_runtime.protocol.client import DeftClient, TLSOptions
from device_runtime.protocol.errors import ConnectError, ProtocolError
from edge_broker.broker.base import free_port


def test_protocol_imports_stay_light():
    code = ("import sys; import device_runtime.protocol as p; p.DeftClient; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'onnx', 'edge_broker', 'scipy') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_nothing_listening_is_a_clear_error_within_the_timeout():
    c = DeftClient("127.0.0.1", free_port(), client_id="x", username="u", password="p")
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match="could not connect.*nothing accepts connections.*broker running"):
        c.connect(timeout=1.5)
    assert time.monotonic() - t0 < 6
    assert not c.connected


def test_from_url_takes_credentials_and_tls():
    c = DeftClient.from_url("mqtts://pi-1:pw@edge.local:8884", client_id="pi-1")
    assert (c.host, c.port, c.username, c.password) == ("edge.local", 8884, "pi-1", "pw")
    assert isinstance(c.tls, TLSOptions)
    c2 = DeftClient.from_url("mqtt://a:b@h", client_id="a", username="override")
    assert c2.username == "override" and c2.tls is None


def test_publish_before_connect_and_bad_protocol_are_named():
    with pytest.raises(ProtocolError, match="unknown MQTT protocol"):
        DeftClient(client_id="x", protocol="4")  # type: ignore[arg-type]
    with pytest.raises(ConnectError, match="call connect"):
        DeftClient(client_id="x").publish("deft/v1/f/device/x/hello", b"")

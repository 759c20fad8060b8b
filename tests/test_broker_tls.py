"""mqtts:// on the kit-configured Mosquitto: server certificate, and client certificates as identities."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from device_runtime.protocol.client import DeftClient, TLSOptions
from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import ConnectError, PublishRefused
from edge_broker.broker.base import free_port
from edge_broker.broker.mosquitto import TLSListener
from tests._broker import FLEET

pytestmark = pytest.mark.mosquitto


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed: cannot make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=deft test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn, ext in (("server", "127.0.0.1", True), ("dev1", "dev1", False)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", *(["-extfile", "san.ext"] if ext else []), cwd=d)
    return d


def test_client_certificate_is_the_identity_and_the_acl_applies(fresh_mosquitto, pki):
    port = free_port()
    but = fresh_mosquitto(tls=TLSListener(port=port, certfile=str(pki / "server.crt"), keyfile=str(pki / "server.key"),
                                          cafile=str(pki / "ca.crt"), require_client_cert=True))
    t = but.topics
    tls = TLSOptions(ca_file=str(pki / "ca.crt"), cert_file=str(pki / "dev1.crt"), key_file=str(pki / "dev1.key"))
    dev1 = DeftClient.from_url(f"mqtts://127.0.0.1:{port}", client_id="dev1", tls=tls, max_packet_size=64 * 1024)
    dev1.connect(timeout=10)
    try:
        assert dev1.protocol_version == "5"
        assert dev1.publish(t.hello("dev1"), Envelope.json_message("hello", {}, sender="dev1", fleet=FLEET)) == 1
        with pytest.raises(PublishRefused):  # the certificate's CN is the user name the ACL confines
            dev1.publish(t.hello("dev2"), Envelope.json_message("hello", {}, sender="dev1", fleet=FLEET))
    finally:
        dev1.close()
    no_cert = DeftClient.from_url(f"mqtts://127.0.0.1:{port}", client_id="x",
                                  tls=TLSOptions(ca_file=str(pki / "ca.crt")))
    with pytest.raises(ConnectError):
        no_cert.connect(timeout=3)

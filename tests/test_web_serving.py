"""The edge's side of browser devices: the page server's headers and bundle route, its refusals, and the
Mosquitto WebSocket listener in the generated config."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from device_runtime.bundle.archive import pack_bundle
from device_runtime.bundle.load import load_bundle
from edge_broker.broker.base import BrokerError, free_port
from edge_broker.broker.mosquitto import MosquittoConfig, WebSocketListener, render_config
from edge_broker.web import ISOLATION_HEADERS, WebError, serve_page


@pytest.fixture
def site(tmp_path) -> Path:
    (tmp_path / "ort").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>x</title>")
    (tmp_path / "ort" / "a.wasm").write_bytes(b"\0asm")
    return tmp_path


def test_page_is_served_cross_origin_isolated_with_the_bundle(site, tiny_bert_bundle):
    h = load_bundle(tiny_bert_bundle).hash
    server = serve_page("127.0.0.1", free_port(), root=site, bundles={h: tiny_bert_bundle})
    try:
        with urllib.request.urlopen(server.url("127.0.0.1", fleet="x"), timeout=10) as r:
            assert all(r.headers[k] == v for k, v in ISOLATION_HEADERS.items())
        with urllib.request.urlopen(f"{server.url('127.0.0.1')}ort/a.wasm", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/wasm"
        with urllib.request.urlopen(f"{server.url('127.0.0.1')}bundle/{h}.tar", timeout=30) as r:
            assert r.read() == pack_bundle(tiny_bert_bundle)  # the bytes the MQTT transfer would carry
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{server.url('127.0.0.1')}bundle/{'0' * 64}.tar", timeout=10)
    finally:
        server.stop()


def test_unbuilt_page_and_half_a_certificate_are_refused(tmp_path, site):
    with pytest.raises(WebError, match="npm ci && npm run build"):
        serve_page("127.0.0.1", free_port(), root=tmp_path / "nothing")
    with pytest.raises(WebError, match="both --web-cert and --web-key"):
        serve_page("127.0.0.1", free_port(), root=site, certfile=tmp_path / "c.pem")


def test_mosquitto_config_has_the_websocket_listener(tmp_path):
    conf = render_config(MosquittoConfig(port=1883, websockets=WebSocketListener(port=9001)), tmp_path)
    assert "listener 9001 127.0.0.1\nprotocol websockets" in conf and "listener 1883 127.0.0.1" in conf
    wss = render_config(MosquittoConfig(websockets=WebSocketListener(9443, certfile="c.pem", keyfile="k.pem")),
                        tmp_path)
    assert "listener 9443 127.0.0.1\nprotocol websockets\ncertfile c.pem\nkeyfile k.pem" in wss
    with pytest.raises(BrokerError, match="certfile and keyfile"):
        render_config(MosquittoConfig(websockets=WebSocketListener(9443, certfile="c.pem")), tmp_path)

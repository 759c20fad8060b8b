"""Serve the browser device (``device_web/``, built with npm) from the edge: ``deft edge serve --web``.

The page trains with onnxruntime-web, whose WASM threads need ``SharedArrayBuffer``, which browsers
grant only to a cross-origin-isolated page: every response carries ``Cross-Origin-Opener-Policy:
same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp`` (and ``.wasm`` its MIME type, so it
compiles while streaming). A phone on the LAN needs HTTPS for isolation (a plain-http LAN address is
not a secure context): give a certificate and the page is served over TLS (the broker's WebSocket
listener then needs TLS too, ``wss://``).

The page also fetches the round's bundle here (``/bundle/<hash>.tar``, the same deterministic tar the
MQTT transfer carries) and verifies it exactly like a chunked download: every file's sha256 against the
manifest and the bundle hash against the one in the task, which came over the authenticated MQTT
session; so this path needs no trust of its own. Why not MQTT: Mosquitto 2.0.11's WebSocket listener
(Debian 12) delivers bulk data at a crawl (34 of 95 60-KB chunks in 40 s in our probe, where TCP takes
well under a second), so a 93 MB bundle would take many minutes. The page falls back to the chunked
MQTT transfer when the edge does not serve the bundle.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

from device_runtime.errors import DeftError

#: where ``npm run build`` in device_web/ writes the page
WEB_DIST = Path(__file__).resolve().parents[1] / "device_web" / "dist"
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


class WebError(DeftError):
    """The page cannot be served (not built, port taken, bad certificate)."""


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript"}

    def __init__(self, *args: object, bundles: _Bundles, **kw: object) -> None:
        self.bundles = bundles
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = self.path.split("?", 1)[0]
        if path.startswith("/bundle/") and path.endswith(".tar"):
            data = self.bundles.tar(path[len("/bundle/"):-len(".tar")])
            if data is None:
                self.send_error(404, "no such bundle on this edge")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the edge logs rounds, not page fetches


class _Bundles:
    """The bundles the edge serves by hash, packed once (``pack_bundle``: the bytes MQTT would carry)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self._tars: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def tar(self, bundle_hash: str) -> bytes | None:
        if bundle_hash not in self.dirs:
            return None
        with self._lock:
            if bundle_hash not in self._tars:
                from device_runtime.bundle.archive import pack_bundle

                self._tars[bundle_hash] = pack_bundle(self.dirs[bundle_hash])
            return self._tars[bundle_hash]


@dataclass
class WebServer:
    """The page's static files on ``host:port`` (a thread); ``url`` is what to open."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread
    scheme: str

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, host: str, **query: str) -> str:
        q = f"?{urlencode(query)}" if query else ""
        return f"{self.scheme}://{host}:{self.port}/{q}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def serve_page(host: str = "127.0.0.1", port: int = 8080, *, root: Path = WEB_DIST, certfile: Path | None = None,
               keyfile: Path | None = None, bundles: dict[str, Path] | None = None) -> WebServer:
    """Start serving the built page (and ``bundles``, hash -> directory); raise :class:`WebError` naming
    the fix when it cannot."""
    if not (root / "index.html").is_file():
        raise WebError(f"the browser device is not built ({root} has no index.html): run "
                       "`cd device_web && npm ci && npm run build` (or `make web`)")
    if (certfile is None) != (keyfile is None):
        raise WebError("HTTPS needs both --web-cert and --web-key")
    handler = functools.partial(_Handler, directory=str(root), bundles=_Bundles(dict(bundles or {})))
    try:
        httpd = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise WebError(f"cannot serve the page on {host}:{port} ({exc.strerror}); pick another --web-port") from None
    scheme = "http"
    if certfile is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(certfile), str(keyfile))
        except (OSError, ssl.SSLError) as exc:
            httpd.server_close()
            raise WebError(f"cannot load the page's certificate {certfile} / {keyfile} ({exc})") from None
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, name="deft-web", daemon=True)
    thread.start()
    return WebServer(httpd, thread, scheme)


def lan_address() -> str:
    """This machine's address on its LAN (the route to a public address; nothing is sent), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def qr_text(url: str) -> str:
    """The URL as a QR code in terminal text (segno), for a phone's camera."""
    import io

    import segno

    buf = io.StringIO()
    segno.make(url, error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


def announce(page: WebServer, host: str, ws_url: str | None, fleet: str) -> str:
    """What the edge prints: the page's URL (with the broker and fleet filled in) and its QR code."""
    shown = lan_address() if host in ("0.0.0.0", "") else host
    ws = ws_url or f"{'wss' if page.scheme == 'https' else 'ws'}://{shown}:9001"
    url = page.url(shown, broker=ws, fleet=fleet)
    return f"browser devices: open {url}\n{qr_text(url)}"

"""Mosquitto 2, the production broker: the kit writes its config, password file and ACL, and runs it.

The ACL is the protocol's (``device_runtime.protocol.topics.acl_patterns``): a device (user name =
device id) may write only ``deft/v1/<fleet>/device/<its id>/#`` and read only
``deft/v1/<fleet>/to/<its id>/#`` and ``deft/v1/<fleet>/all/#``; the edge account reads and writes
the fleet's whole tree. Anonymous clients are refused. Listeners bind to 127.0.0.1 unless told.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.protocol.topics import DEFAULT_FLEET, ROOT, VERSION_SEGMENT, acl_patterns, check_id
from edge_broker.broker.base import Account, BrokerError, ProcessBroker, wait_port

DEFAULT_MAX_PACKET_SIZE = 8 * 1024 * 1024


def find_mosquitto() -> str | None:
    """The mosquitto binary (PATH, then the Debian location), or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def _find_passwd_tool(binary: str) -> str:
    tool = shutil.which("mosquitto_passwd") or str(Path(binary).with_name("mosquitto_passwd"))
    if not os.access(tool, os.X_OK):
        for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd"):
            if os.access(p, os.X_OK):
                return p
        raise BrokerError("mosquitto_passwd not found: install the mosquitto package (apt install mosquitto)")
    return tool


@dataclass(frozen=True)
class TLSListener:
    """An mqtts:// listener. With ``require_client_cert`` the certificate's CN becomes the user name."""

    port: int
    #: PEM server certificate and its private key
    certfile: str
    keyfile: str
    #: PEM CA bundle that client certificates are checked against (with ``require_client_cert``)
    cafile: str | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class WebSocketListener:
    """An MQTT-over-WebSockets listener for browser devices (``device_web/``): the same accounts and
    ACL as every other listener. With ``certfile``/``keyfile`` it is ``wss://`` (what a phone page
    served over HTTPS must use: browsers refuse ``ws://`` from a secure page)."""

    port: int
    host: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


@dataclass
class MosquittoConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    fleets: list[str] = field(default_factory=lambda: [DEFAULT_FLEET])
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    #: per-client queue while offline / in flight; bounded so a dead device cannot eat the edge's memory
    max_queued_messages: int = 1000
    max_queued_bytes: int = 256 * 1024 * 1024
    max_inflight_messages: int = 32
    persistence: bool = True
    autosave_interval_s: int = 30
    tls: TLSListener | None = None
    #: also open the plain TCP listener when TLS is on
    plain_listener: bool = True
    #: MQTT over WebSockets for browser devices (None: no such listener)
    websockets: WebSocketListener | None = None


def render_acl(accounts: list[Account], fleets: list[str]) -> str:
    lines = ["# written by deftkit: devices write only their own topics, read only what is addressed to them or all"]
    for a in accounts:
        if a.role == "edge":
            lines.append(f"user {a.username}")
            lines += [f"topic readwrite {ROOT}/{VERSION_SEGMENT}/{check_id(f, 'fleet name')}/#" for f in fleets]
            lines.append("")
    for f in fleets:
        pats = acl_patterns(f, "%u")
        lines += [f"pattern write {t}" for t in pats["write"]]
        lines += [f"pattern read {t}" for t in pats["read"]]
    return "\n".join(lines) + "\n"


def render_config(cfg: MosquittoConfig, workdir: Path) -> str:
    """The mosquitto.conf text. Global options first: Mosquitto applies them to every listener."""
    lines = [
        "# written by deftkit (deft edge broker); edit the kit's options, not this file",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {workdir / 'passwd'}",
        f"acl_file {workdir / 'acl'}",
        "set_tcp_nodelay true",
        f"max_packet_size {cfg.max_packet_size}",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_queued_bytes {cfg.max_queued_bytes}",
        f"max_inflight_messages {cfg.max_inflight_messages}",
        f"persistence {'true' if cfg.persistence else 'false'}",
        f"persistence_location {workdir / 'data'}/",
        f"autosave_interval {cfg.autosave_interval_s}",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if os.geteuid() == 0:
        lines.append(f"user {getpass.getuser()}")  # keep our own identity: the files are ours
    if cfg.plain_listener:
        lines += ["", f"listener {cfg.port} {cfg.host}", "protocol mqtt"]
    if cfg.tls is not None:
        t = cfg.tls
        lines += ["", f"listener {t.port} {cfg.host}", "protocol mqtt", f"certfile {t.certfile}",
                  f"keyfile {t.keyfile}"]
        if t.cafile:
            lines.append(f"cafile {t.cafile}")
        if t.require_client_cert:
            if not t.cafile:
                raise BrokerError("client certificates need the CA that signed them: give cafile")
            lines += ["require_certificate true", "use_identity_as_username true"]
    if cfg.websockets is not None:
        w = cfg.websockets
        lines += ["", f"listener {w.port} {w.host or cfg.host}", "protocol websockets"]
        if (w.certfile is None) != (w.keyfile is None):
            raise BrokerError("a wss:// listener needs both certfile and keyfile")
        if w.certfile:
            lines += [f"certfile {w.certfile}", f"keyfile {w.keyfile}"]
    return "\n".join(lines) + "\n"


class MosquittoBroker(ProcessBroker):
    """Run Mosquitto with a kit-written config in ``workdir``. ``start()`` returns once it accepts connections."""

    kind = "mosquitto"
    label = "mosquitto"

    def __init__(self, workdir: str | Path, accounts: list[Account], config: MosquittoConfig | None = None,
                 binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.accounts = accounts
        self.config = config or MosquittoConfig()
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise BrokerError(
                "mosquitto not found: install it (apt install mosquitto) or use the embedded broker (--kind embedded)"
            )
        self.host = self.config.host
        self.port = self.config.port if self.config.plain_listener else self.config.tls.port  # type: ignore[union-attr]
        self.tls = not self.config.plain_listener
        self.max_packet_size = self.config.max_packet_size
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    # ---- files ----------------------------------------------------------------------------------
    def write_files(self) -> Path:
        """Write passwd (hashed with mosquitto_passwd -U), acl and mosquitto.conf; return the config path."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        if not any(a.role == "edge" for a in self.accounts):
            raise BrokerError("no edge account: the coordinator needs one (make_accounts adds it)")
        passwd = self.workdir / "passwd"
        fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{a.username}:{a.password}\n" for a in self.accounts)
        tool = _find_passwd_tool(self.binary)  # type: ignore[arg-type]
        r = subprocess.run([tool, "-U", str(passwd)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise BrokerError(f"mosquitto_passwd -U failed: {(r.stderr or r.stdout).strip()}")
        (self.workdir / "acl").write_text(render_acl(self.accounts, self.config.fleets))
        self.conf_path.write_text(render_config(self.config, self.workdir))
        return self.conf_path

    # ---- process --------------------------------------------------------------------------------
    def _spawn(self) -> int:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],  # type: ignore[list-item]
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        return log_offset

    def _start_failure(self, log_offset: int) -> str:
        err = b""
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr is not None:
            err = self._proc.stderr.read()
        tail = self._log_tail(log_offset) or err.decode(errors="replace").strip()
        hint = " (is the port in use? pick another with --port)" if "in use" in tail else ""
        return f"{hint}: {tail[-400:] or 'no log output'}"

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def start(self, timeout: float | None = None) -> MosquittoBroker:
        """Start; with a WebSocket listener, return once that accepts connections too (it opens after TCP)."""
        super().start(timeout)
        w = self.config.websockets
        if w is not None and not wait_port(w.host or self.host, w.port, 10.0):
            self.stop()
            raise BrokerError(f"mosquitto's WebSocket listener on port {w.port} did not open; see {self.log_path}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file), then SIGKILL if it hangs; wait for the port."""
        if self._proc is None:
            return
        super().stop(timeout)
        self._wait_port_free()

    def _wait_port_free(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and wait_port(self.host, self.port, 0.01):
            time.sleep(0.02)



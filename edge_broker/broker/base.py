"""What every broker the kit runs or connects to offers, and the accounts it is provisioned with."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from device_runtime.atomic import atomic_write_text
from device_runtime.errors import DeftError
from device_runtime.protocol.topics import check_id


class BrokerError(DeftError):
    """A broker could not be configured, started or reached. The CLI prints ``error: <message>``, exit 2."""


Role = Literal["device", "edge"]


@dataclass(frozen=True)
class Account:
    """One MQTT login. Devices log in with their device id as user name (the ACL keys on it)."""

    username: str
    password: str
    role: Role = "device"

    def __post_init__(self) -> None:
        check_id(self.username, "account name")
        if not self.password or any(c in self.password for c in ":\n\r"):
            raise BrokerError(f"password of {self.username!r} is empty or contains ':' or a newline: choose another")


def make_accounts(devices: list[str], edge_user: str = "edge", passwords: dict[str,
                                                                               str] | None = None) -> list[Account]:
    """An edge account and one account per device, with random passwords unless given."""
    passwords = passwords or {}
    names = [edge_user, *devices]
    if len(set(names)) != len(names):
        raise BrokerError(f"duplicate account names in {names}: every device needs its own id")
    return [
        Account(n, passwords.get(n) or secrets.token_urlsafe(18), "edge" if n == edge_user else "device")
        for n in names
    ]


def save_accounts(path: str | Path, accounts: list[Account]) -> Path:
    """Write the accounts (with passwords) readable by the owner only: this is how devices are provisioned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps({"accounts": [asdict(a) for a in accounts]}, indent=2), mode=0o600)


def load_accounts(path: str | Path) -> list[Account]:
    try:
        raw = json.loads(Path(path).read_text())
        return [Account(**a) for a in raw["accounts"]]
    except FileNotFoundError:
        raise BrokerError(f"accounts file {path} not found: create it with `deft edge broker --devices ...`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(f"accounts file {path} is malformed ({exc}): expected "
                          f"{{\"accounts\": [{{username, password, role}}]}}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float, alive: callable[[], bool] | None = None) -> bool:
    """Wait until ``host:port`` accepts TCP connections; False on timeout or when ``alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        if alive is not None and not alive():
            return False
        time.sleep(0.02)
    return False


def end_process(p: subprocess.Popen | None, timeout: float = 10.0, *, graceful: bool = True) -> None:
    """Stop a broker process: SIGTERM and wait ``timeout`` s (``graceful``), SIGKILL if it is still up;
    always reaped, its stderr pipe closed. A process that already exited is only reaped."""
    if p is None:
        return
    if p.poll() is None:
        if graceful:
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        if p.poll() is None:
            p.kill()
            p.wait(5)
    if p.stderr is not None:
        p.stderr.close()


class Broker(ABC):
    """A broker the kit started (Mosquitto, embedded amqtt) or only connects to (external)."""

    kind: str = "broker"
    host: str
    port: int
    #: the largest MQTT packet the broker accepts (clients check payloads against it); None: unknown
    max_packet_size: int | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def client_options(self) -> dict[str, object]:
        """Keyword arguments for :class:`DeftClient` that this broker needs (protocol, packet limit)."""
        return {"max_packet_size": self.max_packet_size} if self.max_packet_size else {}

    @abstractmethod
    def stop(self) -> None:
        """Stop the broker (no-op for an external one)."""

    @abstractmethod
    def restart(self) -> None:
        """Stop and start again on the same address, keeping persisted state."""

    def is_running(self) -> bool:
        return port_open(self.host, self.port)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessBroker(Broker):
    """A broker the kit runs as a child process from files it writes (Mosquitto, embedded amqtt):
    start / stop / kill / restart are the same for both; subclasses say how to write the files,
    spawn the process and explain a failed start."""

    #: how messages name the broker ("mosquitto", "the embedded broker")
    label: str = "the broker"
    #: seconds ``start`` waits for the port by default
    start_timeout: float = 10.0
    conf_path: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def write_files(self) -> Path:
        """Write the broker's config (accounts, ACL); return the config path."""

    @abstractmethod
    def _spawn(self) -> Any:
        """Start the process (``self._proc``); return what :meth:`_start_failure` needs."""

    @abstractmethod
    def _start_failure(self, ctx: Any) -> str:
        """Why the process did not come up (its log or stderr), for the error message."""

    def start(self, timeout: float | None = None) -> ProcessBroker:
        """Start the process (writing the files first if needed); return once it accepts connections."""
        if self.is_running():
            return self
        if not self.conf_path.exists():
            self.write_files()
        if port_open(self.host, self.port):
            raise BrokerError(
                f"{self.label} did not start on {self.host}:{self.port}: the port is already in use "
                "(another broker?); pick another with --port, or 0 for any free port"
            )
        ctx = self._spawn()
        if not wait_port(self.host, self.port, self.start_timeout if timeout is None else timeout,
                         alive=self.is_running):
            why = self._start_failure(ctx)
            self.kill()
            raise BrokerError(f"{self.label} did not start on {self.host}:{self.port}{why}")
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a broker saves its persistence file), then SIGKILL if it hangs."""
        end_process(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, for tests. Messages not yet saved are lost, as on a real crash."""
        end_process(self._proc, graceful=False)
        self._proc = None

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.start(timeout)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

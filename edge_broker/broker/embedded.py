"""The embedded broker (amqtt): zero-install fallback when Mosquitto is absent.

Runs amqtt in a child process (``python -m edge_broker.broker.embedded CONFIG.json``) so its asyncio
loop never competes with the coordinator for the GIL and it can be stopped and restarted like
Mosquitto. Limits, said out loud whenever it starts (:data:`LIMITS`): MQTT 3.1.1 only (clients fall
back automatically), no persistence (queued and retained messages are lost when it stops or crashes),
no packet size limit of its own (clients still chunk at :data:`EMBEDDED_MAX_PACKET_SIZE`), slower.
Accounts come from a password file (argon2 hashes); the same ACL as Mosquitto is written as amqtt's
per-user topic lists. Bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from device_runtime.protocol.topics import DEFAULT_FLEET, ROOT, VERSION_SEGMENT, acl_patterns
from edge_broker.broker.base import Account, BrokerError, ProcessBroker

log = logging.getLogger("deft.broker")

LIMITS = (
    "embedded amqtt broker: MQTT 3.1.1 only, no persistence (queued and retained messages are lost if it "
    "stops or crashes), slower than Mosquitto; install mosquitto for production (apt install mosquitto)"
)
#: clients chunk above this on the embedded broker (it has no limit of its own to announce)
EMBEDDED_MAX_PACKET_SIZE = 8 * 1024 * 1024


class EmbeddedBrokerWarning(UserWarning):
    """Issued when the embedded broker starts: it is a fallback, not a production broker."""


def amqtt_config(accounts: list[Account], fleets: list[str], host: str, port: int, passwd_file: Path) -> dict:
    """amqtt's broker config: file auth + per-user publish/subscribe ACL equal to Mosquitto's."""
    publish: dict[str, list[str]] = {}
    subscribe: dict[str, list[str]] = {}
    for a in accounts:
        if a.role == "edge":
            topics = [f"{ROOT}/{VERSION_SEGMENT}/{f}/#" for f in fleets]
            publish[a.username] = topics
            subscribe[a.username] = topics
        else:
            pats = [acl_patterns(f, a.username) for f in fleets]
            publish[a.username] = [t for p in pats for t in p["write"]]
            subscribe[a.username] = [t for p in pats for t in p["read"]]
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwd_file)},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"publish_acl": publish, "acl": subscribe},
        },
    }


def write_password_file(path: Path, accounts: list[Account]) -> None:
    """``user:argon2-hash`` lines, the format amqtt's FileAuthPlugin reads."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = PasswordHash((Argon2Hasher(),))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{a.username}:{hasher.hash(a.password)}\n" for a in accounts)


class EmbeddedBroker(ProcessBroker):
    kind = "embedded"
    label = "the embedded broker"
    start_timeout = 20.0
    limits = LIMITS

    def __init__(self, workdir: str | Path, accounts: list[Account], *, host: str = "127.0.0.1", port: int = 1883,
                 fleets: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.accounts = accounts
        self.host, self.port = host, port
        self.fleets = fleets or [DEFAULT_FLEET]
        self.max_packet_size = EMBEDDED_MAX_PACKET_SIZE
        self.conf_path = self.workdir / "amqtt.json"
        self.log_path = self.workdir / "amqtt.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def client_options(self) -> dict[str, object]:
        return {"protocol": "3.1.1", "max_packet_size": self.max_packet_size}

    def write_files(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        passwd = self.workdir / "passwd.argon2"
        write_password_file(passwd, self.accounts)
        cfg = amqtt_config(self.accounts, self.fleets, self.host, self.port, passwd)
        self.conf_path.write_text(json.dumps(cfg, indent=2))
        return self.conf_path

    def _spawn(self) -> None:
        warnings.warn(LIMITS, EmbeddedBrokerWarning, stacklevel=3)
        log.warning(LIMITS)
        with open(self.log_path, "ab") as logf:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "edge_broker.broker.embedded", str(self.conf_path)],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _start_failure(self, ctx: None) -> str:
        tail = self.log_path.read_text(errors="replace")[-400:] if self.log_path.exists() else ""
        return f": {tail.strip() or 'no output'}"


def _serve(config_path: str) -> None:
    """Child-process entry: run amqtt until SIGTERM/SIGINT."""
    import asyncio

    from amqtt.broker import Broker as AmqttBroker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = json.loads(Path(config_path).read_text())

    async def main() -> None:
        broker = AmqttBroker(cfg)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m edge_broker.broker.embedded CONFIG.json")
    try:
        _serve(sys.argv[1])
    except BrokerError as exc:
        raise SystemExit(f"error: {exc}") from None

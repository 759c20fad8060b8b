"""A real OpenSSH server on a random 127.0.0.1 port, run as the current user, as a stand-in "board".

Its own host key and authorized key live in a temporary directory; password and keyboard logins are
off. Running as root (CI) sshd needs its privilege-separation directory (/run/sshd), which the
fixture creates if it is missing. Skips when Debian's openssh-server is not installed.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SSHServer", "start_sshd"]


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    private_key: Path
    public_key: Path
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)


def start_sshd(root: Path, private_key: Path, public_key: Path, timeout: float = 20.0) -> SSHServer:
    from edge_broker.broker.base import free_port, port_open

    sshd = _sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server/client not installed (apt install openssh-server)")
    root.mkdir(parents=True, exist_ok=True)
    host_key = root / "ssh_host_ed25519_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True, timeout=30
    )
    auth = root / "authorized_keys"
    auth.write_text(public_key.read_text())
    auth.chmod(0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(
            mode=0o755, exist_ok=True
        )  # sshd's compiled-in privilege-separation directory
    port = free_port()
    cfg = root / "sshd_config"
    cfg.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {auth}",
                f"PidFile {root / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "MaxStartups 50",
                "MaxSessions 50",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    log = root / "sshd.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"sshd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return SSHServer("127.0.0.1", port, getpass.getuser(), private_key, public_key, proc, log)

"""The testbed inventory: one TOML fleet file naming every board, the broker and the SSH key.

Every ``deft hw flash|provision|status`` command starts from it, so it is checked in full before any
of them writes anything: boards against the built-in profiles, ids against the broker's accounts
file (``deft edge broker`` writes it), key files on disk. Relative paths are relative to the file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from device_runtime.errors import existing_file
from device_runtime.protocol.topics import check_id

OS = Literal["rpios-bookworm", "rpios-trixie", "jetpack-6", "debian"]

#: which OS a board family can run (JetPack 6 supports only the Orin modules)
_OS_FOR_BOARD: dict[str, tuple[str, ...]] = {
    "rpi": ("rpios-bookworm", "rpios-trixie", "debian"),
    "jetson-orin": ("jetpack-6",),
    "jetson-agx-orin": ("jetpack-6",),
    "laptop": ("debian",),
}
#: Python on each OS as shipped (the device venv is built for it) and the CPU architecture of the board
OS_PYTHON = {"rpios-bookworm": "3.11", "rpios-trixie": "3.13", "jetpack-6": "3.10", "debian": "3.11"}


class InventoryError(ValueError):
    """The fleet file is missing, malformed or inconsistent; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerRef(_Strict):
    url: str = Field(description="mqtt://host:port or mqtts://host:port as the devices reach it")
    accounts: Path = Field(description="accounts JSON written by `deft edge broker`")
    ca: Path | None = Field(None, description="CA certificate (PEM) that signed the broker's, for mqtts://")


class SSHKey(_Strict):
    private_key: Path
    public_key: Path | None = None  # default: private_key + ".pub"


class Network(_Strict):
    """What a freshly flashed board joins. No Wi-Fi: Ethernet with DHCP."""

    country: str = Field("GB", pattern=r"^[A-Z]{2}$", description="Wi-Fi regulatory domain (ISO 3166 code)")
    wifi_ssid: str | None = None
    wifi_password: str | None = None
    timezone: str = "Etc/UTC"


class Device(_Strict):
    id: str
    board: str
    os: OS
    host: str
    user: str = "deft"
    port: int = Field(22, ge=1, le=65535)
    hostname: str | None = None  # default: the id
    data: str | None = Field(None, description="training data path on the device (default: in its workdir)")
    data_file: Path | None = Field(None, description="a local file provisioning copies to `data`")
    python: str = "/usr/bin/python3"
    prefix: str = Field("", description="install under this directory instead of / (a board without root)")
    systemd: bool = Field(True, description="enable and start the unit with systemctl")
    agent_args: list[str] = Field(default_factory=list, description="extra `deft device run` arguments")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        try:
            return check_id(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?", v):
            raise ValueError(f"invalid hostname {v!r}: letters, digits and '-' only (RFC 1123)")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v):
            raise ValueError(f"invalid user name {v!r}: lower-case letters, digits, '_' and '-'")
        return v

    @property
    def host_name(self) -> str:
        return self.hostname or re.sub(r"[^a-zA-Z0-9-]", "-", self.id)

    def path(self, system_path: str) -> str:
        """``system_path`` (absolute) under this device's prefix."""
        return f"{self.prefix.rstrip('/')}{system_path}"

    @property
    def venv(self) -> str:
        return self.path("/opt/deft/venv")

    @property
    def config_dir(self) -> str:
        return self.path(f"/etc/deft/{self.id}")

    @property
    def workdir(self) -> str:
        return self.path(f"/var/lib/deft/{self.id}")

    @property
    def data_path(self) -> str:
        return self.data or f"{self.workdir}/data.tsv"


class FleetFile(_Strict):
    fleet: str = "default"
    broker: BrokerRef
    ssh: SSHKey
    network: Network = Network()
    devices: list[Device] = Field(min_length=1)


class Inventory(BaseModel):
    """A validated fleet file with its paths resolved and the broker passwords of its devices."""

    model_config = ConfigDict(frozen=True)

    path: Path
    spec: FleetFile
    passwords: dict[str, str]  # device id -> MQTT password (from the accounts file)
    public_key: str

    @property
    def fleet(self) -> str:
        return self.spec.fleet

    @property
    def devices(self) -> list[Device]:
        return self.spec.devices

    def device(self, device_id: str) -> Device:
        for d in self.spec.devices:
            if d.id == device_id:
                return d
        raise InventoryError(
            f"no device {device_id!r} in {self.path}; its devices are {', '.join(d.id for d in self.devices)}"
        )

    def select(self, limit: str | None) -> list[Device]:
        """The devices named by ``--limit`` (comma-separated ids), or all."""
        if not limit:
            return list(self.devices)
        return [self.device(x.strip()) for x in limit.split(",") if x.strip()]

    def summary(self) -> dict:
        """The JSON `deft hw inventory --json` prints (no passwords)."""
        s = self.spec
        return {
            "path": str(self.path),
            "fleet": s.fleet,
            "broker": {
                "url": s.broker.url,
                "accounts": str(s.broker.accounts),
                "ca": str(s.broker.ca) if s.broker.ca else None,
            },
            "ssh": {"private_key": str(s.ssh.private_key), "public_key": str(_pub_path(s.ssh))},
            "devices": [{**d.model_dump(mode="json"), "hostname": d.host_name} for d in s.devices],
        }


def _pub_path(ssh: SSHKey) -> Path:
    return ssh.public_key or ssh.private_key.with_name(ssh.private_key.name + ".pub")


def _family(board: str) -> str:
    for fam in sorted(_OS_FOR_BOARD, key=len, reverse=True):
        if board.startswith(fam):
            return fam
    return ""


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in e["loc"]).replace(".[", "[")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"missing field '{loc}'"
    if e["type"] == "extra_forbidden":
        return f"unknown field '{loc}' (check the spelling)"
    return f"{loc}: {msg}"


def load_inventory(path: str | Path) -> Inventory:
    """Read and check a fleet file; :class:`InventoryError` (one line) on the first problem."""
    from edge_broker.broker.base import BrokerError, load_accounts
    from hardware.profiles import builtin_profiles

    p = existing_file(path, InventoryError,
                      "fleet file {path} not found: write one, or an example with `deft hw inventory --example DIR`")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InventoryError(f"fleet file {p} is not valid TOML: {exc}") from None
    try:
        spec = FleetFile.model_validate(raw)
        check_id(spec.fleet, "fleet name")
    except ValidationError as exc:
        raise InventoryError(f"fleet file {p}: {_first_error(exc)}") from None
    except ValueError as exc:
        raise InventoryError(f"fleet file {p}: {exc}") from None

    base = p.resolve().parent

    def rel(x: Path | None) -> Path | None:
        return None if x is None else (x if x.is_absolute() else base / x)

    spec = spec.model_copy(
        update={
            "broker": spec.broker.model_copy(
                update={"accounts": rel(spec.broker.accounts), "ca": rel(spec.broker.ca)}
            ),
            "ssh": SSHKey(private_key=rel(spec.ssh.private_key), public_key=rel(spec.ssh.public_key)),  # type: ignore[arg-type]
            "devices": [d.model_copy(update={"data_file": rel(d.data_file)}) for d in spec.devices],
        }
    )

    seen: set[str] = set()
    boards = builtin_profiles()
    for i, d in enumerate(spec.devices):
        where = f"fleet file {p}: devices[{i}] ({d.id})"
        if d.id in seen:
            raise InventoryError(f"{where}: duplicate device id {d.id!r}; every board needs its own id")
        seen.add(d.id)
        if d.board not in boards:
            raise InventoryError(f"{where}: unknown board {d.board!r}; known: {', '.join(boards)}")
        allowed = _OS_FOR_BOARD.get(_family(d.board), ())
        if d.os not in allowed:
            raise InventoryError(
                f"{where}: board {d.board} cannot run os {d.os!r}; "
                f"use one of {', '.join(allowed) or '(none)'}"
            )
        if d.data_file is not None and not d.data_file.is_file():
            raise InventoryError(f"{where}: data_file {d.data_file} not found")
        if d.prefix and not d.prefix.startswith("/"):
            raise InventoryError(f"{where}: prefix {d.prefix!r} must be an absolute path on the device")

    for what, f in (("ssh.private_key", spec.ssh.private_key), ("ssh.public_key", _pub_path(spec.ssh))):
        if not f.is_file():
            raise InventoryError(
                f"fleet file {p}: {what} {f} not found; "
                f"create a key pair with ssh-keygen -t ed25519 -f {spec.ssh.private_key}"
            )
    public_key = _pub_path(spec.ssh).read_text().strip()
    if not re.match(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-\S+|sk-\S+) [A-Za-z0-9+/=]+", public_key):
        raise InventoryError(f"fleet file {p}: {_pub_path(spec.ssh)} is not an OpenSSH public key")
    if spec.broker.ca is not None and not spec.broker.ca.is_file():
        raise InventoryError(f"fleet file {p}: broker.ca {spec.broker.ca} not found")
    from device_runtime.protocol.errors import ProtocolError
    from device_runtime.protocol.url import parse_broker_url

    try:
        parse_broker_url(spec.broker.url)
    except (ProtocolError, ValueError) as exc:
        raise InventoryError(f"fleet file {p}: broker.url: {exc}") from None
    try:
        accounts = {a.username: a for a in load_accounts(spec.broker.accounts)}
    except BrokerError as exc:
        raise InventoryError(f"fleet file {p}: broker.accounts: {exc}") from None
    missing = [d.id for d in spec.devices if d.id not in accounts or accounts[d.id].role != "device"]
    if missing:
        raise InventoryError(
            f"fleet file {p}: device {missing[0]!r} has no broker account in {spec.broker.accounts}; "
            f"add it with `deft edge broker --accounts {spec.broker.accounts} --devices {','.join(missing)}`"
        )
    return Inventory(
        path=p.resolve(),
        spec=spec,
        passwords={d.id: accounts[d.id].password for d in spec.devices},
        public_key=public_key,
    )


EXAMPLE_TOML = """\
# deftkit testbed: one file for `deft hw flash | provision | status`.
# Relative paths are relative to this file.
fleet = "lab"

[broker]
url = "mqtt://192.168.50.1:1883"     # the edge as the boards reach it
accounts = "broker/accounts.json"   # written by `deft edge broker --devices ...`
# ca = "ca.crt"                     # with an mqtts:// url: the CA that signed the broker's certificate

[ssh]
private_key = "ssh/id_ed25519"      # its .pub goes onto every board

[network]
country = "GB"
# wifi_ssid = "testbed"             # omit for Ethernet (DHCP)
# wifi_password = "..."

[[devices]]
id = "pi5-bookworm"
board = "rpi5-8gb"
os = "rpios-bookworm"
host = "192.168.50.11"

[[devices]]
id = "pi4-trixie"
board = "rpi4-8gb"
os = "rpios-trixie"
host = "192.168.50.12"

[[devices]]
id = "orin-nano"
board = "jetson-orin-nano-8gb"
os = "jetpack-6"
host = "192.168.50.13"
"""


def write_example(directory: str | Path) -> Path:
    """A complete example testbed in ``directory``: fleet.toml, an SSH key pair, broker accounts."""
    import shutil
    import subprocess

    from edge_broker.broker.base import make_accounts, save_accounts

    d = Path(directory)
    fleet = d / "fleet.toml"
    if fleet.exists():
        raise InventoryError(f"{fleet} already exists; pick an empty directory")
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise InventoryError("ssh-keygen not found: install openssh-client (apt install openssh-client)")
    (d / "ssh").mkdir(parents=True, exist_ok=True)
    key = d / "ssh" / "id_ed25519"
    if not key.exists():
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "deftkit-testbed", "-f", str(key)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    ids = re.findall(r'^id = "([^"]+)"', EXAMPLE_TOML, flags=re.MULTILINE)
    save_accounts(d / "broker" / "accounts.json", make_accounts(ids))
    fleet.write_text(EXAMPLE_TOML)
    load_inventory(fleet)  # the example must pass its own checks
    return fleet

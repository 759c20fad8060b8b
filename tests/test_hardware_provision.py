"""``deft hw provision`` and ``deft hw status`` against a real sshd "board" on 127.0.0.1.

Real parts: OpenSSH server, Ansible (ansible-core via ansible-runner), pip installing the wheel set
into a fresh venv on the "board", the installed unit's ExecStart run as systemd would run it (its
EnvironmentFile, %i and ${VAR} expansion) joining a round on a real Mosquitto with a real coordinator.
Stand-ins: the board is this machine, its system paths live under a prefix directory, and systemd
does not manage the service (no systemd in the test container); ``systemd-analyze verify`` checks
the unit where it is installed.

Wheels are cached in ~/.cache/deftkit/test-wheels between runs (dependencies resolved once).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_broker.broker.base import free_port, make_accounts, save_accounts
from tests._fleet import running_fleet, write_shard
from tests._models import REPO
from tests._sshd import start_sshd

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

CACHE = Path.home() / ".cache" / "deftkit" / "test-wheels"


def deft(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "deftkit.cli", "hw", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def last_json(r: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1])


def exec_start(unit: str, instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd runs it: %i is the instance, ${VAR} one word, $VAR split on spaces."""
    (line,) = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    out: list[str] = []
    for word in shlex.split(line.removeprefix("ExecStart=").replace("%i", instance)):
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            out += shlex.split(env.get(word[1:], ""))
        else:
            out.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return out


def test_provision_a_board_over_ssh_then_its_service_joins_a_round(
    fresh_mosquitto, tiny_bert_bundle, tmp_path
):
    from hardware.inventory import load_inventory
    from hardware.render import parse_env_file
    from hardware.status import fleet_status

    but = fresh_mosquitto()
    testbed = tmp_path / "testbed"
    (testbed / "ssh").mkdir(parents=True)
    key = testbed / "ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    sshd = start_sshd(tmp_path / "sshd", key, key.with_suffix(".pub"))
    try:
        board = tmp_path / "board"
        # The board's Python: Debian 12's /usr/bin/python3 (3.11.2) lacks tarfile's extraction filters,
        # which `deft device run` needs to unpack a bundle (reported); use the interpreter running the tests.
        python = getattr(sys, "_base_executable", sys.executable)
        save_accounts(testbed / "accounts.json", make_accounts(["dev1", "dev2"], passwords=but.passwords))
        shard = write_shard(testbed / "dev1.tsv", 0, 64)
        fleet_toml = testbed / "fleet.toml"
        fleet_toml.write_text(f"""
fleet = "{but.fleet}"
[broker]
url = "mqtt://127.0.0.1:{but.broker.port}"
accounts = "accounts.json"
[ssh]
private_key = "ssh/id_ed25519"

[[devices]]
id = "dev1"
board = "laptop-x86"
os = "debian"
host = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
prefix = "{board}"
systemd = false
python = "{python}"
data_file = "{shard.name}"
agent_args = ["--threads", "1", "--idle-exit", "120"]

# a second board that is switched off: --limit leaves it out
[[devices]]
id = "dev2"
board = "laptop-x86"
os = "debian"
host = "127.0.0.1"
port = {free_port()}
user = "{sshd.user}"
prefix = "{tmp_path / "board2"}"
systemd = false
python = "{python}"
""")
        cache = ["--cache", str(CACHE)]
        t0 = time.monotonic()
        r = deft("provision", "-i", str(fleet_toml), "--limit", "dev1", "--json", *cache)
        first = last_json(r)
        first_s = time.monotonic() - t0
        assert r.returncode == 0 and first["ok"] and first["hosts"]["dev1"]["changed"] > 0, r.stderr
        assert list(first["hosts"]) == ["dev1"]
        print(f"first provision: {first_s:.0f}s")

        # what the board now holds
        conf = board / "etc" / "deft" / "dev1"
        env_file = conf / "env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and stat.S_IMODE(conf.stat().st_mode) == 0o700
        env = parse_env_file(env_file.read_text())
        assert env["DEFT_PASSWORD"] == but.passwords["dev1"] and env["DEFT_FLEET"] == but.fleet
        assert Path(env["DEFT_DATA"]).read_text() == shard.read_text()
        unit_path = board / "etc" / "systemd" / "system" / "deft-device@.service"
        unit = unit_path.read_text()
        assert "Restart=on-failure" in unit and f"EnvironmentFile={board}/etc/deft/%i/env" in unit
        venv = board / "opt" / "deft" / "venv"
        version = subprocess.run(
            [str(venv / "bin" / "deft"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert version.returncode == 0 and version.stdout.strip() == "0.1.0"

        if shutil.which("systemd-analyze"):
            inst = tmp_path / "units" / "deft-device@dev1.service"
            inst.parent.mkdir()
            inst.symlink_to(unit_path)
            v = subprocess.run(
                ["systemd-analyze", "verify", str(inst)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert v.returncode == 0, v.stdout + v.stderr

        # idempotent: a second run changes nothing
        t0 = time.monotonic()
        again = last_json(deft("provision", "-i", str(fleet_toml), "--limit", "dev1", "--json", *cache))
        print(f"second provision: {time.monotonic() - t0:.0f}s")
        assert again["ok"] and again["changed"] == 0, again
        # --check over the whole fleet: nothing would change on dev1, dev2 is unreachable (exit 1)
        chk = deft("provision", "-i", str(fleet_toml), "--check", "--json", *cache)
        out = last_json(chk)
        assert chk.returncode == 1 and out["check"] and not out["ok"]
        assert out["hosts"]["dev1"]["changed"] == 0 and out["hosts"]["dev2"]["unreachable"] is True
        assert not (tmp_path / "board2").exists()
        bad = deft("provision", "-i", str(fleet_toml), "--limit", "dev9")
        assert bad.returncode == 2 and "no device 'dev9'" in bad.stderr

        # the installed unit's ExecStart, run as systemd would, joins a round
        argv = exec_start(unit, "dev1", env)
        assert argv[:3] == [str(venv / "bin" / "deft"), "device", "run"] and "--board" in argv
        with running_fleet(but, tiny_bert_bundle, tmp_path / "fleet") as fleet:
            edge = fleet.coordinator(devices=["dev1"], rounds=1, min_devices=1, steps=2)
            logs = tmp_path / "agent.err"
            with open(logs, "wb") as err:
                agent = subprocess.Popen(
                    argv,
                    env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **env},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    cwd=board,
                )
            try:
                fleet.wait_until(
                    lambda: not edge.alive() or agent.poll() is not None, 180, "the round to end"
                )
                assert agent.poll() is None, logs.read_text()[-3000:]
                rc = edge.wait(10)
                assert rc == 0, edge.tail() + logs.read_text()[-3000:]
                res = edge.result()
                assert fleet.counted(1) == {"dev1": 1}, res
                assert agent.poll() is None, logs.read_text()[
                    -3000:
                ]  # the service keeps running between rounds

                st = deft("status", "-i", str(fleet_toml), "--json")
                rows = {x["id"]: x for x in last_json(st)["devices"]}
                assert rows["dev1"]["reachable"] and rows["dev1"]["kit_version"] == "0.1.0", rows
                assert rows["dev1"]["service"] == "not managed" and rows["dev1"]["fleet"] == "online"
                assert rows["dev2"]["reachable"] is False and rows["dev2"]["fleet"] == "unknown"
            finally:
                agent.kill()  # the board loses power: the broker publishes its last will
                agent.wait(30)
            inv = load_inventory(fleet_toml)
            fleet.wait_until(
                lambda: fleet_status(inv, inv.select("dev1")) == {"dev1": "offline"},
                30,
                "dev1 reported offline",
            )
    finally:
        sshd.stop()

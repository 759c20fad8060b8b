"""Provision the fleet's boards over SSH with Ansible (ansible-core driven by ansible-runner).

The fleet file becomes an Ansible inventory (one host per device, its settings as host vars) in a
private temporary directory; the playbooks and templates ship with the kit
(``hardware/provisioning``). ``provision.yml`` installs the kit into a venv from wheels built here,
writes the credentials (0600), the ``deft-device@.service`` unit and starts it; ``status.yml`` only
reads. Results come back as ansible-runner events, so nothing parses Ansible's text output.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel

from hardware.inventory import Device, Inventory
from hardware.render import device_vars
from hardware.wheels import ARCHIVE

PLAYBOOKS = Path(__file__).with_name("provisioning")


class ProvisionError(RuntimeError):
    """Ansible could not be started; the message says what is missing."""


class HostResult(BaseModel):
    """One board's outcome of a playbook run; ``as_dict`` is its part of the JSON report."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: bool = False
    messages: list[str] = []
    facts: dict[str, dict] = {}  # task name -> module result

    def as_dict(self) -> dict:
        return self.model_dump(exclude={"facts"})


def _ansible_playbook() -> str:
    sibling = Path(sys.executable).with_name("ansible-playbook")
    found = str(sibling) if sibling.exists() else shutil.which("ansible-playbook")
    if not found:
        raise ProvisionError(
            "ansible-playbook not found: pip install 'deftkit[hardware]' (ansible-core, ansible-runner)"
        )
    return found


def host_vars(inv: Inventory, dev: Device, *, wheelhouse: Path | None = None) -> dict:
    v = device_vars(inv, dev)
    ssh_opts = [
        "-o StrictHostKeyChecking=accept-new",
        f"-o UserKnownHostsFile={inv.path.parent / 'known_hosts'}",
        "-o ConnectTimeout=10",
    ]
    v.update(
        {
            "ansible_host": dev.host,
            "ansible_port": dev.port,
            "ansible_user": dev.user,
            "ansible_ssh_private_key_file": str(inv.spec.ssh.private_key),
            "ansible_ssh_common_args": " ".join(ssh_opts),
            "ansible_python_interpreter": dev.python,
            "deft_python": dev.python,
            "deft_systemd": dev.systemd,
            "deft_become": dev.user != "root" and not dev.prefix,
            "deft_ca_file": str(inv.spec.broker.ca) if inv.spec.broker.ca else "",
            "deft_data_file": str(dev.data_file) if dev.data_file else "",
        }
    )
    if dev.prefix:
        v["ansible_remote_tmp"] = f"{dev.prefix.rstrip('/')}/tmp/.ansible"
    if wheelhouse is not None:
        names = sorted(p.name for p in wheelhouse.glob("*.whl"))
        v.update(
            {
                "deft_wheel_archive": str(wheelhouse / ARCHIVE),
                "deft_kit_wheel": next(n for n in names if n.startswith("deftkit-")),
                "deft_pip_wheel": next(n for n in names if n.startswith("pip-")),
            }
        )
    return v


def run_playbook(
    inv: Inventory,
    devices: list[Device],
    playbook: str,
    *,
    wheelhouses: dict[str, Path] | None = None,
    check: bool = False,
    on_event: Callable[[str, str, str], None] | None = None,
) -> dict[str, HostResult]:
    """Run one of the kit's playbooks on ``devices``; ``on_event(host, task, status)`` follows it."""
    import ansible_runner

    binary = _ansible_playbook()
    results = {d.id: HostResult() for d in devices}
    with tempfile.TemporaryDirectory(prefix="deft-ansible-") as tmp:
        pdd = Path(tmp)
        os.chmod(pdd, 0o700)  # host vars hold the broker passwords
        hosts = {d.id: host_vars(inv, d, wheelhouse=(wheelhouses or {}).get(d.id)) for d in devices}
        (pdd / "inventory").mkdir()
        (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
        project = pdd / "project"
        shutil.copytree(PLAYBOOKS, project, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
        env = {
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCAL_TEMP": str(pdd / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(pdd / "cp"),
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_NOCOLOR": "True",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "PATH": f"{Path(binary).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

        def handler(ev: dict) -> bool:
            data = ev.get("event_data") or {}
            host, task = data.get("host"), data.get("task", "")
            kind = ev.get("event", "")
            if host not in results:
                return True
            r = results[host]
            res = data.get("res") or {}
            if kind == "runner_on_ok":
                status = "changed" if res.get("changed") else "ok"
                r.facts[task] = res
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                status = "failed"
                r.messages.append(f"{task}: {_why(res)}")
            elif kind == "runner_on_unreachable":
                status = "unreachable"
                r.unreachable = True
                r.messages.append(f"unreachable: {_why(res)}")
            elif kind == "runner_on_skipped":
                status = "skipped"
            else:
                return True
            if on_event:
                on_event(host, task, status)
            return True

        cmdline = "--check --diff" if check else ""
        runner = ansible_runner.run(
            private_data_dir=str(pdd),
            project_dir=str(project),
            playbook=playbook,
            inventory=str(pdd / "inventory" / "hosts.yml"),
            envvars=env,
            quiet=True,
            cmdline=cmdline or None,
            event_handler=handler,
            limit=",".join(d.id for d in devices),
            json_mode=False,
        )
        stats = runner.stats or {}
        for host, r in results.items():
            r.ok = int((stats.get("ok") or {}).get(host, 0))
            r.changed = int((stats.get("changed") or {}).get(host, 0))
            r.failed = int((stats.get("failures") or {}).get(host, 0))
            r.skipped = int((stats.get("skipped") or {}).get(host, 0))
            r.unreachable = r.unreachable or host in (stats.get("dark") or {})
        if runner.rc not in (0, 2, 4) and not any(r.failed or r.unreachable for r in results.values()):
            out = runner.stdout.read() if runner.stdout else ""
            raise ProvisionError(
                f"ansible-playbook exited with {runner.rc}: {out.strip().splitlines()[-1:] or ''}"
            )
    return results


def _why(res: dict) -> str:
    msg = res.get("msg") or res.get("stderr") or res.get("module_stderr") or json.dumps(res)[:300]
    return " ".join(str(msg).split())[:400]

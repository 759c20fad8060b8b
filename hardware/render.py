"""The files a device gets, rendered from the same Jinja templates Ansible's ``template`` module uses.

One source for the systemd unit, the credentials file and the first-boot script, whether they reach
the board by SSH (``deft hw provision``), on its boot partition (``deft hw flash``) or in a Jetson
rootfs overlay.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from hardware.inventory import Device, Inventory

TEMPLATES = Path(__file__).with_name("provisioning") / "templates"
UNIT_NAME = "deft-device@.service"


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["quote"] = lambda s: shlex.quote(str(s))
    return env


def device_vars(inv: Inventory, dev: Device, *, prefix: str | None = None) -> dict:
    """The template variables of one device (Ansible host vars use the same names)."""
    p = dev.prefix if prefix is None else prefix
    d = dev.model_copy(update={"prefix": p})
    env = {
        "DEFT_BROKER": inv.spec.broker.url,
        "DEFT_FLEET": inv.fleet,
        "DEFT_PASSWORD": inv.passwords[dev.id],
        "DEFT_DATA": d.data_path,
        "DEFT_WORKDIR": d.workdir,
        "DEFT_BOARD": dev.board,
        "DEFT_AGENT_ARGS": " ".join(shlex.quote(a) for a in dev.agent_args),
    }
    if inv.spec.broker.ca is not None:
        # paho verifies the broker with OpenSSL's default paths, which honour SSL_CERT_FILE
        env["SSL_CERT_FILE"] = f"{d.config_dir}/ca.crt"
    return {
        "deft_id": dev.id,
        "deft_user": dev.user,
        "deft_prefix": p.rstrip("/"),
        "deft_env": env,
        "deft_hostname": dev.host_name,
    }


def render(template: str, variables: dict) -> str:
    return _env().get_template(template).render(**variables)


def unit_text(inv: Inventory, dev: Device, *, prefix: str | None = None) -> str:
    return render(f"{UNIT_NAME}.j2", device_vars(inv, dev, prefix=prefix))


def env_text(inv: Inventory, dev: Device, *, prefix: str | None = None) -> str:
    return render("env.j2", device_vars(inv, dev, prefix=prefix))


def firstboot_text(inv: Inventory, dev: Device) -> str:
    return render("firstboot.sh.j2", device_vars(inv, dev, prefix=""))


def parse_env_file(text: str) -> dict[str, str]:
    """Read back an env file as systemd's EnvironmentFile= does for the quoting ``env.j2`` writes."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        parts = shlex.split(value)
        out[key.strip()] = parts[0] if parts else ""
    return out

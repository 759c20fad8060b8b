"""First-boot configuration of a Raspberry Pi OS boot partition (image file or SD card).

Bookworm: Raspberry Pi Imager's convention, a ``firstrun.sh`` on the boot partition that the kernel
command line runs once (``systemd.run=``) and then removes. Trixie: cloud-init's NoCloud files
``user-data``, ``network-config`` and ``meta-data`` on the boot partition (Imager 2 does the same).
Both then run the kit's ``deft/firstboot.sh``, which moves the broker credentials into a root-only
``/etc/deft/<id>/`` (the FAT partition itself has no permissions), installs the kit from the wheels
copied next to it (if any) and enables ``deft-device@<id>.service``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from hardware.fat import FatPartition
from hardware.inventory import Device, Inventory
from hardware.render import UNIT_NAME, env_text, firstboot_text, unit_text

BOOT_DIR = "/boot/firmware"  # where Bookworm and Trixie mount the FAT partition
_CMDLINE_RUN = (
    f" systemd.run={BOOT_DIR}/firstrun.sh systemd.run_success_action=reboot "
    "systemd.unit=kernel-command-line.target"
)


class FlashError(RuntimeError):
    """The image or the device cannot be configured as asked; the message says why and what to do."""


def _q(s: str) -> str:
    return shlex.quote(s)


def firstrun_sh(inv: Inventory, dev: Device) -> str:
    """Imager-style firstrun.sh: hostname, user + SSH key, Wi-Fi, time zone, then the kit's first boot."""
    net = inv.spec.network
    host, user, key = dev.host_name, dev.user, inv.public_key
    lines = [
        "#!/bin/bash",
        "# written by deftkit (deft hw flash), in Raspberry Pi Imager's firstrun.sh convention",
        "set +e",
        "CURRENT_HOSTNAME=$(tr -d ' \\t\\n\\r' < /etc/hostname)",
        "if [ -f /usr/lib/raspberrypi-sys-mods/imager_custom ]; then",
        f"   /usr/lib/raspberrypi-sys-mods/imager_custom set_hostname {_q(host)}",
        "else",
        f"   echo {_q(host)} >/etc/hostname",
        f'   sed -i "s/127.0.1.1.*$CURRENT_HOSTNAME/127.0.1.1\\t{host}/g" /etc/hosts',
        "fi",
        # '*' as the password hash: no password login at all, the SSH key is the way in
        "if [ -f /usr/lib/userconf-pi/userconf ]; then",
        f"   /usr/lib/userconf-pi/userconf {_q(user)} '*'",
        "else",
        f"   id {_q(user)} >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo,video {_q(user)}",
        "fi",
        "if [ -f /usr/lib/raspberrypi-sys-mods/imager_custom ]; then",
        f"   /usr/lib/raspberrypi-sys-mods/imager_custom enable_ssh -k {_q(key)}",
        "else",
        f"   HOME_DIR=$(getent passwd {_q(user)} | cut -d: -f6)",
        f'   install -o {_q(user)} -m 700 -d "$HOME_DIR/.ssh"',
        f"   printf '%s\\n' {_q(key)} > \"$HOME_DIR/.ssh/authorized_keys\"",
        f'   chown {_q(user)} "$HOME_DIR/.ssh/authorized_keys"; chmod 600 "$HOME_DIR/.ssh/authorized_keys"',
        "   echo 'PasswordAuthentication no' >>/etc/ssh/sshd_config",
        "   systemctl enable ssh",
        "fi",
    ]
    if net.wifi_ssid:
        lines += [
            "if [ -f /usr/lib/raspberrypi-sys-mods/imager_custom ]; then",
            (
                f"   /usr/lib/raspberrypi-sys-mods/imager_custom set_wlan {_q(net.wifi_ssid)} "
                f"{_q(net.wifi_password or '')} {_q(net.country)}"
            ),
            "fi",
        ]
    lines += [
        "if [ -f /usr/lib/raspberrypi-sys-mods/imager_custom ]; then",
        f"   /usr/lib/raspberrypi-sys-mods/imager_custom set_timezone {_q(net.timezone)}",
        "fi",
        f"/bin/bash {BOOT_DIR}/deft/firstboot.sh",
        f"rm -f {BOOT_DIR}/firstrun.sh",
        f"sed -i 's| systemd.run.*||g' {BOOT_DIR}/cmdline.txt",
        "exit 0",
        "",
    ]
    return "\n".join(lines)


def cloud_init_files(inv: Inventory, dev: Device) -> dict[str, str]:
    """``user-data``, ``network-config`` and ``meta-data`` for cloud-init's NoCloud source."""
    net = inv.spec.network
    user_data = {
        "hostname": dev.host_name,
        "manage_etc_hosts": True,
        "timezone": net.timezone,
        "users": [
            {
                "name": dev.user,
                "groups": "users,adm,dialout,audio,netdev,video,plugdev,input,gpio,spi,i2c,render,sudo",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [inv.public_key],
            }
        ],
        "ssh_pwauth": False,
        "runcmd": [["bash", f"{BOOT_DIR}/deft/firstboot.sh"]],
    }
    network: dict = {"version": 2, "ethernets": {"eth0": {"dhcp4": True, "optional": True}}}
    if net.wifi_ssid:
        network["wifis"] = {
            "wlan0": {
                "dhcp4": True,
                "optional": True,
                "regulatory-domain": net.country,
                "access-points": {net.wifi_ssid: {"password": net.wifi_password or ""}},
            }
        }
    meta = {"instance-id": f"deft-{dev.id}", "local-hostname": dev.host_name}

    def dump(x: dict) -> str:
        return yaml.safe_dump(x, sort_keys=False, default_flow_style=False, width=1 << 16)

    return {
        "user-data": "#cloud-config\n" + dump(user_data),
        "network-config": dump({"network": network}),
        "meta-data": dump(meta),
    }


def configure_boot(inv: Inventory, dev: Device, target: str | Path, wheels: Path | None = None) -> list[str]:
    """Write the first-boot configuration of ``dev`` into the FAT partition of ``target``.

    Returns the paths written on the partition. Nothing is written unless the partition looks like a
    Raspberry Pi OS boot partition (it has cmdline.txt)."""
    if not dev.os.startswith("rpios-"):
        raise FlashError(
            f"device {dev.id} runs {dev.os}: `deft hw flash --image` is for Raspberry Pi OS boards"
        )
    fat = FatPartition(target)
    if not fat.exists("cmdline.txt"):
        raise FlashError(
            f"{target}: the FAT partition has no cmdline.txt, so it is not a Raspberry Pi OS boot "
            "partition; write Raspberry Pi OS to it first (--os-image)"
        )
    wheel_files = sorted(wheels.glob("*.whl")) if wheels else []
    if wheels and not any(w.name.startswith("pip-") for w in wheel_files):
        raise FlashError(
            f"--wheels {wheels} has no pip wheel: build the set with `deft hw provision` or pip download"
        )
    files: dict[str, str | bytes] = {
        "deft/firstboot.sh": firstboot_text(inv, dev),
        f"deft/{UNIT_NAME}": unit_text(inv, dev, prefix=""),
        "deft/authorized_keys": inv.public_key + "\n",
        "deft/device.json": json.dumps(
            {
                "id": dev.id,
                "board": dev.board,
                "os": dev.os,
                "hostname": dev.host_name,
                "fleet": inv.fleet,
                "broker": inv.spec.broker.url,
            },
            indent=2,
        )
        + "\n",
        "deft/secrets/env": env_text(inv, dev, prefix=""),
    }
    if inv.spec.broker.ca is not None:
        files["deft/secrets/ca.crt"] = inv.spec.broker.ca.read_bytes()
    if dev.os == "rpios-bookworm":
        files["firstrun.sh"] = firstrun_sh(inv, dev)
    else:
        files.update(cloud_init_files(inv, dev))
    fat.remove_tree("deft")  # a re-flash replaces the previous configuration as a whole
    for path, data in files.items():
        fat.write(path, data)
    for w in wheel_files:
        fat.copy_in(w, f"deft/wheels/{w.name}")
    # a re-flash for the other OS must not leave the first one's trigger behind (only files the kit wrote)
    mine = "firstrun.sh" if dev.os == "rpios-trixie" else "user-data"
    if fat.exists(mine) and b"deft/firstboot.sh" in fat.read(mine):
        for name in (
            ("firstrun.sh",) if mine == "firstrun.sh" else ("user-data", "network-config", "meta-data")
        ):
            if fat.exists(name):
                fat.remove(name)
    cmdline = fat.read("cmdline.txt").decode().strip()
    base = cmdline.split(" systemd.run=")[0]  # idempotent: an older firstrun entry is replaced
    new = base + (_CMDLINE_RUN if dev.os == "rpios-bookworm" else "")
    if new != cmdline:
        fat.write("cmdline.txt", new + "\n")
        files["cmdline.txt"] = ""
    return sorted([*files, *(f"deft/wheels/{w.name}" for w in wheel_files)])

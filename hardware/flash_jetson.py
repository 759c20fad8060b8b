"""Jetson: a rootfs overlay for the user's L4T BSP and NVIDIA's flash command for the board.

Flashing itself needs the user's ``Linux_for_Tegra`` (JetPack 6 BSP + sample rootfs, after
``apply_binaries.sh``) and a board in USB recovery mode. The kit adds, to ``Linux_for_Tegra/rootfs``:
the first-boot script with the device's credentials (root-only), the SSH key, the systemd units and
(optionally) the kit's wheels; names the login user with NVIDIA's ``l4t_create_default_user.sh`` so
no oem-config screen waits for a keyboard; and runs (or, as a dry run, prints) the flash command of
the board's profile. Commands follow NVIDIA's Jetson Linux 36.x (JetPack 6) Quick Start guide.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hardware.inventory import Device, Inventory
from hardware.render import UNIT_NAME, env_text, firstboot_text, unit_text


class JetsonError(RuntimeError):
    """No flash recipe for the board, or the BSP tree is incomplete; the message says what to do."""


@dataclass(frozen=True)
class FlashRecipe:
    tool: str  # relative to Linux_for_Tegra
    args: tuple[str, ...]
    source: str


#: board profile id -> NVIDIA's flash command (Jetson Linux 36.x Quick Start, "Flash the Jetson device")
RECIPES: dict[str, FlashRecipe] = {
    "jetson-orin-nano-8gb": FlashRecipe(
        "tools/kernel_flash/l4t_initrd_flash.sh",
        (
            "--external-device",
            "nvme0n1p1",
            "-c",
            "tools/kernel_flash/flash_l4t_t234_nvme.xml",
            "-p",
            "-c bootloader/generic/cfg/flash_t234_qspi.xml",
            "--showlogs",
            "--network",
            "usb0",
            "jetson-orin-nano-devkit",
            "internal",
        ),
        "Jetson Linux 36 Quick Start: Orin Nano developer kit, NVMe SSD",
    ),
    "jetson-agx-orin-64gb": FlashRecipe(
        "flash.sh",
        ("jetson-agx-orin-devkit", "internal"),
        "Jetson Linux 36 Quick Start: AGX Orin developer kit, internal eMMC",
    ),
}
CREATE_USER = "tools/l4t_create_default_user.sh"

FIRSTBOOT_UNIT = """\
# written by deftkit (deft hw flash): runs the kit's first-boot script once, then removes it
[Unit]
Description=deftkit first boot (credentials, kit, device service)
ConditionPathExists=/opt/deft/firstboot/firstboot.sh
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/bin/bash /opt/deft/firstboot/firstboot.sh
ExecStartPost=/bin/rm -rf /opt/deft/firstboot

[Install]
WantedBy=multi-user.target
"""


def recipe(dev: Device) -> FlashRecipe:
    if dev.board not in RECIPES:
        raise JetsonError(f"no flash recipe for board {dev.board} with {dev.os}; known: {', '.join(RECIPES)}")
    return RECIPES[dev.board]


def bsp_present(l4t: Path | None, dev: Device) -> bool:
    return bool(l4t) and (l4t / "rootfs" / "etc").is_dir() and (l4t / recipe(dev).tool).is_file()  # type: ignore[operator]


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def commands(dev: Device, password: str = "<password>") -> list[list[str]]:
    """The commands to run in Linux_for_Tegra, in order: name the user, then flash."""
    r = recipe(dev)
    user = [
        *_sudo(),
        f"./{CREATE_USER}",
        "-u",
        dev.user,
        "-p",
        password,
        "-n",
        dev.host_name,
        "--accept-license",
    ]
    return [user, [*_sudo(), f"./{r.tool}", *r.args]]


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _write(path: Path, data: str | bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def apply_overlay(inv: Inventory, dev: Device, rootfs: Path, wheels: Path | None = None) -> list[str]:
    """Write the kit's files into ``rootfs``; returns their paths relative to it."""
    if not (rootfs / "etc").is_dir():
        raise JetsonError(
            f"{rootfs} is not a root file system (no etc/): extract NVIDIA's sample rootfs there "
            "and run apply_binaries.sh first"
        )
    fb = rootfs / "opt" / "deft" / "firstboot"
    if fb.exists():
        shutil.rmtree(fb)
    written: dict[Path, tuple[str | bytes, int]] = {
        fb / "firstboot.sh": (firstboot_text(inv, dev), 0o700),
        fb / UNIT_NAME: (unit_text(inv, dev, prefix=""), 0o644),
        fb / "authorized_keys": (inv.public_key + "\n", 0o644),
        fb / "secrets" / "env": (env_text(inv, dev, prefix=""), 0o600),
        rootfs / "etc" / "systemd" / "system" / "deft-firstboot.service": (FIRSTBOOT_UNIT, 0o644),
    }
    if inv.spec.broker.ca is not None:
        written[fb / "secrets" / "ca.crt"] = (inv.spec.broker.ca.read_bytes(), 0o600)
    (fb / "secrets").mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(fb, 0o700)
    os.chmod(fb / "secrets", 0o700)
    for path, (data, mode) in written.items():
        _write(path, data, mode)
    wants = rootfs / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "deft-firstboot.service"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("../deft-firstboot.service")
    out = [str(p.relative_to(rootfs)) for p in written] + [str(link.relative_to(rootfs))]
    for w in sorted(wheels.glob("*.whl")) if wheels else []:
        (fb / "wheels").mkdir(exist_ok=True)
        shutil.copy2(w, fb / "wheels" / w.name)
        out.append(str((fb / "wheels" / w.name).relative_to(rootfs)))
    return sorted(out)


def flash(
    inv: Inventory,
    dev: Device,
    l4t: Path | None,
    *,
    dry_run: bool | None,
    wheels: Path | None = None,
    log=print,
) -> dict:
    """Overlay + flash, or (dry run, the default when the BSP is absent) only print the commands."""
    if dev.os != "jetpack-6":
        raise JetsonError(f"device {dev.id} runs {dev.os}: the Jetson flow is for jetpack-6 boards")
    present = bsp_present(l4t, dev)
    if dry_run is None:
        dry_run = not present
    if not dry_run and not present:
        raise JetsonError(
            f"{l4t or 'no --l4t given'}: not a prepared Linux_for_Tegra (needs rootfs/etc and "
            f"{recipe(dev).tool}); download the BSP and sample rootfs, run apply_binaries.sh, "
            "or use --dry-run"
        )
    password = secrets.token_urlsafe(12)
    cmds = commands(dev, password)
    shown = [show(commands(dev)[0]), show(cmds[1])]
    result = {
        "device": dev.id,
        "board": dev.board,
        "dry_run": dry_run,
        "l4t": str(l4t) if l4t else None,
        "commands": shown,
        "source": recipe(dev).source,
        "overlay": [],
    }
    if dry_run:
        return result
    assert l4t is not None
    try:
        result["overlay"] = apply_overlay(inv, dev, l4t / "rootfs", wheels)
    except PermissionError as exc:
        raise JetsonError(
            f"cannot write into {l4t / 'rootfs'} ({exc.strerror}): run as root (sudo deft hw flash ...)"
        ) from None
    for cmd in cmds:
        log(f"$ {show(cmd).replace(password, '<password>')}")
        r = subprocess.run(cmd, cwd=l4t, check=False)
        if r.returncode != 0:
            raise JetsonError(
                f"{show(cmd).replace(password, '<password>')} failed with exit code {r.returncode}: "
                "is the board in recovery mode (lsusb shows NVIDIA Corp. APX)?"
            )
    result["password"] = password
    return result

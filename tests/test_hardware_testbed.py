"""Testbed inventory and boot media: ``deft hw inventory`` and ``deft hw flash``.

Real parts: disk images built with sfdisk + mkfs.vfat (FAT32) and read back with mtools, the
first-boot script run for real under a scratch root, a Jetson ``Linux_for_Tegra`` tree whose
NVIDIA scripts are stand-ins that record their arguments (no test machine has the BSP or a board).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests._models import REPO

pytestmark = pytest.mark.skipif(
    not all(
        shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") or os.path.exists(f"/sbin/{t}")
        for t in ("mcopy", "sfdisk", "mkfs.vfat", "ssh-keygen")
    ),
    reason="needs the testbed tools: apt install mtools fdisk dosfstools openssh-client",
)

BOOT_OFFSET = 8192 * 512


def deft(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "deftkit.cli", "hw", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check:
        assert r.returncode == 0, f"deft hw {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _tool(name: str) -> str:
    return shutil.which(name) or next(p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p))


def make_rpi_image(path: Path) -> Path:
    """A 80 MiB disk image like Raspberry Pi OS's: MBR, FAT32 'bootfs' at sector 8192, a Linux partition."""
    with open(path, "wb") as f:
        f.truncate(80 * 2**20)
    table = "label: dos\nstart=8192, size=131072, type=c\nstart=139264, type=83\n"
    subprocess.run([_tool("sfdisk"), "-q", str(path)], input=table, text=True, check=True, timeout=60)
    subprocess.run(
        [_tool("mkfs.vfat"), "-F", "32", "-n", "BOOTFS", "--offset", "8192", str(path), "65536"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name, text in (
        ("cmdline.txt", "console=serial0,115200 root=PARTUUID=1234-02 rootfstype=ext4 rootwait\n"),
        ("config.txt", "[all]\narm_64bit=1\n"),
    ):
        src = path.parent / name
        src.write_text(text)
        mtools(path, "mcopy", str(src), f"::/{name}")
    return path


def mtools(image: Path, tool: str, *args: str) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    r = subprocess.run(
        [tool, "-i", f"{image}@@{BOOT_OFFSET}", *args], capture_output=True, env=env, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def read_fat(image: Path, path: str) -> str:
    return mtools(image, "mcopy", "-n", f"::/{path}", "-").decode()


def fat_names(image: Path, path: str = "") -> set[str]:
    return {Path(x).name for x in mtools(image, "mdir", "-b", f"::/{path}").decode().split()}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("testbed")
    r = deft("inventory", "--example", str(d))
    assert "fleet.toml" in r.stdout
    return d / "fleet.toml"


def test_example_testbed_is_complete_and_valid(example):
    d = example.parent
    assert (d / "ssh" / "id_ed25519").is_file() and (d / "ssh" / "id_ed25519.pub").is_file()
    accounts = json.loads((d / "broker" / "accounts.json").read_text())["accounts"]
    assert (
        stat.S_IMODE((d / "broker" / "accounts.json").stat().st_mode) == 0o600
    )  # as `deft edge broker` writes it
    out = json.loads(deft("inventory", str(example), "--json").stdout.splitlines()[-1])
    devs = {x["id"]: x for x in out["devices"]}
    assert {x["os"] for x in devs.values()} == {"rpios-bookworm", "rpios-trixie", "jetpack-6"}
    assert all({"id", "board", "os", "host"} <= set(x) for x in devs.values())
    assert {a["username"] for a in accounts if a["role"] == "device"} == set(devs)
    assert "password" not in json.dumps(out)
    # the same accounts file is what `deft edge broker` reads and extends
    from edge_broker.broker.base import load_accounts

    assert {a.username for a in load_accounts(d / "broker" / "accounts.json")} >= set(devs)
    # a second --example into the same directory refuses, and changes nothing
    before = example.read_bytes()
    r = deft("inventory", "--example", str(d), check=False)
    assert r.returncode == 2 and "already exists" in r.stderr and example.read_bytes() == before


def test_flash_bookworm_firstrun(example, tmp_path):
    img = make_rpi_image(tmp_path / "bookworm.img")
    inv = tomllib.loads(example.read_text())
    key = (example.parent / "ssh" / "id_ed25519.pub").read_text().strip()
    out = json.loads(
        deft("flash", "-i", str(example), "-d", "pi5-bookworm", "--image", str(img), "--json").stdout
    )
    assert out["ok"] and "firstrun.sh" in out["files"]

    names = fat_names(img)
    assert {"firstrun.sh", "cmdline.txt", "config.txt", "deft"} <= names and "user-data" not in names
    firstrun = read_fat(img, "firstrun.sh")
    assert "set_hostname pi5-bookworm" in firstrun and "userconf deft" in firstrun and key in firstrun
    assert "/boot/firmware/deft/firstboot.sh" in firstrun
    cmdline = read_fat(img, "cmdline.txt").strip()
    assert cmdline.startswith("console=serial0,115200 root=PARTUUID=1234-02")
    assert (
        cmdline.endswith(
            "systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot "
            "systemd.unit=kernel-command-line.target"
        )
        and "\n" not in cmdline
    )
    device = json.loads(read_fat(img, "deft/device.json"))
    assert (
        device["id"] == "pi5-bookworm" and device["hostname"] == "pi5-bookworm" and device["fleet"] == "lab"
    )
    env = read_fat(img, "deft/secrets/env")
    password = {
        a["username"]: a["password"]
        for a in json.loads((example.parent / "broker" / "accounts.json").read_text())["accounts"]
    }["pi5-bookworm"]
    assert f'DEFT_PASSWORD="{password}"' in env and f'DEFT_BROKER="{inv["broker"]["url"]}"' in env
    assert read_fat(img, "deft/authorized_keys").strip() == key
    unit = read_fat(img, "deft/deft-device@.service")
    assert "ExecStart=/opt/deft/venv/bin/deft device run" in unit and "Restart=on-failure" in unit

    # flashing again replaces the configuration instead of stacking it
    deft("flash", "-i", str(example), "-d", "pi5-bookworm", "--image", str(img))
    assert read_fat(img, "cmdline.txt").count("systemd.run=") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the first-boot script installs root-owned files")
def test_firstboot_script_keeps_the_secret_root_only(example, tmp_path):
    """Run the first-boot logic for real against a scratch root: the credentials end up 0600 in a 0700
    directory and are gone from the (world-readable) boot partition."""
    img = make_rpi_image(tmp_path / "b.img")
    deft("flash", "-i", str(example), "-d", "pi5-bookworm", "--image", str(img))
    boot = tmp_path / "boot" / "deft"
    boot.mkdir(parents=True)
    mtools(img, "mcopy", "-s", "-n", "::/deft", str(boot.parent))
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "systemctl.log"}\n')
    (stub / "systemctl").chmod(0o755)
    root = tmp_path / "root"
    script = (boot / "firstboot.sh").read_text()
    assert script.index("umask 077") < script.index('install -m 0600 -o root -g root "$SRC/secrets/env"')
    r = subprocess.run(
        ["bash", str(boot / "firstboot.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{stub}:/usr/bin:/bin:/usr/sbin:/sbin", "DEFT_ROOT": str(root)},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    env = root / "etc" / "deft" / "pi5-bookworm" / "env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and env.stat().st_uid == 0
    assert (
        stat.S_IMODE(env.parent.stat().st_mode) == 0o700
        and stat.S_IMODE((root / "etc" / "deft").stat().st_mode) == 0o700
    )
    assert "DEFT_PASSWORD=" in env.read_text()
    assert not (boot / "secrets").exists()  # removed from the boot partition
    assert (root / "etc" / "systemd" / "system" / "deft-device@.service").is_file()
    assert "enable deft-device@pi5-bookworm.service" in (tmp_path / "systemctl.log").read_text()


def test_flash_trixie_cloud_init(example, tmp_path):
    img = make_rpi_image(tmp_path / "trixie.img")
    key = (example.parent / "ssh" / "id_ed25519.pub").read_text().strip()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("pip-26.3-py3-none-any.whl", "deftkit-0.1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"PK stand-in")  # only copied here; provisioning installs real ones
    deft("flash", "-i", str(example), "-d", "pi4-trixie", "--image", str(img), "--wheels", str(wheels))
    assert fat_names(img, "deft/wheels") == {"pip-26.3-py3-none-any.whl", "deftkit-0.1.0-py3-none-any.whl"}
    names = fat_names(img)
    assert {"user-data", "network-config", "meta-data", "deft"} <= names and "firstrun.sh" not in names
    assert "systemd.run" not in read_fat(img, "cmdline.txt")

    raw = read_fat(img, "user-data")
    assert raw.startswith("#cloud-config\n")
    user_data = yaml.safe_load(raw)
    assert user_data["hostname"] == "pi4-trixie"
    (user,) = user_data["users"]
    assert user["name"] == "deft" and user["ssh_authorized_keys"] == [key] and user["lock_passwd"] is True
    assert user_data["ssh_pwauth"] is False
    assert ["bash", "/boot/firmware/deft/firstboot.sh"] in user_data["runcmd"]
    assert (
        "DEFT_PASSWORD" not in raw
    )  # the secret travels in deft/secrets/env, moved to root-only at first boot
    network = yaml.safe_load(read_fat(img, "network-config"))["network"]
    assert network["version"] == 2 and network["ethernets"]["eth0"]["dhcp4"] is True
    meta = yaml.safe_load(read_fat(img, "meta-data"))
    assert meta["instance-id"] == "deft-pi4-trixie" and meta["local-hostname"] == "pi4-trixie"
    assert "DEFT_PASSWORD=" in read_fat(img, "deft/secrets/env")
    if shutil.which("cloud-init"):
        for name in ("user-data", "network-config"):
            f = tmp_path / name
            f.write_text(read_fat(img, name))
            args = (
                ["--config-file", str(f)]
                if name == "user-data"
                else ["--schema-type", "network-config", "--config-file", str(f)]
            )
            r = subprocess.run(
                ["cloud-init", "schema", *args], capture_output=True, text=True, timeout=120, check=False
            )
            assert r.returncode == 0, r.stdout + r.stderr


def test_flash_writes_os_image_only_to_removable_disks(example, tmp_path):
    src = make_rpi_image(tmp_path / "os.img")
    target = tmp_path / "card.img"
    target.write_bytes(b"\xaa" * (1 << 20))
    before = target.read_bytes()
    refused = [Path("/dev/null"), target]
    refused += [
        Path(f"/dev/{b}")
        for b in ("loop0", "vda", "sda", "nvme0n1")
        if Path(f"/dev/{b}").exists()
        and Path(f"/sys/block/{b}/removable").exists()
        and Path(f"/sys/block/{b}/removable").read_text().strip() == "0"
    ][:1]
    def flash(image: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return deft("flash", "-i", str(example), "-d", "pi5-bookworm", "--os-image", str(src), "--image", str(image),
                    *extra, "--yes", check=check)

    for dev in refused:
        r = flash(dev, check=False)
        assert r.returncode == 2, r.stdout + r.stderr
        assert (
            "not a removable disk" in r.stderr
            and "--force" in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
        )
    assert target.read_bytes() == before

    # --force: written (holes skipped), verified by reading back, then configured
    r = flash(target, "--force", "--json")
    out = json.loads(r.stdout.splitlines()[-1])
    assert "will overwrite" in r.stderr and str(target) in r.stderr
    assert out["written"]["verified"] is True and 0 < out["written"]["bytes"] <= src.stat().st_size
    assert "firstrun.sh" in fat_names(target)
    assert read_fat(target, "config.txt") == "[all]\narm_64bit=1\n"
    got = target.read_bytes()
    assert got[:BOOT_OFFSET] == src.read_bytes()[:BOOT_OFFSET]  # partition table and gap as in the image


def test_blockdev_verify_detects_a_bad_write(tmp_path, monkeypatch):
    """The read-back compares every written range: a medium that returns other bytes fails loudly."""
    from hardware.blockdev import BlockDeviceError, write_image

    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(3 << 20))
    dest = tmp_path / "dest.img"
    calls = []
    assert write_image(src, dest, on_progress=lambda *a: calls.append(a))["verified"] is True
    assert dest.read_bytes() == src.read_bytes() and calls[-1][0] == "verifying" and calls[-1][1] == 3 << 20
    # a card that reads back other bytes than were written (a fake-capacity card does this)
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, pos: bytes(n) if pos == 0 else real_pread(fd, n, pos))
    with pytest.raises(BlockDeviceError, match="verification failed at byte 0"):
        write_image(src, dest)


def _fake_l4t(root: Path) -> Path:
    l4t = root / "Linux_for_Tegra"
    (l4t / "rootfs" / "etc").mkdir(parents=True)
    for script in ("flash.sh", "tools/kernel_flash/l4t_initrd_flash.sh", "tools/l4t_create_default_user.sh"):
        p = l4t / script
        p.parent.mkdir(parents=True, exist_ok=True)
        # records its arguments, one per line, like NVIDIA's script would receive them
        p.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" -- >> {root / "calls.log"}\n')
        p.chmod(0o755)
    return l4t


def _calls(log: Path) -> list[list[str]]:
    return [c.strip("\n").splitlines() for c in log.read_text().split("--\n") if c.strip()]


def test_jetson_overlay_and_flash_command(example, tmp_path):
    l4t = _fake_l4t(tmp_path)
    r = deft("flash", "-i", str(example), "-d", "orin-nano", "--l4t", str(l4t), "--json")
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["dry_run"] is False and "password" not in out
    calls = _calls(tmp_path / "calls.log")
    assert [c[0] for c in calls] == [
        "./tools/l4t_create_default_user.sh",
        "./tools/kernel_flash/l4t_initrd_flash.sh",
    ]
    user_args = calls[0][1:]
    assert user_args[:2] == ["-u", "deft"] and user_args[4:] == ["-n", "orin-nano", "--accept-license"]
    assert len(user_args[3]) >= 12  # a generated password, never printed in the JSON
    from hardware.flash_jetson import RECIPES

    # NVIDIA's Orin Nano NVMe command, as the recipe cites it from the Jetson Linux 36 Quick Start
    assert calls[1][1:] == list(RECIPES["jetson-orin-nano-8gb"].args)
    assert calls[1][1:3] == ["--external-device", "nvme0n1p1"] and calls[1][-2:] == ["jetson-orin-nano-devkit",
                                                                                   "internal"]
    # the printed command is exactly what ran
    import shlex

    assert shlex.split(out["commands"][1]) == calls[1]
    rootfs = l4t / "rootfs"
    secret = rootfs / "opt/deft/firstboot/secrets/env"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and "DEFT_PASSWORD=" in secret.read_text()
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/deft-firstboot.service").resolve() == (
        rootfs / "etc/systemd/system/deft-firstboot.service"
    ).resolve()
    assert (
        "ExecStart=/opt/deft/venv/bin/deft device run"
        in (rootfs / "opt/deft/firstboot/deft-device@.service").read_text()
    )
    assert "orin-nano" in (rootfs / "opt/deft/firstboot/firstboot.sh").read_text()


def test_jetson_dry_run_without_bsp_prints_the_command_per_board(example, tmp_path):
    text = example.read_text().replace('board = "jetson-orin-nano-8gb"', 'board = "jetson-agx-orin-64gb"')
    agx = example.parent / "agx.toml"
    agx.write_text(text)
    for fleet, expect in (
        (example, "l4t_initrd_flash.sh --external-device nvme0n1p1"),
        (agx, "./flash.sh jetson-agx-orin-devkit internal"),
    ):
        r = deft("flash", "-i", str(fleet), "-d", "orin-nano", "--l4t", str(tmp_path / "absent"), "--json")
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["dry_run"] is True and out["overlay"] == []
        assert expect in out["commands"][1]
        assert "-p '<password>'" in out["commands"][0]
    assert not (tmp_path / "absent").exists()
    # asking to run without a BSP is refused, one line
    r = deft("flash", "-i", str(example), "-d", "orin-nano", "--run", check=False)
    assert r.returncode == 2 and "Linux_for_Tegra" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _bad(example: Path, tmp_path: Path, kind: str) -> Path:
    d = example.parent
    text = example.read_text()
    text = text.replace('"ssh/id_ed25519"', f'"{d}/ssh/id_ed25519"').replace(
        '"broker/accounts.json"', f'"{d}/broker/accounts.json"'
    )
    if kind == "unknown board":
        text = text.replace('board = "rpi4-8gb"', 'board = "rpi9-64gb"')
    elif kind == "duplicate id":
        text = text.replace('id = "pi4-trixie"', 'id = "pi5-bookworm"')
    elif kind == "missing key":
        text = text.replace(f'"{d}/ssh/id_ed25519"', f'"{tmp_path}/nokey"')
    elif kind == "broker account missing":
        text = text.replace('id = "pi4-trixie"', 'id = "pi4-new"')
    f = tmp_path / "fleet.toml"
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    "kind,words",
    [
        ("unknown board", ["unknown board 'rpi9-64gb'", "rpi5-8gb"]),
        ("duplicate id", ["duplicate device id 'pi5-bookworm'"]),
        ("missing key", ["ssh.private_key", "not found", "ssh-keygen"]),
        ("broker account missing", ["'pi4-new' has no broker account", "deft edge broker"]),
    ],
)
def test_bad_inventory_one_line_exit_2_nothing_written(example, tmp_path, kind, words):
    bad = _bad(example, tmp_path, kind)
    img = make_rpi_image(tmp_path / "x.img")
    before = img.read_bytes()
    l4t = _fake_l4t(tmp_path)
    for args in (
        ["inventory", str(bad)],
        ["flash", "-i", str(bad), "-d", "pi5-bookworm", "--image", str(img)],
        ["flash", "-i", str(bad), "-d", "orin-nano", "--l4t", str(l4t)],
        ["provision", "-i", str(bad)],
        ["status", "-i", str(bad)],
    ):
        r = deft(*args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        for w in words:
            assert w in lines[0], lines[0]
    assert img.read_bytes() == before
    assert not (tmp_path / "calls.log").exists() and not (l4t / "rootfs" / "opt").exists()


def test_wheel_set_follows_the_device_extra_for_the_boards_platform(tmp_path):
    """What a board installs is the project's own ``device`` extra, its markers evaluated for the board."""
    from packaging.requirements import Requirement

    from hardware.wheels import build_kit_wheel, device_requirements

    kit = build_kit_wheel(tmp_path)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(x) for x in project["dependencies"] + project["optional-dependencies"]["device"]]
    env = {"platform_machine": "aarch64", "python_version": "3.11", "sys_platform": "linux"}
    for arch in ("x86_64", "aarch64"):
        got = {Requirement(x).name for x in device_requirements(kit, arch, "3.11")}
        want = {
            r.name
            for r in declared
            if r.marker is None or r.marker.evaluate({**env, "platform_machine": arch})
        }
        assert got == want, arch
    assert all("extra" not in x and ";" not in x for x in device_requirements(kit, "aarch64", "3.11"))
